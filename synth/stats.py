"""Statistics shared by the stages that summarise results (train, tune, report)."""

from __future__ import annotations

import statistics
from typing import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); the std of a single value is 0."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
