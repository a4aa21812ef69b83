"""Observations: what a scoring policy may read about the cached tokens, per layer and per token.

A compression policy decides from an `Observation` of the cache: per layer the cached keys and
values with their original positions, the last queries, the attention each key has received from
every query so far (H2O's cumulative attention) and the layer's RoPE frequencies; per token its top-k
entropies, its representation change across each layer and its distance to the final layer, and the
logit lens. A policy declares what it reads beyond keys, values and positions with `Reads`, so only
that is computed, and each `Reads` field declares how two policies' asks of it merge. The tracer
builds observations offline (`observe`, one nnsight pass over a trace) and the compression runtime
builds them online during generation; both build each layer's view with `LayerObservation.of` and
every per-token table with the one function its entry in `forward_influence.stream_signals` declares,
so the same input gives the same scores.

Shapes, per layer: keys and values ``[batch, kv_heads, tokens, head_dim]`` (after RoPE, as cached),
their original positions ``[batch, kv_heads, tokens]`` (heads may keep different tokens once a
policy has evicted per head), queries ``[batch, heads, window, head_dim]`` (after norms and RoPE) with
their positions ``[window]``, cumulative attention ``[batch, heads, tokens]`` (in the cache order of
each head's KV group). Per token, indexed by original position: entropies ``[batch, seen]``,
representation tables ``[batch, layers, seen]``; a token's signals are fixed once it has been
processed, so they never need re-indexing after an eviction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from .attention import attention_probs, attention_received
from .defaults import QUERY_WINDOW
from .errors import InputError
from .influence import clean_run
from .reconstruction import Reconstruction
from .scan import scan_at
from .set_optimum import SetOptimum, SetSearch
from .signals import generated_alignment
from .stream_signals import Streams, stream_tables
from .tracer import Tracer

ALIGNMENTS = ("next", "generated")


def _read(default, merge: Callable):
    """A `Reads` field and how two policies' asks of it merge (every field declares one)."""
    return field(default=default, metadata={"merge": merge})


def _union(a, b):
    return a | b


