from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, protect


def mean_evolution(obs) -> torch.Tensor:
    """``[batch, seen]`` representation change ``1 - cos(h_in, h_out)`` by position, averaged over layers."""
    return obs.evolution.nanmean(dim=1)


@dataclass
class Evolution(Policy):
    """Keep tokens whose representation changes most across layers (InfoKV's evolution, arXiv 2606.26875).

    Each token scores ``1 - cos(h_in, h_out)`` of its residual stream across each layer, averaged over
    all layers (``per_layer=False``) or taken at the scored layer (``per_layer=True``). The first
    `sinks` and last `window` tokens are kept. Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "evolution"
    needs = frozenset({"evolution"})
    per_layer: bool = False
    sinks: int = 4
    window: int = 32

    def score(self, obs, layer):
        values = obs.evolution[:, layer] if self.per_layer else mean_evolution(obs)
        return protect(obs.per_token(layer, torch.nan_to_num(values, nan=float("inf"))), self.sinks, self.window)
