"""Budgets: how many cached tokens each layer keeps, and which ones a policy's scores select.

A budget is written three ways:

- ``0.25``, a ratio in (0, 1] of the tokens to compress (the prompt, or the whole trace offline);
- ``256``, a token count (digits only);
- ``prompt+0.25``, while decoding: the whole prompt plus that ratio of the tokens generated so far,
  so the budget grows with the generation (RPC's schedule). Offline, with nothing generated, it is
  refused.

One rule for counts everywhere: a count may not exceed the tokens the cache will ever hold (the
trace, offline; the prompt plus the new tokens, while generating), since nothing would be evicted.
A count between the prompt and that evicts only while decoding, as for long generations.

Per layer, the policy spreads the budget (uniform, or PyramidKV's pyramid); each KV head then keeps
its top-scoring tokens, the same number in every head of a layer (so the kept entries stay one dense
tensor), ties going to the most recent tokens. Sliding-window layers keep their window: they are left
out of compression.

Per-head allocation (AdaKV, Feng et al., arXiv 2407.11550) instead pools a layer's budget over its
KV heads: every head keeps its top ``floor`` share of the uniform per-head budget, and the rest of
the layer's ``heads x budget`` slots go to the highest scores across all heads. Heads then keep
different numbers of tokens, which a dense cache tensor cannot hold: `kept_masks` gives those sets
for the tracer (measurement, `score`), and the runtime refuses per-head budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from forward_influence.errors import InputError
from forward_influence.eviction import EvictionSpec, evictions
from forward_influence.observation import Observation

from .policies import Policy

PROMPT_PLUS = "prompt+"
BudgetKind = Literal["ratio", "count", "prompt+ratio"]


@dataclass(frozen=True)
class Budget:
    """Kept tokens per layer: `value` is a ratio, a count or the generated share, by `kind` (see the
    module docstring). `head_floor` (in [0, 1], or None for uniform heads) turns on per-head allocation."""

    value: float
    kind: BudgetKind = "ratio"
    head_floor: float | None = None

    def __post_init__(self) -> None:
        if self.head_floor is not None and not 0 <= self.head_floor <= 1:
            raise InputError(f"--head-floor must lie in [0, 1], got {self.head_floor}")

    @classmethod
    def parse(cls, text: str | float, head_floor: float | None = None) -> Budget:
        """``"0.25"``, ``"256"`` or ``"prompt+0.25"``; raises `InputError` on anything else."""
        raw = str(text).strip()
        body = raw.removeprefix(PROMPT_PLUS)
        try:
            number = float(body)
        except ValueError:
            raise InputError(f"budget must be a ratio in (0, 1], a token count or prompt+RATIO, got {raw!r}") from None
        if not math.isfinite(number) or number <= 0:
            raise InputError(f"budget must be positive, got {raw}")
        if raw.startswith(PROMPT_PLUS):
            if number > 1:
                raise InputError(f"the ratio of prompt+RATIO must lie in (0, 1], got {raw}")
            return cls(number, "prompt+ratio", head_floor)
        if body.isdigit():
            return cls(number, "count", head_floor)
        if number > 1:
            raise InputError(f"a budget ratio must lie in (0, 1], got {raw} (a token count has digits only)")
        return cls(number, "ratio", head_floor)

    def __str__(self) -> str:
        if self.kind == "count":
            return str(int(self.value))
        return f"{PROMPT_PLUS if self.kind == 'prompt+ratio' else ''}{self.value:g}"

    def share(self) -> str:
        """The budget in words for titles: ``25%``, ``256 tokens`` or ``the prompt + 25%``."""
        if self.kind == "count":
            return f"{int(self.value)} tokens"
        return f"{'the prompt + ' if self.kind == 'prompt+ratio' else ''}{self.value:.0%}"

    def tokens(self, n_tokens: int) -> int:
        """Kept tokens for a cache of `n_tokens` compressed once (offline; a ratio rounds up, so 1% of
        10 tokens keeps one)."""
        self.check_offline()
        if self.kind == "ratio":
            return max(1, math.ceil(self.value * n_tokens - 1e-9))
        self.check_count(n_tokens, "the sequence")
        return int(self.value)

    def check_offline(self) -> None:
        """Refuse a budget that needs a generation (``prompt+RATIO``) where nothing is generated."""
        if self.kind == "prompt+ratio":
            raise InputError(
                f"budget {self} grows while decoding; offline, with nothing generated, use a ratio or a count"
            )

    def check_count(self, capacity: int, what: str) -> None:
        """Refuse a count larger than the `capacity` tokens the cache will ever hold (`what` names them)."""
        if self.kind == "count" and self.value > capacity:
            raise InputError(
                f"budget of {int(self.value)} tokens is larger than {what} ({capacity} tokens): "
                "nothing would be evicted"
            )

    def target(self, prompt: int, seen: int) -> int:
        """Kept tokens per layer after a compression while generating, with `prompt` prompt tokens and
        `seen` tokens processed."""
        if self.kind == "count":
            return int(self.value)
        if self.kind == "ratio":
            return max(1, math.ceil(self.value * prompt - 1e-9))
        return prompt + math.ceil(self.value * (seen - prompt) - 1e-9)


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
    full = [layer for layer, view in enumerate(obs.layers) if view.sliding_window is None]
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


def token_view(policy: Policy, obs: Observation, budget: Budget) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token ``[tokens]`` (batch 0): the policy's score averaged over the compressed layers and KV
    heads (+inf where it always keeps the token), and the share of those layer x head slots that keep it."""
    scores = layer_scores(policy, obs)
    kept = kept_masks(policy, obs, budget, scores)
    layers = [layer for layer, mask in enumerate(kept) if mask is not None]
    stacked = torch.stack([scores[layer][0] for layer in layers])  # [layers, kv_heads, tokens]
    share = torch.stack([kept[layer][0] for layer in layers]).float().mean(dim=(0, 1))
    return stacked.mean(dim=(0, 1)), share