@dataclass(frozen=True)
class Reads:
    """What an observation holds beyond each layer's keys, values and positions.

    window: the recent queries a policy scores from (the observation keeps at least `QUERY_WINDOW`).
    top_k: the k of each top-k entropy it reads.
    entropy_full: the full-vocabulary entropy of each position's next-token distribution.
    cumulative_attention: the attention each key has received from every query so far.
    layer_change: ``1 - cos`` of each token's residual stream across each layer.
    final_distance: ``1 - cos`` between each token's stream after each layer and after the last one.
    logit_lens: the k of each top-k entropy of the logit lens after every layer.
    influence: the distance D of each token's measured Forward Influence at the observation's time
        (each token evicted alone, mean KL over the next D positions; 0 = not read). It needs the
        tokens that follow, so only an offline observation of a trace with its future can hold it.
    press: the kvpress presses (``CLASS[:field=value...]``) whose scores of every token are recorded
        (`kv_compression.offline` runs them; this package does not import kvpress).
    set_search: the searches for the eviction set that minimises the future's divergence
        (`forward_influence.set_optimum`) whose results are recorded; like `influence`, they need the
        tokens that follow (`kv_compression.offline` runs them from its policies' starting scores).
    reconstruction: the reconstruction passes (`forward_influence.reconstruction`, KVzip's signal)
        whose scores of every cached entry are recorded (`kv_compression.runtime.reconstruction_pass` runs them,
        offline and online).
    """

    window: int = _read(0, max)
    top_k: frozenset[int] = _read(frozenset(), _union)
    entropy_full: bool = _read(False, _union)
    cumulative_attention: bool = _read(False, _union)
    layer_change: bool = _read(False, _union)
    final_distance: bool = _read(False, _union)
    logit_lens: frozenset[int] = _read(frozenset(), _union)
    influence: int = _read(0, max)
    press: frozenset[str] = _read(frozenset(), _union)
    set_search: frozenset[SetSearch] = _read(frozenset(), _union)
    reconstruction: frozenset[Reconstruction] = _read(frozenset(), _union)

    def __or__(self, other: Reads) -> Reads:
        """Everything either reads, each field merged by its own rule (the longer window and influence
        distance; the union of the rest)."""
        return Reads(
            **{f.name: f.metadata["merge"](getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        )

    @property
    def hidden(self) -> bool:
        """Whether the residual stream of every layer must be read."""
        return self.layer_change or self.final_distance or bool(self.logit_lens)


@dataclass
class LayerObservation:
    """One layer's view of the cache (see the module docstring for shapes). `inv_freq` holds the RoPE
    inverse frequencies ``[rotary_dim / 2]`` of the layer (None for a model without RoPE);
    `output_weight` the attention's output projection ``[hidden, heads * head_dim]`` (the model's own
    parameter, not a copy), through which each head's values reach the residual stream."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    queries: torch.Tensor
    query_positions: torch.Tensor
    cumulative_attention: torch.Tensor | None
    scaling: float
    sliding_window: int | None = None
    inv_freq: torch.Tensor | None = None
    output_weight: torch.Tensor | None = None

    @classmethod
    def of(cls, model, layer: int, **view) -> LayerObservation:
        """The view of `layer` of `model` from its cached state `view` (the fields above but the two
        the model itself holds: the layer's RoPE frequencies and output projection)."""
        return cls(
            **view,
            inv_freq=rotary_frequencies(model, layer),
            output_weight=model.get_decoder().layers[layer].self_attn.o_proj.weight,
        )


@dataclass
class Observation:
    """The cache as policies see it: per-layer views plus per-token signals by original position.

    entropy_next[k][:, p] is the top-k entropy of the distribution at position p (predicting p+1);
    `entropy` also gives the generated alignment; entropy_full[:, p] is the full-vocabulary entropy
    there. layer_change[:, l, p] is ``1 - cos`` of token p across
    layer l, final_distance[:, l, p] the cosine distance of its stream after layer l to its stream after
    the last layer, logit_lens[k][:, l, p] the top-k entropy of the logit lens after layer l,
    influence[:, p] the measured Forward Influence of token p evicted alone now, press_scores[press]
    a kvpress press's recorded scores (`kv_compression.kvpress.PressScores`: per layer
    ``[batch, kv_heads, tokens]``, at a compression ratio), set_optimum[search] what a
    set search found, reconstruction[spec][l] the ``[batch, kv_heads, tokens]`` reconstruction scores of
    layer l (each None or empty unless read). `prompt_length` is the number of prompt tokens
    when the observation is taken while decoding (None when the whole trace is the prompt).
    """

    layers: list[LayerObservation]
    entropy_next: dict[int, torch.Tensor] = field(default_factory=dict)
    entropy_full: torch.Tensor | None = None
    layer_change: torch.Tensor | None = None
    final_distance: torch.Tensor | None = None
    logit_lens: dict[int, torch.Tensor] = field(default_factory=dict)
    influence: torch.Tensor | None = None
    press_scores: dict[str, Any] = field(default_factory=dict)
    set_optimum: dict[SetSearch, SetOptimum] = field(default_factory=dict)
    reconstruction: dict[Reconstruction, list[torch.Tensor | None]] = field(default_factory=dict)
    prompt_length: int | None = None
    derived: dict = field(default_factory=dict, repr=False)  # what a policy derives once and reads per layer

    def entropy(self, top_k: int, alignment: str) -> torch.Tensor:
        """``[batch, seen]`` top-k entropy by position, ``next`` (at the token) or ``generated`` (the
        distribution that produced it; NaN for the first token)."""
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if top_k not in self.entropy_next:
            raise KeyError(f"the observation holds top-k entropies for k in {sorted(self.entropy_next)}, not {top_k}")
        table = self.entropy_next[top_k]
        return table if alignment == "next" else generated_alignment(table)

    @property
    def full_layers(self) -> list[int]:
        """The layers a policy scores: every layer but the sliding-window ones (left to their window)."""
        return [layer for layer, view in enumerate(self.layers) if view.sliding_window is None]

    def num_tokens(self, layer: int) -> int:
        return int(self.layers[layer].keys.shape[2])

    def per_token(self, layer: int, table: torch.Tensor) -> torch.Tensor:
        """A per-position table ``[batch, seen]`` gathered into the layer's cache order:
        ``[batch, kv_heads, tokens]``."""
        positions = self.layers[layer].positions
        return table.gather(1, positions.flatten(1)).reshape(positions.shape)

    def window_attention(self, layer: int, window: int | None = None) -> torch.Tensor:
        """Attention ``[batch, heads, w, tokens]`` from the last `window` observed queries."""
        obs = self.layers[layer]
        queries, query_positions = obs.queries, obs.query_positions
        if window is not None:
            queries, query_positions = queries[:, :, -window:], query_positions[-window:]
        return attention_probs(queries, obs.keys, query_positions, obs.positions, obs.scaling, obs.sliding_window)


def rotary_frequencies(model, layer: int) -> torch.Tensor | None:
    """The RoPE inverse frequencies of `layer` (models with per-layer-type RoPE, such as Gemma3, keep
    one set per type), or None when the model has no rotary embedding."""
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if rotary is None:
        return None
    types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
    frequencies = getattr(rotary, f"{types[layer]}_inv_freq", None) if types else None
    return frequencies if frequencies is not None else getattr(rotary, "inv_freq", None)


def measured_influence(tracer: Tracer, token_ids: Sequence[int], future: Sequence[int], distance: int) -> torch.Tensor:
    """``[1, len(token_ids)]``: each token of `token_ids` evicted alone at the last position, mean KL
    over the next ``min(distance, len(future))`` positions of `future` (`forward_influence.scan.scan_at`)."""
    if not len(future):
        raise InputError("a measured influence needs the tokens that follow the observed ones")
    span = min(distance, len(future))
    clean = clean_run(tracer, list(token_ids) + list(future[:span]), hidden=False)
    kl = scan_at(tracer, clean, len(token_ids) - 1, range(len(token_ids)), span).kl
    return torch.as_tensor(np.nanmean(kl, axis=1), dtype=torch.float32, device=tracer.device)[None]


def observe(
    tracer: Tracer,
    token_ids: Sequence[int] | torch.Tensor,
    reads: Reads = Reads(),
    future: Sequence[int] = (),
    influence: torch.Tensor | None = None,
) -> Observation:
    """The observation of a cache holding `token_ids` with what `reads` asks for, from one traced pass
    (batch 1). The last ``max(reads.window, QUERY_WINDOW)`` queries are kept; the stream signals come
    from `forward_influence.stream_signals` over the whole trace. A measured influence
    (`Reads.influence`) is taken from `influence` when given (``[1, tokens]``), else measured on
    `future`, the tokens that follow."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    readout = tracer.run(ids[None], use_cache=True, hidden=reads.hidden, queries=True)
    positions = torch.arange(len(ids), device=tracer.device)
    window = max(reads.window, QUERY_WINDOW)
    layers = []
    for index, module in enumerate(tracer.model.get_decoder().layers):
        attention, cached = module.self_attn, readout.cache.layers[index]
        sliding, query = tracer.layout.windows[index], readout.queries[index]
        received = None
        if reads.cumulative_attention:
            received = attention_received(query, cached.keys, positions, positions, attention.scaling, sliding)
        layers.append(
            LayerObservation.of(
                tracer.model,
                index,
                keys=cached.keys,
                values=cached.values,
                positions=positions.expand(*cached.keys.shape[:3]),
                queries=query[:, :, -window:],
                query_positions=positions[-window:],
                cumulative_attention=received,
                scaling=attention.scaling,
                sliding_window=sliding,
            )
        )
    streams = Streams(layers=readout.hidden if reads.hidden else None, final=readout.final)
    if reads.influence and influence is None:
        influence = measured_influence(tracer, ids.tolist(), list(future), reads.influence)
    return Observation(
        layers, **stream_tables(tracer.model, reads, streams), influence=influence if reads.influence else None
    )
