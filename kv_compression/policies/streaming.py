from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, per_token, protect


@dataclass
class StreamingLLM(Policy):
    """Attention sinks + recent tokens (StreamingLLM, Xiao et al., arXiv 2309.17453).

    Keeps the first `sinks` tokens and the most recent ones: the score is the token's position, the
    sinks score +inf. Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "streaming"
    sinks: int = 4

    def score(self, obs, layer):
        positions = obs.positions.float()[None].expand(obs.layers[layer].keys.shape[0], -1)
        return protect(per_token(positions, self.kv_heads(obs, layer)), sinks=self.sinks)
