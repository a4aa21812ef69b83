"""The reconstruction pass: KVzip's signal, run over a cache as the runtime holds it.

`reconstruction_scores` feeds each chunk's reconstruction input
(`forward_influence.reconstruction.chunk_inputs`) to the model over a frozen snapshot of a
`CompressedCache` (it neither compresses nor records, and the cache it was taken from is left as it
was), positioned after every token seen, and reads each full-attention layer's queries and keys
through an attention function registered with transformers' `AttentionInterface`, which wraps the
model's own. The runtime calls it when it compresses (online); `kv_compression.offline` calls it on a
cache that holds a trace's prefill (`held`), so both compute the same scores from the same state.
Its cost is one forward pass over the context and the instructions, attending over the cache: about
one more prefill (`analyses/benchmarks/bench_compression.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from forward_influence.models import attention_implementation, cache_argument
from forward_influence.reconstruction import (
    Reconstruction,
    ReconstructionPrompt,
    chunk_inputs,
    reconstruction_received,
)

if TYPE_CHECKING:
    from .cache import CompressedCache

_NAME = "kv_compression_reconstruction_{}"
_STATE = "_kv_compression_reconstruction"


class _Pass:
    """What one reconstruction pass reads per layer, and where it adds its scores."""

    def __init__(self, cache: CompressedCache, spec: Reconstruction, start: int, end: int, scores: dict) -> None:
        self.cache, self.spec, self.start, self.end, self.scores = cache, spec, start, end, scores
        self.hidden_norm: dict[int, torch.Tensor] = {}

    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        layer = module.layer_idx
        if layer not in self.cache.full_layers:
            return
        positions = self.cache.layers[layer].positions
        n = key.shape[2] - query.shape[2]
        weights = None
        if self.spec.plus:
            weights = (self.hidden_norm[layer], value_output_norm(module.o_proj.weight, value, query.shape[1]))
        received = reconstruction_received(
            query, key, positions[..., :n], self.start, self.end, self.spec.sinks, module.scaling, weights
        )
        self.scores[layer] = torch.maximum(self.scores[layer], received)


def value_output_norm(weight: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """``[batch, heads, tokens]``: the L2 norm of each value written through each query head's slice of
    the output projection `weight` ``[hidden, heads * head_dim]``."""
    b, kv_heads, n, head_dim = value.shape
    per_head = weight.float().reshape(weight.shape[0], heads, head_dim)  # [hidden, heads, head_dim]
    grouped = value.float().repeat_interleave(heads // kv_heads, dim=1)  # [b, heads, n, head_dim]
    return torch.stack([grouped[:, h] @ per_head[:, h].T for h in range(heads)], dim=1).norm(dim=-1)


def _capturing_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        state = getattr(module, _STATE, None)
        if state is not None:
            state.attend(module, query, key, value)
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)

    return attention


for _base in ("sdpa", "eager"):
    AttentionInterface.register(_NAME.format(_base), _capturing_attention(_base))
    AttentionMaskInterface.register(_NAME.format(_base), ALL_MASK_ATTENTION_FUNCTIONS[_base])


@contextlib.contextmanager
def _installed(model, state: _Pass) -> Iterator[None]:
    decoder, handles = model.get_decoder(), []
    for layer in decoder.layers:
        setattr(layer.self_attn, _STATE, state)
        if state.spec.plus:

            def norm(module, args, kwargs):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                state.hidden_norm[module.layer_idx] = hidden.float().norm(dim=-1)

            handles.append(layer.self_attn.register_forward_pre_hook(norm, with_kwargs=True))
    # Inside the runtime the model runs its recording wrapper ("kv_compression_sdpa"): wrap the base.
    base = model.config._attn_implementation.removeprefix("kv_compression_")
    try:
        with attention_implementation(model, _NAME.format(base)):
            yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in decoder.layers:
            delattr(layer.self_attn, _STATE)


def reconstruction_scores(
    model, cache: CompressedCache, token_ids: Sequence[int], spec: Reconstruction, prompt: ReconstructionPrompt
) -> list[torch.Tensor | None]:
    """Per layer, ``[1, kv_heads, tokens]`` reconstruction scores of the entries `cache` holds (in cache
    order; None for sliding-window layers), where `token_ids` are every token the cache has seen."""
    scores = {
        layer: torch.zeros(cache.layers[layer].positions.shape, device=cache.layers[layer].keys.device)
        for layer in cache.full_layers
    }
    decoder = model.get_decoder()
    for start, end, ids in chunk_inputs(prompt, token_ids, spec.chunk):
        held = cache.snapshot()
        held.frozen = True
        positions = torch.arange(cache.seen, cache.seen + len(ids), device=model.device)[None]
        with _installed(model, _Pass(held, spec, start, end, scores)), torch.no_grad():
            decoder(torch.tensor([ids], device=model.device), position_ids=positions, **cache_argument(held))
    return [scores.get(layer) for layer in range(cache.num_layers)]
