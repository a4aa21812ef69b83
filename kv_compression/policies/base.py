"""The policy contract and the helpers every policy shares.

A policy is a small dataclass whose fields are its only knobs and whose `score(obs, layer)` returns
``[batch, kv_heads, tokens]`` scores for the cached tokens of one layer: higher means keep. Tokens a
method always keeps (sinks, an observation window) score +inf. GQA is explicit: per-query-head
quantities are reduced over the query heads of each KV group by `group_reduce` (mean or max, a field
of the policies that need it). `layer_budgets` spreads a total budget over layers (uniform unless
the policy says otherwise, as PyramidKV does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from forward_influence.observation import Observation


def group_reduce(x: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """``[batch, heads, tokens]`` -> ``[batch, kv_heads, tokens]`` over each GQA group (mean or max)."""
    b, h, t = x.shape
    grouped = x.reshape(b, num_kv_heads, h // num_kv_heads, t)
    return grouped.amax(dim=2) if how == "max" else grouped.mean(dim=2)


def broadcast_heads(values: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A per-token ``[batch, tokens]`` score broadcast to every KV head: ``[batch, kv_heads, tokens]``."""
    return values[:, None, :].expand(-1, num_kv_heads, -1).clone()


def protect(scores: torch.Tensor, sinks: int = 0, window: int = 0) -> torch.Tensor:
    """Set the first `sinks` and last `window` tokens to +inf (always kept)."""
    scores = scores.clone()
    if sinks:
        scores[..., :sinks] = float("inf")
    if window:
        scores[..., -window:] = float("inf")
    return scores


def pool(scores: torch.Tensor, kernel: int, how: str = "avg") -> torch.Tensor:
    """1-D pooling over tokens with stride 1 and same-size output (SnapKV's clustering)."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if how == "max":
        out = torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        out = torch.nn.functional.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return out[..., : shape[-1]].reshape(shape)


@dataclass
class Policy:
    """Base class: subclasses set `name` (the CLI name) and implement `score`.

    `needs` names the observation parts beyond keys, values and window queries that `score` reads
    (``entropy``, ``evolution``, ``cumulative_attention``, ``logit_lens``), so the runtime computes
    only those.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def requires(self) -> frozenset[str]:
        """What this instance reads (may depend on its fields, as InfoKV's does)."""
        return self.needs

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def layer_budgets(self, tokens: int, num_layers: int) -> list[int]:
        """Kept tokens per layer for a per-layer budget of `tokens` (uniform)."""
        return [tokens] * num_layers

    @staticmethod
    def kv_heads(obs: Observation, layer: int) -> int:
        return obs.layers[layer].keys.shape[1]
