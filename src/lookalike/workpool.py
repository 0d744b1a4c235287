"""Thread pools: how many threads to size them by, and calls on one a bounded window at a time (load, export)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

Item = TypeVar("Item")
_END = object()


# Threads that each hold a whole decoded image at once: a full-size decode may take 268 MB (Pillow's pixel
# limit in RGB), so however many cores there are, at most this many run together.
FULL_DECODERS = 8


def cores(at_most: int | None = None) -> int:
    """The CPUs this process may run on (its affinity where the OS has one: a container's or taskset's
    limit), at most ``at_most``."""
    try:
        count = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # macOS, Windows
        count = os.cpu_count() or 1
    return count if at_most is None else min(count, at_most)


def completed(pool: ThreadPoolExecutor, call: Callable[[Item], object], items: Iterable[Item],
              window: int) -> Iterator[tuple[Item, Future]]:
    """``(item, future)`` for each item as ``call(item)`` finishes, in the order they finish.

    At most ``window`` calls are submitted at once, so memory stays flat however
    many items there are. When the caller stops (an interrupt, an exception, or
    closing the generator) the calls not yet started are cancelled.
    """
    queue = iter(items)
    in_flight: dict[Future, Item] = {}
    try:
        while True:
            while len(in_flight) < window:
                item = next(queue, _END)
                if item is _END:
                    break
                in_flight[pool.submit(call, item)] = item
            if not in_flight:
                return
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                yield in_flight.pop(future), future
    finally:
        for future in in_flight:
            future.cancel()
