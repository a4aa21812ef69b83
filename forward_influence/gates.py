"""Soft eviction: a gate per (layer, KV head, cached token) that the future's divergence is differentiable in.

Evicting is all or nothing: after the eviction time t a cached key is visible or hidden. A gate g in
[0, 1] relaxes that choice. For every query after t, the attention logit of cached key j in layer l
and KV head h (every query head of its group) is shifted by ``log g[l, h, j]``, so the key's attention
weight is multiplied by g before the softmax renormalises. g = 1 is the full cache and g = 0 is
eviction: hard 0/1 gates give exactly the masks of `forward_influence.eviction` (tested against
`evict`). Queries up to t are untouched, as with eviction. The shift goes through the tracer's own
masks (`Tracer.run` with ``grad=True``), so it works under eager and sdpa attention alike.

A gated pass starts from the clean run's cache of positions 0..t (computed once, without gradients),
runs the next D positions with autograd on and compares them with the clean run, so one backward
gives the gradient of the divergence with respect to every gate of every layer and head at once.
Gates are float32 ``[batch, layers, kv_heads, t + 1]``, one set per batch row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InputError
from .eviction import EvictionSpec, build_masks
from .influence import CleanRun
from .logits import kl_and_agreement, logits_of
from .tracer import Tracer, expand_cache

CLOSED = torch.finfo(torch.float32).tiny


def full_gates(tracer: Tracer, time: int, batch: int = 1) -> torch.Tensor:
    """All-ones gates ``[batch, layers, kv_heads, time + 1]``: the full cache."""
    layout = tracer.layout
    return torch.ones(batch, layout.num_layers, layout.num_kv_heads, time + 1, device=tracer.device)


def hard_gates(tracer: Tracer, rows: Sequence[Sequence[EvictionSpec]], time: int) -> torch.Tensor:
    """The 0/1 gates ``[len(rows), layers, kv_heads, time + 1]`` of eviction specs at `time` (0 where a
    row's specs evict a position in a layer and KV head): what `evict` masks, as gates."""
    gates = full_gates(tracer, time, len(rows))
    for row, specs in enumerate(rows):
        for spec in specs:
            if spec.time != time:
                raise InputError(f"gates hold one eviction time ({time}); a spec evicts at {spec.time}")
            tracer.layout.check(spec)
            layers = spec.layers if spec.layers is not None else range(gates.shape[1])
            heads = spec.heads if spec.heads is not None else range(gates.shape[2])
            positions = torch.tensor(spec.positions, dtype=torch.long, device=gates.device)
            for layer in layers:
                for head in heads:
                    gates[row, layer, head, positions] = 0.0
    return gates


def gate_masks(tracer: Tracer, gates: torch.Tensor, query_positions: torch.Tensor) -> list[torch.Tensor]:
    """Additive masks ``[batch, heads, queries, t + 1 + queries]``, one per layer, for queries after t whose
    keys are the cached positions 0..t (gated) followed by the queries themselves (causal, ungated).

    The causal rule and sliding windows come from `build_masks`; each layer adds ``log g`` of its KV
    heads, repeated over their query heads, to the cached keys' columns.
    """
    batch, n_layers, _, n_cached = gates.shape
    layout = tracer.layout
    cached = torch.arange(n_cached, device=gates.device).expand(batch, -1)
    base = build_masks(layout, [None] * batch, query_positions, torch.cat([cached, query_positions], dim=1))
    # A closed gate weighs its key by float32's smallest normal (1e-38) rather than 0: invisible beside
    # any float32 rounding, and its logarithm and gradient stay finite.
    log_gates = gates.clamp_min(CLOSED).log().repeat_interleave(layout.group_size, dim=2)  # [B, L, heads, t + 1]
    suffix = torch.zeros(*log_gates.shape[:3], query_positions.shape[1], device=gates.device)
    shift = torch.cat([log_gates, suffix], dim=-1)[:, :, :, None, :]  # [B, L, heads, 1, keys]
    return [(base[layer] + shift[:, layer]).to(tracer.dtype) for layer in range(n_layers)]


def _gated_final(
    tracer: Tracer, clean: CleanRun, gates: torch.Tensor, distance: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final states ``[batch, distance, hidden]`` of the gated pass and the positions they predict from."""
    time = gates.shape[-1] - 1
    n_tokens = clean.token_ids.shape[0]
    if time + distance >= n_tokens:
        raise InputError(f"distance {distance} after the eviction time {time} runs past the trace ({n_tokens} tokens)")
    batch = gates.shape[0]
    positions = torch.arange(time + 1, time + 1 + distance, device=tracer.device)
    query_positions = positions.expand(batch, -1)
    readout = tracer.run(
        clean.token_ids.to(tracer.device)[positions].expand(batch, -1),
        position_ids=query_positions,
        masks=gate_masks(tracer, gates, query_positions),
        cache=expand_cache(clean.cache, time + 1, batch),
        grad=True,
    )
    return readout.final, positions


def gated_kl(tracer: Tracer, clean: CleanRun, gates: torch.Tensor, distance: int) -> torch.Tensor:
    """KL(clean || gated) ``[batch, distance]`` (nats) of the next-token distributions at distances
    1..`distance` after the eviction time ``t = gates.shape[-1] - 1``, differentiable in `gates`.
    `clean` must cover at least ``t + distance + 1`` tokens."""
    final, positions = _gated_final(tracer, clean, gates, distance)
    batch = final.shape[0]
    kl, _, _ = kl_and_agreement(tracer.model, clean.references, positions.repeat(batch), final.flatten(0, 1))
    return kl.view(batch, distance)


def gated_log_probs(tracer: Tracer, clean: CleanRun, gates: torch.Tensor, distance: int) -> torch.Tensor:
    """Next-token log-probabilities ``[batch, distance, vocab]`` of the gated pass at distances
    1..`distance` after the eviction time, differentiable in `gates` (as `gated_kl`)."""
    final, _ = _gated_final(tracer, clean, gates, distance)
    return torch.log_softmax(logits_of(tracer.model, final), dim=-1)
