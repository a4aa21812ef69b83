"""Forward Influence: evict a set of cached tokens at time t and measure how the future diverges.

For a trace, the clean run (no eviction) is computed once, with its cache. An eviction spec with time
t can only change queries after t, so its run starts from the clean cache of positions 0..t and
computes the next D positions (the suffix) with the spec's masks. Many specs are evaluated as the
rows of one batched pass; rows may have different eviction times (the per-token scan gives every row
its own t), in which case the shared cache covers the latest t and each row masks the cached keys
after its own t, which it recomputes in its suffix.

Against the clean run, per query position q = t + d: ``kl`` = KL(p_clean(q) || p_evicted(q)) of the
next-token distributions (nats), ``top1_agreement`` (1 when both predict the same token), and per layer
``hidden_cos`` (1 - cosine) and ``hidden_rel_l2`` (relative L2 distance) of the residual stream after
that layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .eviction import EvictionSpec, build_masks
from .logits import References, hidden_divergence, kl_and_agreement, references
from .tracer import Tracer, expand_cache


@dataclass
class CleanRun:
    """The unevicted run of a trace: final states ``[tokens, hidden]``, residual stream
    ``[layers + 1, tokens, hidden]`` (or None), the cache of every position and the summaries of its
    next-token distributions used for KL (`forward_influence.logits.References`)."""

    token_ids: torch.Tensor
    final: torch.Tensor
    hidden: torch.Tensor | None
    cache: DynamicCache
    references: References


def clean_run(tracer: Tracer, token_ids: Sequence[int] | torch.Tensor, hidden: bool = True) -> CleanRun:
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    readout = tracer.run(ids[None], use_cache=True, hidden=hidden)
    final = readout.final[0]
    states = None if readout.hidden is None else readout.hidden[:, 0]
    return CleanRun(ids, final, states, readout.cache, references(tracer.model, final, ids))


@dataclass
class Divergence:
    """Divergence of each evicted run from the clean run, by distance d = 1..D after its eviction time.

    kl, top1_agreement: ``[specs, D]``; nll_increase ``[specs, D]``: increase in the negative
    log-likelihood of the token that follows each query (NaN at the trace's last position);
    hidden_cos, hidden_rel_l2: ``[specs, layers, D]`` or None. Entries whose query would lie past
    the end of the trace are NaN.
    """

    kl: np.ndarray
    top1_agreement: np.ndarray
    nll_increase: np.ndarray | None = None
    hidden_cos: np.ndarray | None = None
    hidden_rel_l2: np.ndarray | None = None

    @property
    def distance(self) -> np.ndarray:
        return np.arange(1, self.kl.shape[1] + 1)


def evict(
    tracer: Tracer,
    clean: CleanRun,
    specs: Sequence[EvictionSpec | Sequence[EvictionSpec]],
    max_distance: int,
    batch_size: int = 8,
    hidden: bool = True,
    progress: bool = False,
    chunk: int | None = None,
) -> Divergence:
    """Run every row for `max_distance` positions after its eviction time; compare with `clean`.

    A row is one spec or several (e.g. a policy's per-layer, per-head choices); a row's eviction
    time is the earliest of its specs'. `chunk` runs the suffix `chunk` query positions at a time, each
    piece attending to the cache the earlier ones extended (the same numbers; the masks then take
    ``chunk x keys`` per row instead of ``suffix x keys``, which long suffixes need).
    """
    n_tokens = clean.token_ids.shape[0]
    n_layers = tracer.layout.num_layers
    row_times = []
    for row in specs:
        row = [row] if isinstance(row, EvictionSpec) else list(row)
        for spec in row:
            tracer.layout.check(spec)
        time = min((spec.time for spec in row), default=-1)
        if time < 0 or time >= n_tokens - 1:
            raise ValueError(f"eviction time {time} leaves no position after it (trace has {n_tokens} tokens)")
        row_times.append(time)
    hidden = hidden and clean.hidden is not None
    kl = np.full((len(specs), max_distance), np.nan)
    agree = np.full_like(kl, np.nan)
    nll = np.full_like(kl, np.nan)
    cos = np.full((len(specs), n_layers, max_distance), np.nan) if hidden else None
    rel = np.full_like(cos, np.nan) if hidden else None
    device = tracer.device
    batches = range(0, len(specs), batch_size)
    for start in tqdm(batches, desc="evict", unit="batch", disable=not progress, leave=False):
        rows = list(specs[start : start + batch_size])
        times = torch.tensor(row_times[start : start + batch_size], device=device)
        length = min(max_distance, n_tokens - 1 - int(times.min()))
        n_cached = int(times.max()) + 1
        offsets = torch.arange(1, length + 1, device=device)
        query_positions = times[:, None] + offsets[None]  # [B, D]
        valid = query_positions < n_tokens
        gather = query_positions.clamp(max=n_tokens - 1)
        input_ids = clean.token_ids.to(device)[gather]
        cached = torch.arange(n_cached, device=device).expand(len(rows), -1)
        key_positions = torch.cat([cached, query_positions], dim=1)
        key_valid = torch.cat([cached <= times[:, None], valid], dim=1)
        cache = expand_cache(clean.cache, n_cached, len(rows))
        finals, states = [], []
        for piece in range(0, length, chunk or length):
            end = min(length, piece + (chunk or length))
            keys = n_cached + end
            masks = build_masks(
                tracer.layout,
                rows,
                query_positions[:, piece:end],
                key_positions[:, :keys],
                key_valid[:, :keys],
                tracer.dtype,
            )
            out = tracer.run(
                input_ids[:, piece:end],
                position_ids=query_positions[:, piece:end],
                masks=masks,
                cache=cache,
                hidden=hidden,
            )
            finals.append(out.final)
            states.append(out.hidden)
        final = torch.cat(finals, dim=1)
        row_kl, row_agree, row_nll = kl_and_agreement(tracer.model, clean.references, gather[valid], final[valid])
        b, d = valid.nonzero(as_tuple=True)
        index = (b + start).cpu().numpy(), (d).cpu().numpy()
        kl[index] = row_kl.cpu().numpy()
        agree[index] = row_agree.float().cpu().numpy()
        last = gather[valid] == n_tokens - 1  # no following token to score
        nll[index] = torch.where(last, torch.nan, row_nll).cpu().numpy()
        if hidden:
            # Residual stream after each layer: [layers, B, D, hidden] vs the clean run at the same positions.
            layer_cos, layer_rel = hidden_divergence(
                clean.hidden[1:][:, gather[valid]], torch.cat(states, dim=2)[1:][:, valid]
            )
            cos[index[0], :, index[1]] = layer_cos.T.cpu().numpy()
            rel[index[0], :, index[1]] = layer_rel.T.cpu().numpy()
    return Divergence(kl, agree, nll, cos, rel)


LAYER_BANDS = ("early", "middle", "late")


def per_distance_frame(divergence: Divergence, labels: Sequence[str], document: str, time: int) -> pd.DataFrame:
    """Long table ``document, selection, time, distance, kl, top1_agreement, hidden_cos, hidden_rel_l2``.

    The hidden-state columns are means over layers (NaN when hidden states were not read);
    ``hidden_cos_early``, ``hidden_cos_middle`` and ``hidden_cos_late`` are the means over each third
    of the layers (`LAYER_BANDS`; an empty band, with fewer than three layers, takes the first).
    """
    n_specs, n_dist = divergence.kl.shape
    frame = pd.DataFrame(
        {
            "document": document,
            "selection": np.repeat(list(labels), n_dist),
            "time": time,
            "distance": np.tile(divergence.distance, n_specs),
            "kl": divergence.kl.ravel(),
            "top1_agreement": divergence.top1_agreement.ravel(),
        }
    )
    for name in ("hidden_cos", "hidden_rel_l2"):
        values = getattr(divergence, name)
        frame[name] = np.nan if values is None else np.nanmean(values, axis=1).ravel()
    cos = divergence.hidden_cos
    if cos is not None:
        bands = np.array_split(np.arange(cos.shape[1]), len(LAYER_BANDS))
        bands = [band if len(band) else bands[0] for band in bands]
    for index, band in enumerate(LAYER_BANDS):
        frame[f"hidden_cos_{band}"] = np.nan if cos is None else np.nanmean(cos[:, bands[index]], axis=1).ravel()
    return frame.dropna(subset=["kl"]).reset_index(drop=True)
