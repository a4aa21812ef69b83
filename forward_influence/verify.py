"""Masking == physical eviction: the check to run before trusting the tracer on a new architecture.

The reference evicts physically, the way a compressed cache does at run time: it prefills positions
0..t into a transformers `DynamicCache` (with the model's own sliding-window layers), deletes the
evicted entries from the chosen layers' cache tensors, then decodes the rest of the trace one token
at a time with the original position ids. Per-KV-head eviction cannot shorten one head of a cache
tensor, so there the reference attends, per KV head, over a physically gathered subset of its keys
and values (an attention function registered with transformers' `AttentionInterface`).

The tracer's path is the one Forward Influence measurements use: a cached clean prefix and one
batched, masked pass over the suffix. `verify` runs all-layer, per-layer and per-head eviction and
reports the largest absolute logit difference of each; in float32 they agree to well under 1e-3.

Sliding-window layers keep only their window in the reference cache, so the evicted positions are
chosen older than every window (they are gone from those layers either way).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pandas as pd
import torch
from transformers import AttentionInterface, DynamicCache

from .errors import InputError
from .eviction import EvictionSpec, build_masks
from .logits import logits_of
from .models import attention_implementation, cache_argument
from .tracer import Tracer, expand_cache

TOLERANCE = 1e-3
# Half precision rounds the batched masked pass and the token-by-token physical decode differently:
# bfloat16 keeps 8 bits of mantissa (about 0.4% of a logit of 5), float16 11 bits.
TOLERANCES = {torch.float32: TOLERANCE, torch.bfloat16: 0.25, torch.float16: 0.05}
_PHYSICAL = "forward_influence_physical"
# layer index -> {kv head: kept key indices}; read by the registered attention function.
_KEPT_PER_HEAD: dict[int, dict[int, torch.Tensor]] = {}


def _physical_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over each KV head's own kept keys (query length 1: every kept key is visible)."""
    kept = _KEPT_PER_HEAD.get(module.layer_idx, {})
    group = query.shape[1] // key.shape[1]
    outputs = []
    for h in range(key.shape[1]):
        k, v = key[:, h : h + 1], value[:, h : h + 1]
        if h in kept:
            k, v = k[:, :, kept[h]], v[:, :, kept[h]]
        q = query[:, h * group : (h + 1) * group]
        outputs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling))
    return torch.cat(outputs, dim=1).transpose(1, 2).contiguous(), None


AttentionInterface.register(_PHYSICAL, _physical_attention)


def physical_logits(tracer: Tracer, ids: torch.Tensor, spec: EvictionSpec) -> torch.Tensor:
    """Logits ``[tokens after t, vocab]`` of decoding `ids` (1-D) past t with `spec` evicted physically."""
    model, t = tracer.model, spec.time
    layers = range(tracer.layout.num_layers) if spec.layers is None else spec.layers
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(ids[None, : t + 1].to(tracer.device), **cache_argument(cache), use_cache=True)
            _KEPT_PER_HEAD.clear()
            for layer in layers:
                if tracer.layout.windows[layer] is not None:
                    continue  # the evicted positions already left this layer's window
                kept = torch.tensor([p for p in range(t + 1) if p not in set(spec.positions)], device=tracer.device)
                if spec.heads is None:
                    cache.layers[layer].keys = cache.layers[layer].keys[:, :, kept]
                    cache.layers[layer].values = cache.layers[layer].values[:, :, kept]
                else:
                    # Keys appended after t stay visible: extend the kept set as decoding goes.
                    _KEPT_PER_HEAD[layer] = {h: kept for h in spec.heads}
            logits = []
            with attention_implementation(model, _PHYSICAL):
                for position in range(t + 1, ids.shape[0]):
                    for layer_kept in _KEPT_PER_HEAD.values():
                        for h, kept in layer_kept.items():
                            layer_kept[h] = torch.cat([kept, torch.tensor([position], device=kept.device)])
                    out = model(
                        ids[None, position : position + 1].to(tracer.device),
                        position_ids=torch.tensor([[position]], device=tracer.device),
                        **cache_argument(cache),
                        use_cache=True,
                    )
                    logits.append(out.logits[0, -1].float())
    finally:
        _KEPT_PER_HEAD.clear()
    return torch.stack(logits)


def masked_logits(tracer: Tracer, ids: torch.Tensor, spec: EvictionSpec) -> torch.Tensor:
    """Logits ``[tokens after t, vocab]`` from the tracer's cached-prefix, masked-suffix pass."""
    t, n = spec.time, ids.shape[0]
    prefix = tracer.run(ids[None, : t + 1], use_cache=True)
    cache = expand_cache(prefix.cache, t + 1, 1)
    query_positions = torch.arange(t + 1, n, device=tracer.device)[None]
    key_positions = torch.arange(n, device=tracer.device)[None]
    masks = build_masks(tracer.layout, [spec], query_positions, key_positions, dtype=tracer.dtype)
    out = tracer.run(ids[None, t + 1 :], position_ids=query_positions, masks=masks, cache=cache)
    return logits_of(tracer.model, out.final[0])


@dataclass(frozen=True)
class Case:
    name: str
    spec: EvictionSpec


def verification_cases(tracer: Tracer, length: int, seed: int = 0) -> list[Case]:
    """All-layer, per-layer and per-head evictions of a few positions, older than every sliding window."""
    layout = tracer.layout
    windows = [w for w in layout.windows if w is not None]
    t = length - max(4, min(16, length // 4)) - 1  # decode up to 16 tokens after t
    oldest = t - (min(windows) if windows else 0)
    if oldest < 4:
        raise InputError(f"a trace of {length} tokens is too short to verify this model; use a longer one")
    rng = random.Random(seed)
    positions = tuple(sorted(rng.sample(range(1, oldest), k=min(3, oldest - 1))))
    full_layers = layout.full_layers
    some_layers = tuple(full_layers[:: max(1, len(full_layers) // 3)][:3])
    return [
        Case("all layers", EvictionSpec(positions, t)),
        Case("per layer", EvictionSpec(positions, t, layers=some_layers)),
        Case("per head", EvictionSpec(positions, t, layers=some_layers, heads=(layout.num_kv_heads - 1,))),
    ]


def verify(tracer: Tracer, ids: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    """Max |logit difference| between masked and physical eviction for each case, with the effect size.

    Columns: ``case, positions, time, layers, heads, max_abs_diff, max_effect, ok``, where
    ``max_effect`` is the largest logit change the eviction itself causes (so a reader sees the check
    is not vacuous) and ``ok`` is ``max_abs_diff`` below the model dtype's tolerance (`TOLERANCES`).
    """
    rows = []
    clean = None
    for case in verification_cases(tracer, ids.shape[0], seed):
        spec = case.spec
        masked = masked_logits(tracer, ids, spec)
        physical = physical_logits(tracer, ids, spec)
        if clean is None:
            clean = physical_logits(tracer, ids, EvictionSpec((), spec.time))
        diff = (masked - physical).abs().max().item()
        rows.append(
            dict(
                case=case.name,
                positions=" ".join(map(str, spec.positions)),
                time=spec.time,
                layers="all" if spec.layers is None else " ".join(map(str, spec.layers)),
                heads="all" if spec.heads is None else " ".join(map(str, spec.heads)),
                max_abs_diff=diff,
                max_effect=(physical - clean).abs().max().item(),
                ok=diff < TOLERANCES.get(tracer.dtype, TOLERANCE),
            )
        )
    return pd.DataFrame(rows)
