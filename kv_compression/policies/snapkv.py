from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.defaults import WINDOW
from forward_influence.observation import Observation, Reads

from .base import Count, GroupReduce, Policy, group_reduce, pool, protect


def window_attention(
    obs: Observation, layer: int, window: int, kernel: int, group: GroupReduce = "mean"
) -> torch.Tensor:
    """SnapKV's attention ``[batch, kv_heads, tokens]``: the attention of the last `window` queries,
    averaged over them, average-pooled with width `kernel`, reduced over each GQA group by `group`."""
    received = obs.window_attention(layer, window).mean(dim=2)
    return group_reduce(pool(received, kernel), obs.layers[layer].keys.shape[1], group)


@dataclass
class SnapKV(Policy):
    """Attention from an observation window (SnapKV, Li et al., arXiv 2404.14469).

    Each cached token is scored by the attention it receives from the last `window` queries,
    averaged over those queries, smoothed with a 1-D average pool of width `kernel` (dividing by the
    tokens inside the kernel, so the first and last tokens are not diluted by padding), and reduced
    over the query heads of each KV head by `group`. The pooled row still sums to about 1 per KV
    head: the attention of one average window query. The window itself is always kept.
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "snapkv"
    window: Count = WINDOW
    kernel: Count = 5
    group: GroupReduce = "mean"

    def reads(self) -> Reads:
        return Reads(window=self.window)

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        return protect(window_attention(obs, layer, self.window, self.kernel, self.group), recent=self.window)
