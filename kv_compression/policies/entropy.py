from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from forward_influence.defaults import RECENT, SINKS, TOP_K
from forward_influence.observation import Observation, Reads

from .base import Count, Policy, protect

Alignment = Literal["next", "generated"]


@dataclass
class Entropy(Policy):
    """Keep uncertain tokens: high top-k entropy (the entropy signal of InfoKV, arXiv 2606.26875).

    Each token scores the entropy of its top-`top_k` next-token probabilities (renormalised), taken
    from the distribution at the token (``alignment="next"``, predicting the following token) or from
    the one that produced it (``"generated"``); unknown entropies (the first token under "generated")
    count as +inf. The first `sinks` and the `recent` newest tokens are kept. Scores: [batch,
    kv_heads, tokens]; higher means keep.
    """

    name = "entropy"
    top_k: Count = TOP_K
    alignment: Alignment = "next"
    sinks: int = SINKS
    recent: int = RECENT

    def reads(self) -> Reads:
        return Reads(top_k=frozenset({self.top_k}))

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        values = torch.nan_to_num(obs.entropy(self.top_k, self.alignment), nan=float("inf"))
        return protect(obs.per_token(layer, values), self.sinks, self.recent)
