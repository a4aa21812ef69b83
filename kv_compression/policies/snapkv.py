from __future__ import annotations

from dataclasses import dataclass

from .base import Policy, group_reduce, pool, protect


@dataclass
class SnapKV(Policy):
    """Attention from an observation window (SnapKV, Li et al., arXiv 2404.14469).

    Each cached token is scored by the attention it receives from the last `window` queries,
    averaged over those queries, smoothed with a 1-D average pool of width `kernel`, and reduced over
    the query heads of each KV head by `group` (mean or max). The window itself is always kept.
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "snapkv"
    window: int = 32
    kernel: int = 5
    group: str = "mean"

    def attention(self, obs, layer):
        """The pooled, group-reduced window attention, before the window is protected."""
        received = obs.window_attention(layer, self.window).mean(dim=2)
        return group_reduce(pool(received, self.kernel), self.kv_heads(obs, layer), self.group)

    def score(self, obs, layer):
        return protect(self.attention(obs, layer), window=self.window)
