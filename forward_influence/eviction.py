"""Eviction masks: which cached keys each query may still see.

Evicting a set S at time t means every query after t loses the keys in S, in the chosen layers and
KV heads, while queries up to t are untouched (their own keys and values already carry S). This
module turns such specs into additive attention masks, one per layer, of shape
``[batch, heads or 1, queries, keys]`` with 0 where a key is visible and the dtype's minimum where it
is hidden. The causal rule and each layer's sliding window are part of the mask, so the model's own
mask is replaced, not combined.

Masking key positions S for queries after t is exactly physical eviction at t (prefill 0..t,
delete S from the cache, continue with the original positions): `forward_influence.verify` checks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from .errors import InputError


@dataclass(frozen=True)
class EvictionSpec:
    """Evict `positions` at eviction time `time`, in `layers` (None: all) and KV `heads` (None: all).

    Queries at positions > `time` lose the keys at `positions`; every position must be <= `time`.
    Heads are KV heads: evicting one hides the entry from every query head of its group.
    """

    positions: tuple[int, ...]
    time: int
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if any(p > self.time or p < 0 for p in self.positions):
            raise InputError(f"evicted positions must lie in [0, {self.time}] (the eviction time)")


@dataclass(frozen=True)
class AttentionLayout:
    """The attention geometry a mask must match: layers, heads and each layer's sliding window."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    windows: tuple[int | None, ...]

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> AttentionLayout:
        config = config.get_text_config(decoder=True)
        n = config.num_hidden_layers
        types = getattr(config, "layer_types", None) or ["full_attention"] * n
        window = getattr(config, "sliding_window", None)
        windows = tuple(window if kind == "sliding_attention" and window else None for kind in types)
        heads = config.num_attention_heads
        return cls(n, heads, getattr(config, "num_key_value_heads", None) or heads, windows)

    @property
    def full_layers(self) -> list[int]:
        """The full-attention layers (no sliding window): the ones a compression policy evicts from."""
        return [layer for layer, window in enumerate(self.windows) if window is None]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check(self, spec: EvictionSpec) -> None:
        if spec.layers is not None and any(not 0 <= l < self.num_layers for l in spec.layers):
            raise InputError(f"layers must lie in [0, {self.num_layers - 1}]", "layers")
        if spec.heads is not None and any(not 0 <= h < self.num_kv_heads for h in spec.heads):
            raise InputError(f"KV heads must lie in [0, {self.num_kv_heads - 1}]")


def build_masks(
    layout: AttentionLayout,
    specs: Sequence[EvictionSpec | Sequence[EvictionSpec] | None],
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Additive masks, one per layer, for a batch whose row b carries `specs[b]`.

    A row's entry is one spec, a sequence of specs (each hides its own positions from the queries
    after its own time, e.g. the successive compressions of a generation), or None (no eviction).

    Parameters
    ----------
    query_positions:
        ``[batch, queries]`` original positions of the queries.
    key_positions:
        ``[batch, keys]`` original positions of the keys, in cache order.
    key_valid:
        ``[batch, keys]`` False for keys a row must never see (e.g. cached keys after its eviction
        time, which that row recomputes itself).

    Layers with the same rule share one tensor, so an all-layer eviction costs one mask per window size.
    """
    device = query_positions.device
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    visible = k <= q
    if key_valid is not None:
        visible = visible & key_valid[:, None, :]
    hidden_value = torch.finfo(dtype).min
    row_specs = [[] if s is None else [s] if isinstance(s, EvictionSpec) else list(s) for s in specs]
    shared: dict[tuple, torch.Tensor] = {}
    masks = []
    for layer, window in enumerate(layout.windows):
        rows = tuple(
            (b, i, spec.heads)
            for b, row in enumerate(row_specs)
            for i, spec in enumerate(row)
            if spec.positions and (spec.layers is None or layer in spec.layers)
        )
        key = (window, rows)
        if key not in shared:
            allowed = visible if window is None else visible & (q - k < window)
            allowed = allowed[:, None]  # [B, 1, Q, K]
            if rows:
                per_head = any(heads is not None for _, _, heads in rows)
                n_heads = layout.num_heads if per_head else 1
                hide = torch.zeros(len(specs), n_heads, *allowed.shape[2:], dtype=torch.bool, device=device)
                for b, i, heads in rows:
                    spec = row_specs[b][i]
                    evicted = torch.isin(key_positions[b], torch.tensor(spec.positions, device=device))
                    row_hide = (query_positions[b] > spec.time)[:, None] & evicted[None, :]  # [Q, K]
                    g = layout.group_size
                    for h in range(layout.num_kv_heads) if heads is not None else [None]:
                        if h is None:
                            hide[b] |= row_hide
                        elif h in heads:
                            hide[b, h * g : (h + 1) * g] |= row_hide
                allowed = allowed & ~hide
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            shared[key] = mask.masked_fill_(~allowed, hidden_value)
        masks.append(shared[key])
    return masks


def evictions(held: torch.Tensor, kept: torch.Tensor, time: int, layer: int) -> list[EvictionSpec]:
    """The specs behind one layer's choice: per KV head h, the positions of ``held[h]`` not in
    ``kept[h]``, evicted at `time` in that layer and head alone (heads without an eviction are left out).

    `held` is ``[kv_heads, n]`` (the original positions a layer held before the choice); `kept` is
    ``[kv_heads, k]`` kept positions, or a boolean ``[kv_heads, n]`` mask over `held`.
    """
    specs = []
    for head in range(held.shape[0]):
        keep = held[head][kept[head]] if kept.dtype == torch.bool else kept[head]
        evicted = held[head][~torch.isin(held[head], keep)]
        if evicted.numel():
            specs.append(EvictionSpec(tuple(evicted.tolist()), time, layers=(layer,), heads=(head,)))
    return specs
