from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.errors import InputError
from forward_influence.observation import Observation, Reads

from .base import NonNegative, Policy, Ratio


def projected_value_norm(obs: Observation, layer: int) -> torch.Tensor:
    """``[batch, kv_heads, tokens]``: the L1 norm of what each cached value writes into the residual
    stream through each query head's slice of the output projection, ``|v W_O^h|_1``, averaged over
    the query heads of its KV group."""
    view = obs.layers[layer]
    values = view.values.float()
    b, kv_heads, n, head_dim = values.shape
    weight = view.output_weight.float()  # [hidden, heads * head_dim]
    heads = weight.shape[1] // head_dim
    group = heads // kv_heads
    norms = torch.stack(
        [
            (values[:, head // group] @ weight[:, head * head_dim : (head + 1) * head_dim].T).abs().sum(dim=-1)
            for head in range(heads)  # one head at a time: never [heads, tokens, hidden] at once
        ],
        dim=1,
    )
    return norms.reshape(b, kv_heads, group, n).mean(dim=2)


@dataclass
class CriticalKV(Policy):
    """An inner policy's scores re-weighted by what each value writes out (CriticalKV, Feng et al.,
    arXiv 2502.03805).

    Attention alone ignores how much a token's value changes the layer's output. CriticalKV keeps its
    budget of k tokens per KV head in two stages: first the ``int(first_stage * k)`` best tokens by
    the `inner` policy (a CLI name of an online policy, default fields), then the best of the rest by
    ``(inner + epsilon) * |v W_O|_1`` (`projected_value_norm`). The choice depends on k, so the policy
    is `budgeted`; `score` is the second stage alone. The inner policy's protected tokens (+inf) stay
    protected. Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "criticalkv"
    budgeted = True
    inner: str = "snapkv"
    epsilon: NonNegative = 1e-4
    first_stage: Ratio = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        from . import POLICIES  # the registry imports this module

        cls = POLICIES.get(self.inner)
        if cls is None or not cls.online or cls.budgeted:
            choices = sorted(n for n, c in POLICIES.items() if c.online and not c.budgeted)
            raise InputError(f"criticalkv: inner must be an online policy ({', '.join(choices)}), got {self.inner!r}")

    def inner_policy(self) -> Policy:
        from . import POLICIES

        return POLICIES[self.inner]()

    def reads(self) -> Reads:
        return self.inner_policy().reads()

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        return self._stages(obs, layer, 0)

    def kept_scores(self, obs: Observation, layer: int, kept: int) -> torch.Tensor:
        return self._stages(obs, layer, max(1, int(kept * self.first_stage)) if self.first_stage > 0 else 0)

    def _stages(self, obs: Observation, layer: int, first: int) -> torch.Tensor:
        inner = self.inner_policy().score(obs, layer).float()
        scores = (inner + self.epsilon) * projected_value_norm(obs, layer)
        if first:
            scores.scatter_(-1, inner.topk(min(first, inner.shape[-1]), dim=-1).indices, float("inf"))
        return scores
