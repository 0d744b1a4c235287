"""`make bench`: every benchmark in bench/, one after another, each printing its own ratios.

    python bench/run_all.py [--full]    # default: each with --quick (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCHES = ["bench_load", "bench_hashing", "bench_neardup", "bench_dedupe_quality", "bench_dedupe_speed", "bench_featurize",
           "bench_evaluate", "bench_search", "bench_index", "bench_api", "bench_export", "bench_plpython",
           "bench_inspect", "bench_spaces", "bench_spark_featurize", "bench_spark_neardup"]


def main() -> int:
    full = "--full" in sys.argv[1:]
    here = Path(__file__).parent
    failed = []
    for name in BENCHES:
        print(f"\n=== {name}{'' if full else ' --quick'} ===", flush=True)
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(here / f"{name}.py"), *([] if full else ["--quick"])])
        print(f"--- {name}: {'ok' if done.returncode == 0 else f'exit {done.returncode}'}, "
              f"{time.monotonic() - started:.0f} s", flush=True)
        if done.returncode:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
