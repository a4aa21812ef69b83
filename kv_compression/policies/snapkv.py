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
    averaged over them; the tokens before the window average-pooled with width `kernel` (padding
    counted, as in SnapKV's reference code and kvpress), the window's own tokens left as they are; then
    reduced over each GQA group by `group`."""
    received = obs.window_attention(layer, window).mean(dim=2)
    before = received.shape[-1] - min(window, received.shape[-1])
    pooled = torch.cat([pool(received[..., :before], kernel, count_padding=True), received[..., before:]], dim=-1)
    return group_reduce(pooled, obs.layers[layer].keys.shape[1], group)


@dataclass
class SnapKV(Policy):
    """Attention from an observation window (SnapKV, Li et al., arXiv 2404.14469).

    Each cached token is scored by the attention it receives from the last `window` queries,
    averaged over those queries, and reduced over the query heads of each KV head by `group`. The
    tokens before the window are smoothed with a 1-D average pool of width `kernel` that runs over them
    alone, dividing by the kernel width at the edges too (padding counted), as SnapKV's reference code
    and kvpress's ``SnapKVPress`` do: the window's attention does not leak into the tokens just before
    it. The window itself is always kept. A row is the attention of one average window query, so it
    sums to about 1 over the cached tokens.
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
