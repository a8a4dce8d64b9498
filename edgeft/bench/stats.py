"""Summaries of repeated timings."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between the closest ranks
    (numpy's default), so p50 of an even count is the mean of the middle two.

    Raises:
        ValueError: no values, or ``q`` outside 0–100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0-100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def token_percentiles(seconds: Sequence[float]) -> dict:
    """p50/p90/p99 of per-token latencies, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {f"p{q}": percentile(ms, q) for q in (50, 90, 99)}
