from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy


@dataclass
class Random(Policy):
    """Uniform random scores, seeded (the floor every policy must beat).

    The generator is seeded with ``seed + layer``, so a layer's draw does not depend on the others.
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "random"
    seed: int = 0

    def score(self, obs, layer):
        keys = obs.layers[layer].keys
        generator = torch.Generator().manual_seed(self.seed + layer)
        return torch.rand(keys.shape[:3], generator=generator).to(keys.device)
