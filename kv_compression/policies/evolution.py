from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.defaults import RECENT, SINKS
from forward_influence.observation import Observation, Reads

from .base import Policy, protect


@dataclass
class Evolution(Policy):
    """Keep tokens whose representation changes most across layers (InfoKV's evolution, arXiv 2606.26875).

    Each token scores ``1 - cos(h_in, h_out)`` of its residual stream across each layer, averaged over
    all layers (``per_layer=False``) or taken at the scored layer (``per_layer=True``). The first
    `sinks` and the `recent` newest tokens are kept. Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "evolution"
    per_layer: bool = False
    sinks: int = SINKS
    recent: int = RECENT

    def reads(self) -> Reads:
        return Reads(layer_change=True)

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        change = obs.layer_change[:, layer] if self.per_layer else obs.layer_change.nanmean(dim=1)
        return protect(obs.per_token(layer, torch.nan_to_num(change, nan=float("inf"))), self.sinks, self.recent)
