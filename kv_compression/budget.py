"""Budgets: how many cached tokens each layer keeps, and which ones a policy's scores select.

A budget is a ratio of the cached tokens in (0, 1] or an absolute token count (an integer >= 1, at
most the number of cached tokens). Per layer, the policy spreads it (uniform, or PyramidKV's
pyramid); each KV head then keeps its top-scoring tokens, the same number in every head of a layer
(so the kept entries stay one dense tensor), ties going to the most recent tokens. Sliding-window
layers keep their window: they are left out of compression.

Per-head allocation (AdaKV, Feng et al., arXiv 2407.11550) instead pools a layer's budget over its
KV heads: every head keeps its top ``floor`` share of the uniform per-head budget, and the rest of
the layer's ``heads x budget`` slots go to the highest scores across all heads. Heads then keep
different numbers of tokens, which a dense cache tensor cannot hold: `kept_masks` gives those sets
for the tracer (measurement, `score`), and the runtime refuses per-head budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from forward_influence.errors import InputError
from forward_influence.eviction import EvictionSpec
from forward_influence.observation import Observation

from .policies import Policy


@dataclass(frozen=True)
class Budget:
    """Kept tokens per layer: a ratio ``value`` in (0, 1] (``is_ratio``) or a token count.

    `parse` reads ``"0.25"`` or ``"1.0"`` as ratios and ``"256"`` (digits only) as a count.
    `head_floor` (in [0, 1], or None for uniform heads) turns on per-head allocation (AdaKV).
    """

    value: float
    is_ratio: bool
    head_floor: float | None = None

    def __post_init__(self) -> None:
        if self.head_floor is not None and not 0 <= self.head_floor <= 1:
            raise InputError(f"the per-head floor must lie in [0, 1], got {self.head_floor}")

    @classmethod
    def parse(cls, text: str | float, head_floor: float | None = None) -> "Budget":
        """``"0.25"`` (a ratio) or ``"256"`` (a count); raises `InputError` on anything else."""
        raw = str(text).strip()
        try:
            number = float(raw)
        except ValueError:
            raise InputError(f"budget must be a ratio in (0, 1] or a token count, got {raw!r}") from None
        is_count = raw.isdigit()
        if number <= 0:
            raise InputError(f"budget must be positive, got {raw}")
        if not is_count and number > 1:
            raise InputError(f"a budget ratio must lie in (0, 1], got {raw}")
        return cls(number, not is_count, head_floor)

    def tokens(self, n_tokens: int) -> int:
        """Kept tokens for a cache of `n_tokens` (a ratio rounds up, so 1% of 10 tokens keeps one)."""
        if self.is_ratio:
            return max(1, math.ceil(self.value * n_tokens - 1e-9))
        if self.value > n_tokens:
            raise InputError(f"budget of {int(self.value)} tokens is larger than the sequence ({n_tokens} tokens)")
        return int(self.value)


def kept_masks(
    policy: Policy, obs: Observation, budget: Budget, scores: list[torch.Tensor | None] | None = None
) -> list[torch.Tensor | None]:
    """Per layer, a boolean ``[batch, kv_heads, tokens]`` mask of the kept cache entries (None for
    sliding-window layers); with a per-head budget heads may keep different numbers of tokens.
    `scores` as in `kept_indices`."""
    scores = layer_scores(policy, obs) if scores is None else scores
    if budget.head_floor is None:
        masks = []
        for index, view in zip(kept_indices(policy, obs, budget, scores), obs.layers):
            if index is None:
                masks.append(None)
                continue
            mask = torch.zeros(view.keys.shape[:3], dtype=torch.bool, device=index.device)
            masks.append(mask.scatter_(-1, index, True))
        return masks
    uniform = kept_indices(policy, obs, Budget(budget.value, budget.is_ratio), scores)
    masks = []
    for layer, index in enumerate(uniform):
        if index is None:
            masks.append(None)
            continue
        layer_score = scores[layer]
        b, heads, n = layer_score.shape
        k = index.shape[-1]
        floor = int(budget.head_floor * k)
        mask = torch.zeros_like(layer_score, dtype=torch.bool)
        if floor:
            mask.scatter_(-1, layer_score.topk(floor, dim=-1).indices, True)
        rest = layer_score.masked_fill(mask, float("-inf")).reshape(b, heads * n)
        pooled = rest.topk(heads * k - heads * floor, dim=-1).indices
        mask.view(b, heads * n).scatter_(-1, pooled, True)
        masks.append(mask)
    return masks


def layer_scores(policy: Policy, obs: Observation) -> list[torch.Tensor | None]:
    """Per layer, the policy's scores ``[batch, kv_heads, tokens]``, or None for sliding-window layers."""
    return [None if view.sliding_window is not None else policy.score(obs, layer) for layer, view in enumerate(obs.layers)]


