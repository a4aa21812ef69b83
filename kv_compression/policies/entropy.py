from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, protect


def token_entropy(obs, alignment: str) -> torch.Tensor:
    """``[batch, seen]`` top-k entropy by position under an alignment: ``next`` or ``generated``."""
    if alignment not in ("next", "generated"):
        raise ValueError(f"alignment must be 'next' or 'generated', got {alignment!r}")
    return obs.entropy_next if alignment == "next" else obs.entropy_generated


@dataclass
class Entropy(Policy):
    """Keep uncertain tokens: high top-k entropy (the entropy signal of InfoKV, arXiv 2606.26875).

    Each token scores the entropy of its top-`top_k` next-token probabilities (renormalised), taken
    from the distribution at the token (``alignment="next"``, predicting the following token) or from
    the one that produced it (``"generated"``); unknown entropies (the newest token under "next")
    count as +inf. The first `sinks` and last `window` tokens are kept. Scores: [batch, kv_heads,
    tokens]; higher means keep. `top_k` is the k the observation must be built with.
    """

    name = "entropy"
    needs = frozenset({"entropy"})
    top_k: int = 10
    alignment: str = "next"
    sinks: int = 4
    window: int = 32

    def score(self, obs, layer):
        values = torch.nan_to_num(token_entropy(obs, self.alignment), nan=float("inf"))
        return protect(obs.per_token(layer, values), self.sinks, self.window)
