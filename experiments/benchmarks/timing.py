"""Wall-clock timing of jitted calls, shared by the experiment scripts (run as scripts, experiments/ is on the path)."""

from __future__ import annotations

import statistics
import time

import jax


def call_times_ms(fn, *args, reps: int, budget_s: float | None = None, min_reps: int = 3) -> list[float]:
    """Milliseconds of blocking calls `fn(*args)` after two untimed ones (compilation, warm caches): `reps` calls,
    or with `budget_s`, at least `min_reps` and at most `reps`, stopping once `budget_s` seconds have passed."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times, start = [], time.perf_counter()
    while len(times) < reps and (budget_s is None or len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def median_ms(fn, *args, reps: int = 20, budget_s: float | None = None, min_reps: int = 3) -> float:
    """Median of `call_times_ms`: one call's latency (dispatch, run, synchronise)."""
    return statistics.median(call_times_ms(fn, *args, reps=reps, budget_s=budget_s, min_reps=min_reps))
