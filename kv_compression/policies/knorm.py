from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.observation import Observation

from .base import Policy


@dataclass
class Knorm(Policy):
    """Keep the keys with the lowest L2 norm (Knorm, Devoto et al., arXiv 2406.11430).

    Each cached token scores minus the L2 norm of its key, per KV head: low-norm keys draw attention
    and are kept. Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "knorm"

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        return -obs.layers[layer].keys.float().norm(dim=-1)
