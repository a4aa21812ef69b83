"""The recorder: what a compressing cache reads about its tokens while the model runs, online.

While a cache is active (`compressing(model, cache)`), hooks record what the policy declares in
`Policy.reads`, through the same functions the tracer's offline observation uses:

- each full-attention layer's recent query states and the attention each key has received, from an
  attention function registered with transformers' `AttentionInterface` that wraps the model's own
  ``sdpa`` or ``eager`` one (the layer keeps them, `CompressedLayer.record`, since an eviction gathers
  them with the entries);
- the stream signals of `forward_influence.stream_signals`, computed over each block of tokens a
  forward pass processes (decoder-layer hooks, and the final norm's), block by block;
- the token ids, for a pass that reconstructs them (KVzip).

A frozen cache records nothing. `observation` turns what was recorded into the `Observation` a policy
scores.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from forward_influence.errors import InputError
from forward_influence.models import attention_implementation
from forward_influence.observation import LayerObservation, Observation, Reads
from forward_influence.stream_signals import Streams, Table, asked_signals, joined, stream_tables

if TYPE_CHECKING:
    from .cache import CompressedCache

_NAME = "kv_compression_{}"
_RECORDER = "_kv_compression_cache"


def _recording_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        output = ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)
        cache = getattr(module, _RECORDER, None)
        if cache is not None and not cache.frozen:
            cache.record_attention(module, query, key)
        return output

    return attention


for _base in ("sdpa", "eager"):
    AttentionInterface.register(_NAME.format(_base), _recording_attention(_base))
    AttentionMaskInterface.register(_NAME.format(_base), ALL_MASK_ATTENTION_FUNCTIONS[_base])


class Recorder:
    """The per-token record of a compressing cache: each asked stream signal's tables, block by
    block (`tables` joins them, indexed by original position), and the token ids when a reconstruction
    is read."""

    def __init__(self, model: PreTrainedModel, reads: Reads) -> None:
        self.model, self.reads = model, reads
        signals = asked_signals(reads)
        self.layer_streams = any(signal.source == "layers" for signal in signals)
        self.blocks: dict[str, list[Table]] = {signal.field: [] for signal in signals}
        self.streams: list[torch.Tensor] = []  # the current block's streams, until its last layer
        self.token_ids: list[int] = []

    def record_ids(self, ids: torch.Tensor) -> None:
        if self.reads.reconstruction:
            self.token_ids += ids[0].tolist()

    def record_layer(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor, last: bool) -> None:
        if not self.layer_streams:
            return
        if layer == 0:
            self.streams = [hidden_in.detach()]
        self.streams.append(hidden_out.detach())
        if last:
            self._add(Streams(layers=self.streams))
            self.streams = []

    def record_final(self, final: torch.Tensor) -> None:
        self._add(Streams(final=final))

    def _add(self, streams: Streams) -> None:
        for name, table in stream_tables(self.model, self.reads, streams).items():
            self.blocks[name].append(table)

    def tables(self) -> dict[str, Table]:
        """``{Observation field: table}`` over every token recorded."""
        return {name: joined(blocks) for name, blocks in self.blocks.items() if blocks}

    def copy(self) -> Recorder:
        """An independent copy: every list it holds (directly or in a dict) is copied, so what either
        records later stays its own."""
        other = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, list):
                setattr(other, name, list(value))
            elif isinstance(value, dict):
                setattr(other, name, {key: list(rows) for key, rows in value.items()})
        return other


def observation(cache: CompressedCache) -> Observation:
    """What the policy of `cache` sees now: each full-attention layer's view, the recorded stream
    signals and the reconstruction passes it reads (sliding-window layers are left out: positions
    empty)."""
    views = []
    for index, layer in enumerate(cache.layers):
        if index in cache.full_layers:
            views.append(
                LayerObservation.of(
                    cache.model,
                    index,
                    keys=layer.keys,
                    values=layer.values,
                    positions=layer.positions,
                    queries=layer.queries,
                    query_positions=layer.query_positions,
                    cumulative_attention=layer.cumulative,
                    scaling=layer.scaling,
                )
            )
        else:
            empty = torch.zeros(1, layer.keys.shape[1], 0, dtype=torch.long, device=layer.keys.device)
            views.append(
                LayerObservation(
                    keys=layer.keys,
                    values=layer.values,
                    positions=empty,
                    queries=None,
                    query_positions=None,
                    cumulative_attention=None,
                    scaling=1.0,
                    sliding_window=cache.layout.windows[index],
                )
            )
    return Observation(
        views,
        **cache.recorder.tables(),
        reconstruction={spec: cache.reconstruction(spec) for spec in cache.reads.reconstruction},
        prompt_length=cache.prompt_length,
    )


@contextlib.contextmanager
def compressing(model: PreTrainedModel, cache: CompressedCache) -> Iterator[CompressedCache]:
    """Install the recording hooks and attention function for `cache` on `model`, for the block."""
    base = model.config._attn_implementation
    if base not in ("sdpa", "eager"):
        raise InputError(f"compression runs with sdpa or eager attention, not {base!r}")
    decoder, recorder = model.get_decoder(), cache.recorder
    last = len(decoder.layers) - 1
    handles = []
    for index, layer in enumerate(decoder.layers):
        setattr(layer.self_attn, _RECORDER, cache)

        def hook(module, args, kwargs, output, index=index):
            if not cache.frozen:
                hidden_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                hidden_out = output[0] if isinstance(output, tuple) else output
                recorder.record_layer(index, hidden_in, hidden_out, index == last)

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))

    def final(module, args, output):
        if not cache.frozen:
            recorder.record_final(output)

    def ids(module, args):
        if not cache.frozen:
            recorder.record_ids(args[0])

    handles.append(decoder.norm.register_forward_hook(final))
    handles.append(model.get_input_embeddings().register_forward_pre_hook(ids))
    try:
        with attention_implementation(model, _NAME.format(base)):
            yield cache
    finally:
        for handle in handles:
            handle.remove()
        for layer in decoder.layers:
            if hasattr(layer.self_attn, _RECORDER):
                delattr(layer.self_attn, _RECORDER)
