"""A compressing cache's full-attention layer: its entries, their original positions, what it records."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from forward_influence.attention import attention_received


class CompressedLayer(DynamicLayer):
    """A full-attention cache layer that evicts: its entries' original positions ``[1, kv_heads,
    tokens]``, the last recorded queries with their positions, the attention each entry has received
    (when the policy reads it) and the attention scaling. `evicted` counts the entries it has dropped,
    so it reports the original length and offsets its causal mask by them."""

    def __init__(self) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.query_positions: torch.Tensor | None = None
        self.cumulative: torch.Tensor | None = None
        self.scaling = 1.0
        self.evicted = 0

    def add_positions(self, step: torch.Tensor, kv_heads: int) -> None:
        fresh = step.expand(1, kv_heads, -1)
        self.positions = fresh if self.positions is None else torch.cat([self.positions, fresh], dim=2)

    def record(
        self, query: torch.Tensor, key: torch.Tensor, step: torch.Tensor, window: int, cumulative: bool, scaling: float
    ) -> None:
        """Keep the last `window` queries; add this step's attention to each entry's running total."""
        self.scaling = scaling
        queries = query.detach().float() if self.queries is None else torch.cat([self.queries, query.float()], dim=2)
        positions = step if self.query_positions is None else torch.cat([self.query_positions, step])
        self.queries, self.query_positions = queries[:, :, -window:], positions[-window:]
        if cumulative:
            received = attention_received(query, key, step, self.positions, scaling)
            if self.cumulative is not None:
                received[:, :, : self.cumulative.shape[2]] += self.cumulative
            self.cumulative = received

    def keep(self, index: torch.Tensor) -> None:
        """Keep the entries at cache indices ``index [1, kv_heads, k]``; drop the others."""
        gather = index[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.evicted += self.keys.shape[2] - index.shape[2]
        self.keys, self.values = self.keys.gather(2, gather), self.values.gather(2, gather)
        self.positions = self.positions.gather(2, index)
        if self.cumulative is not None:
            group = self.cumulative.shape[1] // index.shape[1]
            self.cumulative = self.cumulative.gather(2, index.repeat_interleave(group, dim=1))

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.evicted

    def get_mask_sizes(self, queries: int | torch.Tensor) -> tuple[int, int]:
        # Key j of the cache stands at mask index evicted + j: every kept key lies before the new
        # queries' original positions, and the new keys stay causal among themselves. (transformers
        # passes the query length, or before 5.3 the queries' cache positions.)
        length = int(queries.shape[0]) if torch.is_tensor(queries) else int(queries)
        return super().get_seq_length() + length, self.evicted
