"""Per-token Forward Influence: each token evicted alone, the moment it is produced.

For every position j in ``[start, end)``, the spec ``S = {j}, t = j`` is evaluated for distances
``d = 1..D`` (queries j+1 .. j+D). The clean run and its cache are computed once for the whole trace;
each batch of consecutive positions shares that cache (no prefix is recomputed per token) and runs
only D query positions per token.

Summaries per token (KL in nats):

- ``fi_near``: mean KL over d = 1..8,
- ``fi_far``: mean KL over d = 33..D (NaN when D <= 32),
- ``fi_total``: sum of the KL over d = 1..D (the token's total influence within D).

Distances past the end of the trace are left out of each mean and sum.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .errors import InputError
from .eviction import EvictionSpec
from .influence import CleanRun, Divergence, clean_run, evict
from .tracer import Tracer

NEAR = (1, 8)
FAR_FROM = 33


def scan_divergence(
    tracer: Tracer,
    token_ids: Sequence[int] | torch.Tensor,
    start: int,
    end: int,
    max_distance: int,
    batch_size: int = 16,
    clean: CleanRun | None = None,
    progress: bool = False,
) -> Divergence:
    """KL and top-1 agreement ``[end - start, max_distance]`` for each token evicted at its own time."""
    n = len(token_ids)
    if not 0 <= start < end <= n - 1:
        raise InputError(f"scan range [{start}, {end}) must lie in [0, {n - 1}) for a trace of {n} tokens")
    if max_distance < 1:
        raise InputError(f"--max-distance must be at least 1, got {max_distance}")
    if clean is None:
        clean = clean_run(tracer, token_ids[: min(n, end + max_distance)], hidden=False)
    specs = [EvictionSpec((j,), j) for j in range(start, end)]
    return evict(tracer, clean, specs, max_distance, batch_size=batch_size, hidden=False, progress=progress)


def fi_summary(kl: np.ndarray) -> pd.DataFrame:
    """``fi_near, fi_far, fi_total`` from a ``[tokens, D]`` KL matrix (NaN past the trace end)."""
    d = np.arange(1, kl.shape[1] + 1)
    near = (d >= NEAR[0]) & (d <= NEAR[1])
    far = d >= FAR_FROM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows near the trace end are NaN
        return pd.DataFrame(
            {
                "fi_near": np.nanmean(kl[:, near], axis=1),
                "fi_far": np.nanmean(kl[:, far], axis=1) if far.any() else np.nan,
                "fi_total": np.nansum(kl, axis=1),
            }
        )


def scan(
    tracer: Tracer,
    token_ids: Sequence[int],
    start: int,
    end: int,
    max_distance: int,
    batch_size: int = 16,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per scanned token: ``position, token, fi_near, fi_far, fi_total``."""
    divergence = scan_divergence(tracer, token_ids, start, end, max_distance, batch_size, progress=progress)
    tokens = [tracer.tokenizer.decode([token_ids[j]]) for j in range(start, end)]
    frame = pd.DataFrame({"position": np.arange(start, end), "token": tokens})
    return pd.concat([frame, fi_summary(divergence.kl)], axis=1)
