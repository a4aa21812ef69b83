"""Attention a cached key receives, recomputed from query and key states.

The tracer and the compression runtime both read the query states each attention layer receives
(after its projections, norms and RoPE) and the keys its cache holds, and recompute softmax attention
from them: ``attention_probs`` for a window of queries, ``attention_received`` for its sum over many
queries (H2O's cumulative attention), a chunk of queries at a time. Recomputing works under any
attention implementation (sdpa returns no probabilities), and one function serves the offline
signals, the offline observations and the online runtime, so all three agree.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 256


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Softmax attention ``[batch, heads, queries, keys]`` of `query` over `key` (GQA: keys repeated
    over each group), causal by original position and limited to the sliding window if any.
    `key_positions` is ``[keys]`` or ``[batch, kv_heads, keys]`` (heads that keep different tokens)."""
    group = query.shape[1] // key.shape[1]
    key = key.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(query.float(), key.transpose(-1, -2)) * scaling
    if key_positions.dim() == 3:
        key_positions = key_positions.repeat_interleave(group, dim=1)[:, :, None, :]
    else:
        key_positions = key_positions[None, None, None, :]
    q = query_positions[None, None, :, None]
    visible = key_positions <= q
    if sliding_window is not None:
        visible = visible & (q - key_positions < sliding_window)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1)


def attention_received(
    query: torch.Tensor,
    key: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """Attention each key receives, summed over the queries: ``[batch, heads, keys]``, float32, `chunk`
    queries at a time (memory: ``chunk x keys`` scores per head)."""
    total = torch.zeros(query.shape[0], query.shape[1], key.shape[2], dtype=torch.float32, device=key.device)
    for start in range(0, query.shape[2], chunk):
        probs = attention_probs(
            query[:, :, start : start + chunk],
            key,
            query_positions[start : start + chunk],
            key_positions,
            scaling,
            sliding_window,
        )
        total += probs.sum(dim=2)
    return total
