from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, per_token, protect


def mean_evolution(obs) -> torch.Tensor:
    """``[batch, tokens]`` representation change ``1 - cos(h_in, h_out)`` averaged over layers."""
    return torch.stack([layer.evolution for layer in obs.layers]).mean(dim=0)


@dataclass
class Evolution(Policy):
    """Keep tokens whose representation changes most across layers (the evolution signal of InfoKV,
    arXiv 2606.26875).

    Each token scores ``1 - cos(h_in, h_out)`` of its residual stream across each layer, averaged over
    all layers (``per_layer=False``) or taken at the scored layer (``per_layer=True``). The first
    `sinks` and last `window` tokens are kept. Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "evolution"
    per_layer: bool = False
    sinks: int = 4
    window: int = 32

    def score(self, obs, layer):
        values = obs.layers[layer].evolution if self.per_layer else mean_evolution(obs)
        return protect(per_token(values, self.kv_heads(obs, layer)), self.sinks, self.window)
