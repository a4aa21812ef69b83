from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.observation import Observation, Reads

from .base import Cosine, Count, Policy, Ratio, group_reduce, pool, protect


@dataclass
class RKV(Policy):
    """Importance minus redundancy for reasoning traces (R-KV, Cai et al., arXiv 2505.24133).

    Importance I: attention from the last `window` queries, averaged over them, max-pooled with width
    `kernel`, max over the query heads of each KV head. Redundancy R, per KV head: the cosine
    similarity of each normalised key with every other key (diagonal 0), averaged over keys, then a
    softmax over tokens; a token with no later near-duplicate (similarity > `threshold`) has zero
    redundancy, so the newest copy is spared. Score ``lam * I - (1 - lam) * R``; the window is kept.
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "rkv"
    window: Count = 8
    kernel: Count = 7
    lam: Ratio = 0.1
    threshold: Cosine = 0.5

    def reads(self) -> Reads:
        return Reads(window=self.window)

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        received = obs.window_attention(layer, self.window).mean(dim=2)
        importance = group_reduce(pool(received, self.kernel, how="max"), self.kv_heads(obs, layer), "max")
        keys = torch.nn.functional.normalize(obs.layers[layer].keys.float(), dim=-1)
        similarity = keys @ keys.transpose(-1, -2)  # [batch, kv_heads, tokens, tokens]
        similarity.diagonal(dim1=-2, dim2=-1).zero_()
        later_duplicate = (similarity > self.threshold).triu(diagonal=1).any(dim=-1)
        redundancy = torch.softmax(similarity.mean(dim=-1), dim=-1) * later_duplicate
        return protect(self.lam * importance - (1 - self.lam) * redundancy, recent=self.window)
