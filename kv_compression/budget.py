"""Budgets: how many cached tokens each layer keeps, and which ones a policy's scores select.

A budget is a ratio of the cached tokens in (0, 1] or an absolute token count (an integer >= 1, at
most the number of cached tokens). Per layer, the policy spreads it (uniform, or PyramidKV's
pyramid); each KV head then keeps its top-scoring tokens, the same number in every head of a layer
(so the kept entries stay one dense tensor), ties going to the most recent tokens. Sliding-window layers keep their window: they are left
out of compression.
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
    """

    value: float
    is_ratio: bool

    @classmethod
    def parse(cls, text: str | float) -> "Budget":
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
        return cls(number, not is_count)

    def tokens(self, n_tokens: int) -> int:
        """Kept tokens for a cache of `n_tokens` (a ratio rounds up, so 1% of 10 tokens keeps one)."""
        if self.is_ratio:
            return max(1, math.ceil(self.value * n_tokens - 1e-9))
        if self.value > n_tokens:
            raise InputError(f"budget of {int(self.value)} tokens is larger than the sequence ({n_tokens} tokens)")
        return int(self.value)


def kept_indices(policy: Policy, obs: Observation, budget: Budget) -> list[torch.Tensor | None]:
    """Per layer, the kept cache indices ``[batch, kv_heads, k]`` in ascending order, or None for
    sliding-window layers (left to their window)."""
    full = [l for l, view in enumerate(obs.layers) if view.sliding_window is None]
    n = obs.num_tokens(full[0]) if full else 0
    per_layer = policy.layer_budgets(budget.tokens(n), len(obs.layers))
    kept = []
    for layer, k in enumerate(per_layer):
        if obs.layers[layer].sliding_window is not None:
            kept.append(None)
            continue
        n = obs.num_tokens(layer)
        scores = policy.score(obs, layer)
        # Ties (protected tokens score +inf alike) go to the most recent: sort newest first, then
        # stably by score.
        newest_first = obs.layers[layer].positions.argsort(dim=-1, descending=True)
        order = scores.gather(-1, newest_first).sort(dim=-1, descending=True, stable=True).indices
        top = newest_first.gather(-1, order[..., : min(max(k, 1), n)])
        kept.append(top.sort(dim=-1).values)
    return kept


def eviction_specs(kept: list[torch.Tensor | None], obs: Observation, time: int) -> list[EvictionSpec]:
    """The evictions behind `kept` (batch row 0) as tracer specs at eviction time `time`: one spec per
    layer and KV head whose set is not empty, so the tracer can measure or replay a policy's choice."""
    specs = []
    for layer, indices in enumerate(kept):
        if indices is None:
            continue
        positions = obs.layers[layer].positions[0]
        for head in range(indices.shape[1]):
            keep = set(positions[head, indices[0, head]].tolist())
            evicted = tuple(p for p in positions[head].tolist() if p not in keep)
            if evicted:
                specs.append(EvictionSpec(evicted, time, layers=(layer,), heads=(head,)))
    return specs
