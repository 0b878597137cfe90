"""What every benchmark here does: run a step a few times and keep the median (robust to one slow round)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], rounds: int, before: Callable[[], object] | None = None) -> float:
    """The median time of `fn`; `before` (not timed) runs ahead of each round (to undo what the last one did)."""
    times = []
    for _ in range(rounds):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """The median time of each of `fns`, run in turn within every round: a host that slows down during the
    measurement (another tenant, a background job) slows every one of them alike, and their ratios hold."""
    times: dict[str, list[float]] = {what: [] for what in fns}
    for _ in range(rounds):
        for what, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[what].append(time.perf_counter() - start)
    return {what: statistics.median(spent) for what, spent in times.items()}
