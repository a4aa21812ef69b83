"""Kept sets: which cached tokens a policy's scores select at a budget.

Per layer, the policy spreads the budget (uniform, or PyramidKV's pyramid); each KV head then keeps
its top-scoring tokens, the same number in every head of a layer (so the kept entries stay one dense
tensor), ties going to the most recent tokens. Sliding-window layers keep their window: they are left
out of compression. A `budgeted` policy scores for the number it keeps (`Policy.kept_scores`).

Per-head allocation (AdaKV, Feng et al., arXiv 2407.11550) instead pools a layer's budget over its
KV heads: every head keeps its top ``floor`` share of the uniform per-head budget, and the rest of
the layer's ``heads x budget`` slots go to the highest scores across all heads. Heads then keep
different numbers of tokens, which a dense cache tensor cannot hold: `kept_masks` gives those sets
for the tracer (measurement, `score`), and the runtime refuses per-head budgets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from forward_influence.errors import InputError
from forward_influence.eviction import EvictionSpec, evictions
from forward_influence.observation import Observation

from .budget import Budget
from .policies import Policy


def layer_scores(policy: Policy, obs: Observation, per_layer: list[int] | None = None) -> list[torch.Tensor | None]:
    """Per layer, the policy's scores ``[batch, kv_heads, tokens]``, or None for sliding-window layers;
    with `per_layer` (kept tokens per layer), the scores that keep that many (`Policy.kept_scores`)."""
    return [
        None
        if view.sliding_window is not None
        else policy.score(obs, layer)
        if per_layer is None
        else policy.kept_scores(obs, layer, per_layer[layer])
        for layer, view in enumerate(obs.layers)
    ]


def top_indices(obs: Observation, scores: list[torch.Tensor | None], per_layer: list[int]) -> list[torch.Tensor | None]:
    """Per layer, the cache indices ``[batch, kv_heads, k]`` of the `per_layer[l]` best scores in
    ascending order (None for sliding-window layers); ties (protected tokens score +inf alike) go to the
    most recent: sort newest first, then stably by score."""
    kept = []
    for layer, k in enumerate(per_layer):
        if scores[layer] is None:
            kept.append(None)
            continue
        newest_first = obs.layers[layer].positions.argsort(dim=-1, descending=True)
        order = scores[layer].gather(-1, newest_first).sort(dim=-1, descending=True, stable=True).indices
        top = newest_first.gather(-1, order[..., : min(max(k, 1), obs.num_tokens(layer))])
        kept.append(top.sort(dim=-1).values)
    return kept


def kept_indices(
    policy: Policy, obs: Observation, budget: Budget, scores: list[torch.Tensor | None] | None = None
) -> list[torch.Tensor | None]:
    """Per layer, the kept cache indices ``[batch, kv_heads, k]`` in ascending order, or None for
    sliding-window layers (left to their window). Uniform heads only (see `kept_masks`).
    `scores` (from `layer_scores`) saves scoring again when the caller has them (a `budgeted` policy
    scores for the budget anyway)."""
    if budget.head_floor is not None:
        raise InputError("per-head budgets keep different numbers of tokens per head; use kept_masks")
    per_layer, scores = _scored(policy, obs, budget, scores)
    return top_indices(obs, scores, per_layer)


def _scored(
    policy: Policy, obs: Observation, budget: Budget, scores: list[torch.Tensor | None] | None
) -> tuple[list[int], list[torch.Tensor | None]]:
    """The kept tokens per layer at `budget` and the scores that choose them (`scores` unless missing or
    the policy is `budgeted`)."""
    full = obs.full_layers
    n = obs.num_tokens(full[0]) if full else 0
    per_layer = policy.layer_budgets(budget.tokens(n), len(obs.layers))
    if scores is None or policy.budgeted:
        scores = layer_scores(policy, obs, per_layer)
    return per_layer, scores


def kept_masks(
    policy: Policy, obs: Observation, budget: Budget, scores: list[torch.Tensor | None] | None = None
) -> list[torch.Tensor | None]:
    """Per layer, a boolean ``[batch, kv_heads, tokens]`` mask of the kept cache entries (None for
    sliding-window layers); with a per-head budget heads may keep different numbers of tokens.
    `scores` as in `kept_indices`."""
    per_layer, scores = _scored(policy, obs, budget, scores)
    uniform = top_indices(obs, scores, per_layer)
    masks = []
    for layer, index in enumerate(uniform):
        if index is None:
            masks.append(None)
            continue
        mask = torch.zeros(obs.layers[layer].keys.shape[:3], dtype=torch.bool, device=index.device)
        if budget.head_floor is None:
            masks.append(mask.scatter_(-1, index, True))
            continue
        layer_score = scores[layer]
        b, heads, n = layer_score.shape
        k = index.shape[-1]
        floor = int(budget.head_floor * k)
        if floor:
            mask.scatter_(-1, layer_score.topk(floor, dim=-1).indices, True)
        rest = layer_score.masked_fill(mask, float("-inf")).reshape(b, heads * n)
        pooled = rest.topk(heads * k - heads * floor, dim=-1).indices
        mask.view(b, heads * n).scatter_(-1, pooled, True)
        masks.append(mask)
    return masks


def eviction_specs(kept: list[torch.Tensor | None], obs: Observation, time: int) -> list[EvictionSpec]:
    """The evictions behind `kept` (batch row 0; index tensors from `kept_indices` or boolean masks
    from `kept_masks`) as tracer specs at eviction time `time` (`forward_influence.eviction.evictions`),
    so the tracer can measure or replay a policy's choice."""
    specs = []
    for layer, chosen in enumerate(kept):
        if chosen is None:
            continue
        held = obs.layers[layer].positions[0]
        specs += evictions(held, chosen[0] if chosen.dtype == torch.bool else held.gather(-1, chosen[0]), time, layer)
    return specs


def mean_token_scores(scores: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """A token's score ``[tokens]`` (batch 0) from per-layer scores (`layer_scores`): the mean over the
    compressed layers and KV heads of its finite scores, NaN where none is finite (a token the policy
    protects, +inf, in every layer and head)."""
    stacked = torch.stack([s[0] for s in scores if s is not None]).float()  # [layers, kv_heads, tokens]
    return torch.where(torch.isfinite(stacked), stacked, torch.nan).nanmean(dim=(0, 1))


def token_view(policy: Policy, obs: Observation, budget: Budget) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token ``[tokens]`` (batch 0): the policy's score averaged over the compressed layers and KV
    heads (`mean_token_scores`; +inf where it always keeps the token), and the share of those layer x
    head slots that keep it."""
    scores = layer_scores(policy, obs)
    kept = kept_masks(policy, obs, budget, scores)
    share = torch.stack([mask[0] for mask in kept if mask is not None]).float().mean(dim=(0, 1))
    return torch.nan_to_num(mean_token_scores(scores), nan=torch.inf), share
