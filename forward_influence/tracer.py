"""The nnsight tracer: one traced forward pass that applies eviction masks and reads the model.

A `Tracer` wraps a loaded model in nnsight's `TransformersModel` and runs `Tracer.run`, the only
traced pass of the toolkit. In that pass it can

- replace each layer's attention mask (the per-layer masks of `forward_influence.eviction`),
- read the residual stream before the first layer and after every layer (``hidden``),
- read the final normed hidden states (``final``; logits are made from them in chunks, see
  `forward_influence.logits`),
- read the query states each attention layer receives (after projections, norms and RoPE), from
  which `forward_influence.attention` recomputes the attention a cached key receives,
- extend a transformers `DynamicCache`, so later passes can start from it (its keys are the other
  half of the attention readout).

Forward Influence passes start from a cache of the clean run (positions up to the eviction time are
unaffected by an eviction at that time, so they are computed once) and run only the suffix, with one
batch row per eviction spec. The code inside the traced block is plain torch with no local side
effects, so the same pass runs remotely (NDIF) where nnsight supports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nnsight
import torch
from nnsight import TransformersModel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .errors import InputError
from .eviction import AttentionLayout
from .models import LoadedModel, cache_argument


@dataclass
class Readout:
    """What one traced pass read; every tensor is float32 on the model's device.

    final: ``[batch, tokens, hidden]`` final normed hidden states.
    hidden: ``[layers + 1, batch, tokens, hidden]`` residual stream (embeddings, then after each layer),
        or None.
    queries: per layer, the query states ``[batch, heads, tokens, head_dim]`` as the attention
        function receives them (after projections, norms and RoPE), or None.
    cache: the `DynamicCache` after the pass, when one was used.
    """

    final: torch.Tensor
    hidden: torch.Tensor | None = None
    queries: list[torch.Tensor] | None = None
    cache: DynamicCache | None = None


def _module_path(root: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in the model")


def _envoy(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


class Tracer:
    """Runs traced passes over one model (one `Tracer` per thread; nnsight wrappers are not shared)."""

    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.layout = AttentionLayout.from_config(self.model.config)
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.lm = TransformersModel(self.model, tokenizer=self.tokenizer)
        decoder = self.model.get_decoder()
        base = _envoy(self.lm, _module_path(self.model, decoder))
        self._embed = _envoy(base, _module_path(decoder, decoder.get_input_embeddings()))
        self._layers = list(base.layers)
        self._norm = base.norm

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        masks: Sequence[torch.Tensor] | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        hidden: bool = False,
        queries: bool = False,
        remote: bool = False,
        grad: bool = False,
    ) -> Readout:
        """One traced forward pass over ``input_ids [batch, tokens]``.

        `masks` holds one additive mask per layer (see `build_masks`); layers sharing the first
        layer's tensor take it from the model's input, the others get theirs written into their
        attention inputs. The pass runs under the model's own attention implementation.

        `remote` runs the pass on NDIF through nnsight (a model NDIF serves, an API key configured). Only
        a pass without a cache can: a `DynamicCache` is a local object that the trace cannot send, so
        ``use_cache``/``cache`` with `remote` is an `InputError`. Remote-capable: plain readouts of
        final states, hidden states and queries (entropies, representation change, masked full-sequence
        passes). Local only: whatever starts from or extends a cache (Forward Influence's cached prefix,
        the scan, observations' keys, the compression runtime).

        `grad` keeps autograd on, so the readout is differentiable in whatever the masks carry (the soft
        gates of `forward_influence.gates`); the model's parameters stay frozen (loading turns their
        gradients off), so only the masks' inputs receive gradients.
        """
        if remote and (cache is not None or use_cache):
            raise InputError("a traced pass that uses a cache cannot run remotely on NDIF: the cache is a local object")
        input_ids = input_ids.to(self.device)
        if cache is None and use_cache:
            cache = DynamicCache()  # full layers only: sliding windows live in the masks
        kwargs = dict(**cache_argument(cache), use_cache=cache is not None, logits_to_keep=1)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.to(self.device)
        if masks is not None:
            kwargs["attention_mask"] = masks[0]
        with torch.set_grad_enabled(grad):
            with self.lm.trace(input_ids, remote=remote, **kwargs):
                states = nnsight.save([self._embed.output] if hidden else [])
                query_states = nnsight.save([])
                for index, layer in enumerate(self._layers):
                    if masks is not None and masks[index] is not masks[0]:
                        args, kw = layer.self_attn.inputs
                        layer.self_attn.inputs = (args, {**kw, "attention_mask": masks[index]})
                    if queries:
                        # The attention function's call site: (module, query, key, value, mask, ...).
                        call_args, _ = layer.self_attn.source.attention_interface_1.inputs
                        query_states.append(call_args[1].float())
                    if hidden:
                        states.append(layer.output)
                final = nnsight.save(self._norm.output)
        return Readout(
            final=final.float(),
            hidden=torch.stack(states).float() if hidden else None,
            queries=list(query_states) if queries else None,
            cache=cache,
        )


def expand_cache(cache: DynamicCache, length: int, batch: int) -> DynamicCache:
    """A new cache holding the first `length` positions of a batch-1 `cache`, repeated `batch` times.

    The rows are broadcast views (no copy); the cache's first update concatenates the new keys and
    materialises them once. Every layer is a plain full-attention layer, whatever the model's layer
    types: sliding windows are enforced by the masks, which need every cached key in place.
    """
    layers = []
    for source in cache.layers:
        layer = DynamicLayer()
        layer.lazy_initialization(source.keys, source.values)
        layer.keys = source.keys[:, :, :length].expand(batch, -1, -1, -1)
        layer.values = source.values[:, :, :length].expand(batch, -1, -1, -1)
        layers.append(layer)
    expanded = DynamicCache()
    expanded.layers = layers
    return expanded
