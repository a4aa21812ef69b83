from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.defaults import RECENT
from forward_influence.observation import Observation, Reads

from .base import GroupReduce, Policy, group_reduce, protect


@dataclass
class H2O(Policy):
    """Heavy hitters + recent tokens (H2O, Zhang et al., arXiv 2306.14048).

    Each cached token is scored by the attention it has received from every query so far (prefill
    and each decoding step, accumulated), reduced over the query heads of each KV head by `group`;
    the `recent` newest tokens are always kept. Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "h2o"
    recent: int = RECENT
    group: GroupReduce = "mean"

    def reads(self) -> Reads:
        return Reads(cumulative_attention=True)

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        received = obs.layers[layer].cumulative_attention
        return protect(group_reduce(received, self.kv_heads(obs, layer), self.group), recent=self.recent)
