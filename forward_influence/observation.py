"""Observations: what a scoring policy may read about the cached tokens, per layer and per token.

A compression policy decides from an `Observation` of the cache: per layer the cached keys and
values, the last `window` query states, the attention each key has received from every query so far
(H2O's cumulative attention) and each token's representation change across that layer; per token
its top-k entropies and original position. The tracer builds observations offline (`observe`, one
nnsight pass over a trace) and the compression runtime builds them online during generation; both
use the functions of this module, so the same input gives the same scores.

Shapes, per layer: keys and values ``[batch, kv_heads, tokens, head_dim]`` (after RoPE, as cached),
their original positions ``[batch, kv_heads, tokens]`` (heads may keep different tokens once a
policy has evicted per head), queries ``[batch, heads, window, head_dim]`` with their positions
``[window]``, cumulative attention ``[batch, heads, tokens]`` (in the cache order of each head's KV
group). Per token, indexed by original position: entropies ``[batch, seen]`` and representation
change ``[batch, layers, seen]``; a token's signals are fixed once it has been processed, so they
never need re-indexing after an eviction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .logits import DEFAULT_CHUNK, topk_entropy
from .tracer import Tracer

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
    over each group), causal by original position and limited to the sliding window if any."""
    group = query.shape[1] // key.shape[1]
    key = key.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(query.float(), key.transpose(-1, -2)) * scaling
    if key_positions.dim() == 3:  # [batch, kv_heads, keys]: per-head positions
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
    """Attention each key receives, summed over the queries: ``[batch, heads, keys]``, `chunk` queries
    at a time (memory: ``chunk x keys`` scores per head). `key_positions` is ``[keys]`` or
    ``[batch, kv_heads, keys]``."""
    total = torch.zeros(query.shape[0], query.shape[1], key.shape[2], dtype=torch.float32, device=key.device)
    for start in range(0, query.shape[2], chunk):
        probs = attention_probs(
            query[:, :, start : start + chunk], key, query_positions[start : start + chunk], key_positions,
            scaling, sliding_window,
        )
        total += probs.sum(dim=2)
    return total


def lens_entropy(model, hidden: torch.Tensor, top_k: int = 10) -> torch.Tensor:
    """Top-k entropy of the logit lens (final norm and output head applied to a layer's residual
    stream ``[1, tokens, hidden]``): ``[1, tokens]``, computed a chunk of positions at a time."""
    # .forward, not __call__: the norm's hooks (the runtime records final states there) must not fire.
    normed = model.get_decoder().norm.forward(hidden.to(model.dtype))
    return topk_entropy(model, normed[0].float(), top_k=top_k)[None]


def evolution(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> torch.Tensor:
    """Representation change across a layer, ``1 - cos(h_in, h_out)`` per token: ``[batch, tokens]``."""
    return 1.0 - torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)


@dataclass
class LayerObservation:
    """One layer's view of the cache (see the module docstring for shapes)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    queries: torch.Tensor
    query_positions: torch.Tensor
    cumulative_attention: torch.Tensor | None
    scaling: float
    sliding_window: int | None = None


@dataclass
class Observation:
    """The cache as policies see it: per-layer views plus per-token signals by original position.

    entropy_next[:, p] is the top-k entropy of the distribution at position p (predicting p+1; NaN
    where not yet known), entropy_generated[:, p] that of the distribution that produced token p
    (NaN for the first token), evolution[:, l, p] the change ``1 - cos`` of token p across layer l
    (NaN where not read), logit_lens[:, l, p] the top-k entropy of the logit lens after layer l
    (None unless requested: it costs one output-head pass per layer). `top_k` is the k of the
    entropies.
    """

    layers: list[LayerObservation]
    entropy_next: torch.Tensor
    entropy_generated: torch.Tensor
    evolution: torch.Tensor
    top_k: int = 10
    logit_lens: torch.Tensor | None = None

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


def observe(
    tracer: Tracer,
    token_ids: Sequence[int] | torch.Tensor,
    window: int = 64,
    top_k: int = 10,
    chunk: int = DEFAULT_CHUNK,
    logit_lens: bool = False,
) -> Observation:
    """The observation of a cache holding `token_ids`, from one traced pass (batch 1)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    readout = tracer.run(ids[None], use_cache=True, hidden=True, queries=True)
    positions = torch.arange(len(ids), device=tracer.device)
    entropy_next = topk_entropy(tracer.model, readout.final[0], top_k=top_k, chunk=chunk)
    entropy_generated = torch.cat([torch.full((1,), float("nan")), entropy_next[:-1]])
    layers = []
    for index, module in enumerate(tracer.model.get_decoder().layers):
        attention = module.self_attn
        cached = readout.cache.layers[index]
        window_size = tracer.layout.windows[index]
        query = readout.queries[index]
        layers.append(
            LayerObservation(
                keys=cached.keys,
                values=cached.values,
                positions=positions.expand(*cached.keys.shape[:3]),
                queries=query[:, :, -window:],
                query_positions=positions[-window:],
                cumulative_attention=attention_received(
                    query, cached.keys, positions, positions, attention.scaling, window_size
                ),
                scaling=attention.scaling,
                sliding_window=window_size,
            )
        )
    change = torch.stack([evolution(readout.hidden[i], readout.hidden[i + 1]) for i in range(len(layers))], dim=1)
    lens = None
    if logit_lens:
        lens = torch.stack([lens_entropy(tracer.model, h, top_k) for h in readout.hidden[1:]], dim=1)
    return Observation(layers, entropy_next[None], entropy_generated[None], change, top_k=top_k, logit_lens=lens)
