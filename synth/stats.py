"""Statistics over seeds, shared by the stages that summarise repeated runs (tune, report).

Pure functions of plain numbers: nothing here reads storage or imports a synth stage, so any
stage may import it. The one convention: spread is the sample standard deviation (ddof=1), and a
single value has a spread of 0, not an undefined one.
"""

from __future__ import annotations

import statistics
from typing import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); the std of a single value is 0."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_stat(values: Sequence[float], seeds: Sequence[int]) -> dict:
    """``{"mean", "std", "n", "values", "seeds"}`` of one measurement over seeds, as the report stores it.

    ``values[i]`` was measured with ``seeds[i]``; both lists are kept so a reader can recompute
    the spread or spot the outlying seed.
    """
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": list(values), "seeds": list(seeds)}
