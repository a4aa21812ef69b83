from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.defaults import RECENT, SINKS
from forward_influence.observation import Observation

from .base import Policy, protect


@dataclass
class Random(Policy):
    """Uniform random scores, seeded (the floor every policy must beat).

    The generator is seeded with ``seed + layer``, so a layer's draw does not depend on the others.
    Like the other policies it keeps the first `sinks` and the `recent` newest tokens, so it measures
    the value of choosing among the rest, not the (large) cost of evicting attention sinks.
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "random"
    seed: int = 0
    sinks: int = SINKS
    recent: int = RECENT

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        keys = obs.layers[layer].keys
        generator = torch.Generator().manual_seed(self.seed + layer)
        return protect(torch.rand(keys.shape[:3], generator=generator).to(keys.device), self.sinks, self.recent)
