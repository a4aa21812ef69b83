"""The compression schedule: when a compressing cache evicts.

A compression happens at the start of a forward pass, before its queries attend: after the prefill
when the prompt exceeds the budget, then once a layer holds its planned budget + `buffer` tokens, so
`buffer` is the compression interval (R-KV's 128; the InfoKV paper's 1024). The prefill, decoding one
token at a time and teacher forcing in blocks all ask this one object, so they compress at the same
times and keep the same tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from forward_influence.errors import InputError

from ..budget import BUFFER


@dataclass(frozen=True)
class Schedule:
    """When to compress, from what each full-attention layer holds (``{layer: entries}``) and the
    per-layer budgets of the last compression (`planned`; None before the first decision)."""

    buffer: int = BUFFER

    def __post_init__(self) -> None:
        if self.buffer < 0:
            raise InputError(f"buffer must be at least 0, got {self.buffer}", "buffer")

    def room(self, held: Mapping[int, int], planned: Sequence[int]) -> int:
        """How many more tokens the layers can take before the next compression falls due (at most
        ``sys.maxsize`` for a cache with no full-attention layer); 0 or less when it is due now."""
        return min(
            (max(planned[layer] + self.buffer, planned[layer] + 1) - n for layer, n in held.items()),
            default=sys.maxsize,
        )

    def due(self, held: Mapping[int, int], planned: Sequence[int] | None, targets: Sequence[int]) -> bool:
        """Whether a compression is due now: after the prefill (nothing planned yet), if a layer holds
        more than its `targets`; later, once a layer holds its planned budget + `buffer` (and more than
        the budget, for a buffer of 0)."""
        if planned is None:
            return any(n > targets[layer] for layer, n in held.items())
        return self.room(held, planned) <= 0