def kept_indices(
    policy: Policy, obs: Observation, budget: Budget, scores: list[torch.Tensor | None] | None = None
) -> list[torch.Tensor | None]:
    """Per layer, the kept cache indices ``[batch, kv_heads, k]`` in ascending order, or None for
    sliding-window layers (left to their window). Uniform heads only (see `kept_masks`).
    `scores` (from `layer_scores`) saves scoring again when the caller has them."""
    scores = layer_scores(policy, obs) if scores is None else scores
    if budget.head_floor is not None:
        raise InputError("per-head budgets keep different numbers of tokens per head; use kept_masks")
    full = [l for l, view in enumerate(obs.layers) if view.sliding_window is None]
    n = obs.num_tokens(full[0]) if full else 0
    per_layer = policy.layer_budgets(budget.tokens(n), len(obs.layers))
    kept = []
    for layer, k in enumerate(per_layer):
        if obs.layers[layer].sliding_window is not None:
            kept.append(None)
            continue
        n = obs.num_tokens(layer)
        # Ties (protected tokens score +inf alike) go to the most recent: sort newest first, then
        # stably by score.
        newest_first = obs.layers[layer].positions.argsort(dim=-1, descending=True)
        order = scores[layer].gather(-1, newest_first).sort(dim=-1, descending=True, stable=True).indices
        top = newest_first.gather(-1, order[..., : min(max(k, 1), n)])
        kept.append(top.sort(dim=-1).values)
    return kept


def eviction_specs(kept: list[torch.Tensor | None], obs: Observation, time: int) -> list[EvictionSpec]:
    """The evictions behind `kept` (batch row 0; index tensors from `kept_indices` or boolean masks
    from `kept_masks`) as tracer specs at eviction time `time`: one spec per layer and KV head whose
    set is not empty, so the tracer can measure or replay a policy's choice."""
    specs = []
    for layer, chosen in enumerate(kept):
        if chosen is None:
            continue
        positions = obs.layers[layer].positions[0]
        for head in range(chosen.shape[1]):
            row = chosen[0, head]
            keep = set(positions[head][row].tolist() if row.dtype == torch.bool else positions[head, row].tolist())
            evicted = tuple(p for p in positions[head].tolist() if p not in keep)
            if evicted:
                specs.append(EvictionSpec(evicted, time, layers=(layer,), heads=(head,)))
    return specs


def token_view(policy: Policy, obs: Observation, budget: Budget) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token ``[tokens]`` (batch 0): the policy's score averaged over the compressed layers and KV
    heads (+inf where it always keeps the token), and the share of those layer x head slots that keep it."""
    scores = layer_scores(policy, obs)
    kept = kept_masks(policy, obs, budget, scores)
    layers = [l for l, mask in enumerate(kept) if mask is not None]
    stacked = torch.stack([scores[l][0] for l in layers])  # [layers, kv_heads, tokens]
    share = torch.stack([kept[l][0] for l in layers]).float().mean(dim=(0, 1))
    return stacked.mean(dim=(0, 1)), share
