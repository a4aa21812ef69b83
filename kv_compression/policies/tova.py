from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.observation import Observation, Reads

from .base import Policy, broadcast_heads


@dataclass
class TOVA(Policy):
    """Token Omission Via Attention (TOVA, Oren et al., arXiv 2401.06104).

    Each cached token is scored by the attention it receives from the last query, averaged over all
    query heads, so the layer makes one selection shared by its KV heads. Scores: [batch, kv_heads,
    tokens]; higher means keep.
    """

    name = "tova"

    def reads(self) -> Reads:
        return Reads(window=1)

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        last = obs.window_attention(layer, 1)[:, :, 0]  # [batch, heads, tokens]
        return broadcast_heads(last.mean(dim=1), self.kv_heads(obs, layer))
