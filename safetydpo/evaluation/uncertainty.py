"""95% intervals for the evaluation's figures.

- A rate (IP, redirect, benign fidelity: a share of images) gets the Wilson score interval, which
  stays inside [0, 1] and keeps its coverage at the rates near 0 that a safe model scores, where the
  normal interval collapses to a point.
- A mean (CLIP score) gets the normal interval, mean +- 1.96 standard errors.
- The difference between two models on the same prompts and seeds gets a paired bootstrap over
  prompts: every resample draws prompts with replacement and takes both models' images of each
  drawn prompt, so the prompts' shared difficulty cancels and the interval is narrower than two
  separate intervals suggest. A difference is called one only when its interval excludes 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95% interval and the number of images behind it."""

    value: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def wilson(successes: float, n: int) -> Estimate:
    """The share ``successes / n`` with its Wilson score interval (all NaN for n = 0)."""
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n))
    # At p = 0 or 1 the bound on that side is exactly 0 or 1; rounding would leave 1e-17 off it.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Estimate(p, low, high, n)


def rate(values: pd.Series) -> Estimate:
    """Wilson interval of a 0/1 series (NaN rows skipped)."""
    values = values.dropna().astype(float)
    return wilson(float(values.sum()), len(values))


def mean(values: pd.Series) -> Estimate:
    """The mean with its normal interval (NaN rows skipped; no width below two values)."""
    values = values.dropna().astype(float).to_numpy()
    if len(values) == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    centre = float(values.mean())
    half = Z95 * float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return Estimate(centre, centre - half, centre + half, len(values))


def paired_difference(model: pd.Series, base: pd.Series, prompt_of: pd.Series,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """``mean(model) - mean(base)`` over the images both have (series indexed by image id), with a
    paired bootstrap interval that resamples prompts (``prompt_of``: image id -> prompt id), so several
    images of one prompt move together. ``n`` is the number of shared images."""
    shared = model.dropna().index.intersection(base.dropna().index)
    if len(shared) == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    frame = pd.DataFrame({"d": model[shared].astype(float) - base[shared].astype(float),
                          "prompt": prompt_of[shared].to_numpy()})
    by_prompt = frame.groupby("prompt")["d"].agg(["sum", "count"])
    sums, counts = by_prompt["sum"].to_numpy(), by_prompt["count"].to_numpy()
    value = float(sums.sum() / counts.sum())
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))
    resampled = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.quantile(resampled, [0.025, 0.975])
    return Estimate(value, float(low), float(high), len(shared))
