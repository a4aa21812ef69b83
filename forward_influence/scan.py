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

At a common eviction time t instead (a compressor's view: every token of ``[start, end)`` evicted alone
at t, distances counted from t), `scan` measures exactly (`scan_at`, one replay per token) or
estimates from gradients (`forward_influence.gradient`, one pass for all tokens); positions after t
are NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from .defaults import FAR_FROM, GRADIENT_SAMPLES, NEAR, SCAN_METHODS
from .errors import InputError
from .eviction import EvictionSpec, build_masks
from .gradient import gradient_influence
from .influence import CleanRun, Divergence, clean_run, evict
from .tracer import Tracer


def check_range(start: int, end: int, n_tokens: int) -> None:
    """Refuse a scan range ``[start, end)`` outside a trace of `n_tokens` tokens."""
    if not 0 <= start < end <= n_tokens:
        raise InputError(f"scan range [{start}, {end}) must lie in [0, {n_tokens}] for a trace of {n_tokens} tokens")


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
    """KL and top-1 agreement ``[end - start, max_distance]`` for each token evicted at its own time.

    The last token of the trace has no later query: its row is NaN.
    """
    n = len(token_ids)
    check_range(start, end, n)
    if max_distance < 1:
        raise InputError(f"max_distance must be at least 1, got {max_distance}", "max_distance")
    if clean is None:
        clean = clean_run(tracer, token_ids[: min(n, end + max_distance)], hidden=False)
    specs = [EvictionSpec((j,), j) for j in range(start, min(end, n - 1))]
    result = evict(tracer, clean, specs, max_distance, batch_size=batch_size, hidden=False, progress=progress)
    missing = np.full((end - start - len(specs), max_distance), np.nan)
    return Divergence(np.vstack([result.kl, missing]), np.vstack([result.top1_agreement, missing]))


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


Method = Literal["exact", "gradient"]  # `SCAN_METHODS`


def common_time(n_tokens: int, end: int, max_distance: int) -> int:
    """The default common eviction time of a scan of ``[start, end)``: its last position, or earlier, so
    that `max_distance` positions of the trace follow it."""
    return min(end - 1, n_tokens - 1 - max_distance)


def scan(
    tracer: Tracer,
    token_ids: Sequence[int],
    start: int,
    end: int,
    max_distance: int,
    batch_size: int = 16,
    progress: bool = False,
    time: int | None = None,
    method: Method = "exact",
    samples: int = GRADIENT_SAMPLES,
) -> pd.DataFrame:
    """One row per scanned token: ``position, token, fi_near, fi_far, fi_total``.

    `time` None evicts each token at its own position (exact only); otherwise every token at the common
    eviction `time`, measured exactly or estimated from gradients by `method` (`samples` sampled
    continuations; the estimate has no ``fi_total``, and positions after `time` are NaN).
    """
    if method not in SCAN_METHODS:
        raise InputError(f"method must be one of {', '.join(SCAN_METHODS)}, got {method!r}", "method")
    n = len(token_ids)
    check_range(start, end, n)
    if time is None and method == "gradient":
        raise InputError("the gradient method estimates at a common eviction time: give time")
    if time is not None and not (start <= time < n - 1):
        raise InputError(f"time must lie in [start, {n - 2}] (a position follows it), got {time}", "time", "start")
    if time is None:
        kl = scan_divergence(tracer, token_ids, start, end, max_distance, batch_size, progress=progress).kl
        summary = fi_summary(kl)
    else:
        distance = min(max_distance, n - 1 - time)
        clean = clean_run(tracer, token_ids[: time + 1 + distance], hidden=False)
        positions = range(start, min(end, time + 1))
        if method == "exact":
            summary = fi_summary(scan_at(tracer, clean, time, positions, distance, batch_size, progress).kl)
        else:
            estimate = gradient_influence(tracer, clean, time, distance, samples).per_token()
            summary = estimate.iloc[list(positions)][["fi_near", "fi_far"]].reset_index(drop=True)
        summary = summary.reindex(range(end - start))
    tokens = [tracer.tokenizer.decode([token_ids[j]]) for j in range(start, end)]
    frame = pd.DataFrame({"position": np.arange(start, end), "token": tokens})
    return pd.concat([frame, summary], axis=1)


def naive_token_kl(
    tracer: Tracer,
    token_ids: Sequence[int],
    position: int,
    max_distance: int,
    clean_logits: torch.Tensor | None = None,
) -> np.ndarray:
    """The definition, computed the slow way: one full forward with token `position` masked from every
    later query, logits for every position, KL against the clean run at distances 1..D.

    Recomputes the whole prefix for each token; `scan_divergence` gives the same numbers without
    that. Used by the tests and by the benchmark as the baseline. `clean_logits` (``[tokens, vocab]``
    of the whole trace) saves the clean forward when many tokens are checked.
    """
    ids = torch.as_tensor(token_ids[: position + 1 + max_distance], dtype=torch.long)
    positions = torch.arange(len(ids), device=tracer.device)[None]
    masks = build_masks(tracer.layout, [EvictionSpec((position,), position)], positions, positions, dtype=tracer.dtype)
    mask = masks[0]
    if any(w is not None for w in tracer.layout.windows):
        # Hybrid models (Gemma3) take one mask per layer type.
        kinds = ["sliding_attention" if w is not None else "full_attention" for w in tracer.layout.windows]
        mask = {kind: masks[kinds.index(kind)] for kind in set(kinds)}
    with torch.no_grad():
        if clean_logits is None:
            clean_logits = tracer.model(ids[None].to(tracer.device)).logits[0].float()
        clean = clean_logits[position + 1 : len(ids)]
        evicted = tracer.model(ids[None].to(tracer.device), attention_mask=mask).logits[0, position + 1 :].float()
    p, q = torch.log_softmax(clean, -1), torch.log_softmax(evicted, -1)
    kl = np.full(max_distance, np.nan)
    kl[: len(p)] = (p.exp() * (p - q)).sum(-1).cpu().numpy()
    return kl


def scan_at(
    tracer: Tracer,
    clean: CleanRun,
    time: int,
    positions: Sequence[int],
    max_distance: int,
    batch_size: int = 16,
    progress: bool = False,
) -> Divergence:
    """KL and top-1 agreement ``[len(positions), max_distance]`` for each token of `positions` evicted
    alone at the common eviction time `time` (a compressor's view: what evicting one token now costs
    the next D positions). `clean` must cover at least ``time + max_distance + 1`` tokens."""
    if any(not 0 <= p <= time for p in positions):
        raise InputError(f"scanned positions must lie in [0, {time}] (the eviction time)")
    specs = [EvictionSpec((int(p),), time) for p in positions]
    return evict(tracer, clean, specs, max_distance, batch_size=batch_size, hidden=False, progress=progress)
