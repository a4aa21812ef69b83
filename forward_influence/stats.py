"""Distance buckets and confidence intervals for Forward Influence tables.

Distances d = q - t count query positions after the eviction time t (d >= 1). The default buckets
are 1-8, 9-32, 33-128, 129-512 and 513+.

Intervals of a mean (two-sided, 95% by default) respect the quantity:

- shares of 0/1 outcomes (exact match, accuracy): the Wilson score interval (`scipy.stats.binomtest`),
  which stays inside [0, 1] and is not degenerate at 0/n or n/n;
- non-negative values (a KL, a distance, an age, a share): the percentile bootstrap of the mean
  (`scipy.stats.bootstrap`, 9999 resamples, a fixed seed so reruns give identical tables), which
  cannot reach below zero, as a Student-t interval of a skewed quantity does;
- anything else (differences, correlations, NLL changes of either sign): the Student-t interval
  (`scipy.stats.t`).

A statistic of several paired samples (a ratio of means, a place between two policies) takes the
paired percentile bootstrap (`paired_interval`), with the same resamples and seed.

With fewer than two values the interval is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

DEFAULT_EDGES = (1, 9, 33, 129, 513)


def bucket_bounds(edges: Sequence[int] = DEFAULT_EDGES) -> list[tuple[int, int | None]]:
    """``[(lo, hi), ...]`` inclusive bounds of each bucket; the last one is open (hi None)."""
    edges = list(edges)
    return [(lo, hi - 1) for lo, hi in zip(edges, edges[1:])] + [(edges[-1], None)]


def bucket_label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else f"{lo}-{hi}"


def parse_edges(text: str) -> tuple[int, ...]:
    """Bucket edges from ``"1,9,33,129,513"``: each number starts a bucket."""
    edges = tuple(int(x) for x in text.split(",") if x.strip())
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError("bucket edges must be increasing integers starting at 1 or more")
    return edges


BOOTSTRAP_RESAMPLES = 9999


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the confidence interval of the mean, ignoring NaN (which interval: the module docstring).
    Fewer than two values, equal values and signed values take `student_t_ci`'s rules."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size >= 2 and np.isin(x, (0.0, 1.0)).all():
        interval = stats.binomtest(int(x.sum()), x.size).proportion_ci(confidence, method="wilson")
        return float(x.mean()), float(interval.low), float(interval.high)
    if x.size >= 2 and (x >= 0).all() and not np.all(x == x[0]):
        interval = stats.bootstrap(
            (x,),
            np.mean,
            confidence_level=confidence,
            n_resamples=BOOTSTRAP_RESAMPLES,
            method="percentile",
            random_state=0,
        ).confidence_interval
        return float(x.mean()), float(interval.low), float(interval.high)
    return student_t_ci(x, confidence)


def paired_interval(
    samples: Sequence[np.ndarray], statistic, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """The paired percentile-bootstrap interval of ``statistic(*samples)``, where `samples` are arrays
    of one value per item (a document) and each resample draws the same items from all of them."""
    interval = stats.bootstrap(
        tuple(samples),
        statistic,
        paired=True,
        vectorized=False,
        confidence_level=confidence,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        random_state=seed,
    ).confidence_interval
    return float(interval.low), float(interval.high)


def student_t_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its Student-t interval, ignoring NaN: the interval of paired differences. Unlike
    `mean_ci` it never reads the values as 0/1 outcomes or as non-negative, so differences that happen
    to be all 0 or 1 stay differences (all equal: the interval is that value)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return np.nan, np.nan, np.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, np.nan, np.nan
    if np.all(x == x[0]):
        return mean, mean, mean
    lo, hi = stats.t.interval(confidence, x.size - 1, loc=mean, scale=stats.sem(x))
    return mean, float(lo), float(hi)


def by_bucket(frame: pd.DataFrame, value_columns: Sequence[str], edges: Sequence[int] = DEFAULT_EDGES) -> pd.DataFrame:
    """Mean of each value column per (document, selection, bucket) from a per-distance frame.

    `frame` has columns ``document, selection, distance`` and the value columns.
    """
    rows = []
    for lo, hi in bucket_bounds(edges):
        inside = frame[(frame.distance >= lo) & ((frame.distance <= hi) if hi is not None else True)]
        if inside.empty:
            continue
        means = inside.groupby(["document", "selection"], sort=False)[list(value_columns)].mean().reset_index()
        means.insert(2, "bucket", bucket_label(lo, hi))
        means.insert(3, "distance_lo", lo)
        # The last distance actually measured, which a short trace may put inside the bucket's bounds.
        means.insert(4, "distance_hi", int(inside.distance.max()))
        rows.append(means)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def group_ci(
    frame: pd.DataFrame, groups: Sequence[str], values: Sequence[str], confidence: float = 0.95
) -> pd.DataFrame:
    """Per group of `groups`: ``n`` rows and ``<value>_mean, <value>_ci_low, <value>_ci_high`` (`mean_ci`)."""
    rows = []
    for key, group in frame.groupby(list(groups), sort=False):
        row = dict(zip(groups, key if isinstance(key, tuple) else (key,)), n=len(group))
        for value in values:
            row[f"{value}_mean"], row[f"{value}_ci_low"], row[f"{value}_ci_high"] = mean_ci(group[value], confidence)
        rows.append(row)
    return pd.DataFrame(rows)
