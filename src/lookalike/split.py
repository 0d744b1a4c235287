"""Split step: a stratified train/test split of the unique, labelled images.

Every image gets a number in [0, 1) derived from (seed, sha256) alone, so the
split does not depend on load order or on the database it lives in; the number
is stored in ``splits.random``. Within each label, images sorted by that number
are cut at the test share: the first ones are test. Another ratio with the same
seed re-cuts the same order, so a smaller test set is always inside a larger one.

"Unique images" are the ok images that the latest dedupe run did not mark as a
non-keeper (all ok images when no dedupe has run). Images without a label are
left out. The previous split is replaced: there is one split at a time.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass

import sqlalchemy as sa

from .db import Database, duplicates_by_label, images, is_unique_image, recorded_run, splits
from .errors import BadInput
from .steps import default

DEFAULT_TEST_RATIO = default("split", "test_ratio")


@dataclass(frozen=True)
class SplitSummary:
    seed: int
    test_ratio: float
    per_label: tuple[tuple[str, int, int], ...]  # (label, train, test), by label
    unlabelled: int       # unique ok images left out for having no label
    duplicates: int       # ok images left out as non-keepers of the latest dedupe run
    duplicates_by_label: tuple[tuple[str, int], ...] = ()  # (label, duplicates left out); "" is no label

    @property
    def train(self) -> int:
        return sum(n for _, n, _ in self.per_label)

    @property
    def test(self) -> int:
        return sum(n for _, _, n in self.per_label)

    def lines(self) -> list[str]:
        out = [f"split (seed {self.seed}, test ratio {self.test_ratio:g}): "
               f"{self.train} train, {self.test} test, {len(self.per_label)} labels, "
               f"{self.duplicates} duplicates left out"]
        split = {label: (train, test) for label, train, test in self.per_label}
        lost = dict(self.duplicates_by_label)
        # A label whose every image is a duplicate (its keeper has another label) still gets its row.
        labels = sorted(set(split) | set(lost) - {""}) + ([""] if lost.get("") else [])
        if labels:
            out.append(f"  {'label':<20} {'train':>7} {'test':>7} {'duplicates left out':>20}")
            for label in labels:
                train, test = split.get(label, (0, 0))
                out.append(f"  {label or '(no label)':<20} {train:>7} {test:>7} {lost.get(label, 0):>20}")
            out.append(f"  {'total':<20} {self.train:>7} {self.test:>7} {self.duplicates:>20}")
        if self.unlabelled:
            out.append(f"  left out: {self.unlabelled} images without a label")
        if self.duplicates:
            out.append(f"  left out: {self.duplicates} duplicates (not keepers in the latest dedupe run)")
        return out


def split_number(seed: int, sha256: str) -> float:
    """The image's uniform number in [0, 1): 53 bits of sha256("{seed}:{sha256}"), exact as a float."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53


def count_test_images(n: int, test_ratio: float) -> int:
    """How many of a label's ``n`` images are test: round(ratio * n), kept within 1 .. n-1 when n ≥ 2.

    Non-decreasing in the ratio, which is what makes re-cuts nested. A label with a
    single image keeps it for training.
    """
    if n < 2:
        return 0
    return min(max(math.floor(test_ratio * n + 0.5), 1), n - 1)


def split_images(db: Database, *, test_ratio: float = DEFAULT_TEST_RATIO,
                 seed: int = default("split", "seed")) -> SplitSummary:
    """Replace the split with a stratified one of the unique labelled images; return its counts."""
    if not 0 < test_ratio < 1:
        raise BadInput(f"test_ratio must be between 0 and 1 (exclusive), not {test_ratio}")
    seed = int(seed)
    with recorded_run(db, "split", {"test_ratio": test_ratio, "seed": seed}) as counts:
        with db.begin() as conn:
            rows = conn.execute(sa.select(images.c.id, images.c.sha256, images.c.label)
                                .where(is_unique_image())).all()
            lost = duplicates_by_label(conn)
            by_label: dict[str, list[tuple[float, str, int]]] = defaultdict(list)
            unlabelled = 0
            for image_id, sha, label in rows:
                if label is None or label == "":
                    unlabelled += 1
                    continue
                by_label[label].append((split_number(seed, sha), sha, image_id))

            new_rows, per_label = [], []
            for label in sorted(by_label):
                members = sorted(by_label[label])  # by number; sha breaks the (unlikely) tie
                n_test = count_test_images(len(members), test_ratio)
                for position, (number, _, image_id) in enumerate(members):
                    new_rows.append({"image_id": image_id, "random": number, "seed": seed,
                                     "test_ratio": test_ratio, "split": "test" if position < n_test else "train"})
                per_label.append((label, len(members) - n_test, n_test))

            conn.execute(sa.delete(splits))
            if new_rows:
                conn.execute(sa.insert(splits), new_rows)
        summary = SplitSummary(seed, test_ratio, tuple(per_label), unlabelled, sum(lost.values()),
                               tuple(lost.items()))
        counts.update(train=summary.train, test=summary.test, labels=len(per_label), unlabelled=unlabelled,
                      duplicates=summary.duplicates, duplicates_by_label=lost)
    return summary
