from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.defaults import SINKS
from forward_influence.observation import Observation

from .base import Policy, protect


@dataclass
class StreamingLLM(Policy):
    """Attention sinks + recent tokens (StreamingLLM, Xiao et al., arXiv 2309.17453).

    Keeps the first `sinks` tokens and the most recent ones: the score is the token's position, the
    sinks score +inf. Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "streaming"
    sinks: int = SINKS

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        return protect(obs.layers[layer].positions.float(), sinks=self.sinks)
