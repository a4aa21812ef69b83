from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.observation import Observation, Reads

from .base import Count, Policy


@dataclass
class Oracle(Policy):
    """Keep the tokens whose measured Forward Influence, each evicted alone, is largest.

    Each token is evicted alone at the compression time (`forward_influence.scan.scan_at`) and its
    Forward Influence is the mean KL(full || evicted) of the next `distance` positions of the trace
    (so the oracle reads the future: a measurement, never a compressor). Keeping the top tokens by
    this score minimises the sum of the evicted tokens' single-token influences. That sum is not what
    evicting the set costs: tokens interact, and a set can cost far more than its tokens alone
    (`analyses.headroom` measures by how much), so a policy can beat the oracle. No token is
    protected. Offline only: the runtime refuses it. Scores: [batch, kv_heads, tokens]; higher means
    keep.
    """

    name = "oracle"
    online = False
    distance: Count = 64

    def reads(self) -> Reads:
        return Reads(influence=self.distance)

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        return obs.per_token(layer, obs.influence.to(obs.layers[layer].keys.device))
