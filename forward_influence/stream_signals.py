"""Stream signals: the per-token signals an observation computes from the model's residual streams.

A stream signal is a table indexed by original position (``[batch, tokens]`` or ``[batch, layers,
tokens]``, one table per k where it has variants) that a token's own forward pass fixes once and for
all, so it never needs re-indexing after an eviction. Each is declared once, in `STREAM_SIGNALS`: the
`Reads` field that asks for it, the `Observation` field it fills, which streams it reads, and one
function from a block of consecutive tokens' streams to its table over that block. The tracer calls the
function on a whole trace at once (`forward_influence.observation.observe`); the compression runtime
calls it on each block of tokens a forward pass processes and joins the blocks along the token axis
(`kv_compression.runtime.recorder`). Each token's value depends on that token's streams only, so the
two compute the same numbers the same way (tested for every entry).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .logits import entropies, topk_entropies
from .signals import distance_to_final, representation_change

Table = torch.Tensor | dict[int, torch.Tensor]


@dataclass(frozen=True)
class Streams:
    """A block of consecutive tokens' residual streams, batch 1. `layers`: ``layers + 1`` tensors
    ``[1, tokens, hidden]`` (the input of the first layer, then the output of each layer); `final`:
    ``[1, tokens, hidden]`` after the final norm. Either is None when no signal asked needs it."""

    layers: Sequence[torch.Tensor] | None = None
    final: torch.Tensor | None = None


@dataclass(frozen=True)
class StreamSignal:
    """One per-token signal. `read`: the `Reads` field that asks for it (True, or the set of its
    variants, such as the k of top-k entropies); `field`: the `Observation` field it fills; `source`:
    the streams it reads; `compute(model, streams, variants)`: its table over the block of `streams`,
    with the token axis last."""

    read: str
    field: str
    source: Literal["layers", "final"]
    compute: Callable[[torch.nn.Module, Streams, Collection[int] | bool], Table]

    def asked(self, reads) -> Collection[int] | bool:
        """What `reads` asks of this signal (falsy when nothing)."""
        return getattr(reads, self.read)


def lens_entropies(model, hidden: torch.Tensor, ks: Collection[int]) -> dict[int, torch.Tensor]:
    """Top-k entropies of the logit lens (final norm and output head applied to a layer's residual
    stream ``[1, tokens, hidden]``): ``{k: [1, tokens]}``, computed a chunk of positions at a time."""
    # .forward, not __call__: the norm's hooks (the runtime records final states there) must not fire.
    normed = model.get_decoder().norm.forward(hidden.to(model.dtype))
    return {k: v[None] for k, v in topk_entropies(model, normed[0].float(), sorted(ks)).items()}


def _entropy_next(model, streams: Streams, ks) -> dict[int, torch.Tensor]:
    return {k: v[None] for k, v in topk_entropies(model, streams.final[0].float(), ks).items()}


def _entropy_full(model, streams: Streams, asked) -> torch.Tensor:
    return entropies(model, streams.final[0].float(), top_k=1)[1][None]


def _layer_change(model, streams: Streams, asked) -> torch.Tensor:
    pairs = zip(streams.layers[:-1], streams.layers[1:])
    return torch.stack([representation_change(before, after) for before, after in pairs], dim=1)


def _final_distance(model, streams: Streams, asked) -> torch.Tensor:
    return distance_to_final(streams.layers[1:]).transpose(0, 1)


def _logit_lens(model, streams: Streams, ks) -> dict[int, torch.Tensor]:
    per_layer = [lens_entropies(model, output, ks) for output in streams.layers[1:]]
    return {k: torch.stack([tables[k] for tables in per_layer], dim=1) for k in ks}


STREAM_SIGNALS = (
    StreamSignal("top_k", "entropy_next", "final", _entropy_next),
    StreamSignal("entropy_full", "entropy_full", "final", _entropy_full),
    StreamSignal("layer_change", "layer_change", "layers", _layer_change),
    StreamSignal("final_distance", "final_distance", "layers", _final_distance),
    StreamSignal("logit_lens", "logit_lens", "layers", _logit_lens),
)


def asked_signals(reads) -> list[StreamSignal]:
    """The stream signals `reads` asks for."""
    return [signal for signal in STREAM_SIGNALS if signal.asked(reads)]


def stream_tables(model, reads, streams: Streams) -> dict[str, Table]:
    """``{Observation field: table}`` of every stream signal `reads` asks for whose source `streams`
    holds, over the block of `streams`."""
    return {
        signal.field: signal.compute(model, streams, signal.asked(reads))
        for signal in asked_signals(reads)
        if getattr(streams, signal.source) is not None
    }


def joined(blocks: Sequence[Table]) -> Table:
    """One table from the tables of consecutive blocks (joined along the token axis, per k)."""
    if isinstance(blocks[0], dict):
        return {k: torch.cat([block[k] for block in blocks], dim=-1) for k in blocks[0]}
    return torch.cat(list(blocks), dim=-1)
