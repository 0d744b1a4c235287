"""An unlabelled catalogue for tests: rendered sample images copied into one flat folder under new names."""

from __future__ import annotations

import shutil
from pathlib import Path


def flat_folder(rendered_root: Path, folder: Path, name: str) -> Path:
    """Copy every ``<label>/<file>`` under ``rendered_root`` into ``folder`` as ``name.format(n) + suffix``."""
    folder.mkdir()
    for n, path in enumerate(sorted(rendered_root.glob("*/*"))):
        shutil.copy(path, folder / f"{name.format(n)}{path.suffix}")
    return folder
