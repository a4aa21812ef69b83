"""The compression runtime: a transformers cache that scores and physically evicts during generation.

`CompressedCache` is a `DynamicCache`. While it is active (`compressing(model, cache)`, or
`generate`), hooks record what its policy needs, online, through the same functions the tracer's
offline `observe` uses: each layer's last query states and the attention each key has received
(an attention function registered with transformers' `AttentionInterface` wraps the model's own
``sdpa`` or ``eager`` one), each token's representation change across every layer (decoder-layer
hooks), and each token's top-k entropy from the final hidden states (computed a chunk of positions at
a time, so a long prompt never materialises ``[tokens, vocab]`` logits).

Eviction happens at the start of a forward pass, before its queries attend: after the prefill when
the prompt exceeds the budget, then whenever a layer holds more than budget + `buffer` tokens
(R-KV's schedule). The budget is fixed at the prefill: a ratio is taken of the prompt length, a
count may exceed the prompt (then only decoding evicts, as for reasoning traces). Each
KV head keeps the same number of entries (its own top-scoring ones), so the cache stays dense.
Kept keys keep their RoPE rotation of their original positions (no re-rotation): generation
passes the original position ids, so compressed generation equals the tracer's masked simulation
of the same evictions (`replay_specs`). Sliding-window layers (Gemma3) keep their own window and
are not compressed. Batch size 1 only: a batch of several sequences is refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from forward_influence.errors import InputError
from forward_influence.eviction import EvictionSpec
from forward_influence.logits import topk_entropy
from forward_influence.observation import LayerObservation, Observation, attention_received, evolution, lens_entropy

from .budget import Budget, kept_indices
from .policies import Policy

_NAME = "kv_compression_{}"
_RECORDER = "_kv_compression_cache"


def _recording_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        output = ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)
        cache = getattr(module, _RECORDER, None)
        if cache is not None:
            cache.record_attention(module, query, key)
        return output

    return attention


for _base in ("sdpa", "eager"):
    AttentionInterface.register(_NAME.format(_base), _recording_attention(_base))
    AttentionMaskInterface.register(_NAME.format(_base), ALL_MASK_ATTENTION_FUNCTIONS[_base])


@dataclass
class _LayerState:
    positions: torch.Tensor | None = None  # [1, kv_heads, tokens]
    queries: torch.Tensor | None = None  # [1, heads, <= window, head_dim]
    query_positions: torch.Tensor | None = None
    cumulative: torch.Tensor | None = None  # [1, heads, tokens]
    scaling: float = 1.0


@dataclass
class Compression:
    """One eviction event: at `time` (the last position processed), the kept original positions per
    full-attention layer ``{layer: [kv_heads, k]}`` and the positions each head held before."""

    time: int
    kept: dict[int, torch.Tensor]
    before: dict[int, torch.Tensor] = field(repr=False)


class CompressedCache(DynamicCache):
    """A `DynamicCache` that keeps `budget` tokens per layer, chosen by `policy` (see the module docstring).

    Attributes after generation: `seen` (tokens processed), `budget_tokens` and `layer_targets` (the
    per-layer budgets fixed at the prefill), `compressions` (the eviction events), `last_observation`
    (what the policy scored at the last eviction).
    """

    def __init__(self, model: PreTrainedModel, policy: Policy, budget: Budget, buffer: int = 128,
                 window: int = 64, top_k: int | None = None):
        super().__init__(config=model.config)
        if buffer < 0:
            raise InputError(f"buffer must be >= 0, got {buffer}")
        if budget.head_floor is not None:
            raise InputError("per-head budgets (AdaKV) need a ragged cache; the runtime keeps dense caches, "
                             "so use them with the tracer (score, Forward Influence) only")
        self.model, self.policy, self.budget, self.buffer, self.window = model, policy, budget, buffer, window
        self.top_k = top_k if top_k is not None else getattr(policy, "top_k", 10)
        text = model.config.get_text_config(decoder=True)
        self.num_layers = text.num_hidden_layers
        types = getattr(text, "layer_types", None) or ["full_attention"] * self.num_layers
        self.full_layers = [i for i, kind in enumerate(types) if kind != "sliding_attention"]
        self.sliding_window = getattr(text, "sliding_window", None)
        self.states = [_LayerState() for _ in range(self.num_layers)]
        self.seen = 0
        self.budget_tokens: int | None = None
        self.layer_targets: list[int] = []
        self.compressions: list[Compression] = []
        self.last_observation: Observation | None = None
        self._entropy_next: list[torch.Tensor] = []
        self._evolution: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._lens: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._step_positions: torch.Tensor | None = None
        self.needs = policy.requires()

    # -- recording ----------------------------------------------------------------------------

    def record_attention(self, module, query: torch.Tensor, key: torch.Tensor) -> None:
        layer = module.layer_idx
        if layer not in self.full_layers:
            return
        state = self.states[layer]
        state.scaling = module.scaling
        q_positions = self._step_positions
        queries = query.detach().float() if state.queries is None else torch.cat([state.queries, query.float()], dim=2)
        positions = q_positions if state.query_positions is None else torch.cat([state.query_positions, q_positions])
        state.queries, state.query_positions = queries[:, :, -self.window :], positions[-self.window :]
        if "cumulative_attention" in self.needs:
            received = attention_received(query, key, q_positions, state.positions, module.scaling)
            old = state.cumulative
            if old is not None:
                received[:, :, : old.shape[2]] += old
            state.cumulative = received

    def record_layer(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        if "evolution" in self.needs:
            self._evolution[layer].append(evolution(hidden_in, hidden_out).detach())
        if "logit_lens" in self.needs:
            self._lens[layer].append(lens_entropy(self.model, hidden_out.detach(), self.top_k))

    def record_final(self, final: torch.Tensor) -> None:
        if "entropy" in self.needs:
            top = topk_entropy(self.model, final[0].float(), top_k=self.top_k)
        else:  # unread: keep the per-position table aligned without computing logits
            top = torch.full((final.shape[1],), float("nan"), device=final.device)
        self._entropy_next.append(top[None])

    # -- the cache ----------------------------------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise InputError("CompressedCache supports batch size 1 only; generate one sequence at a time")
        if layer_idx == 0:
            self.maybe_compress()
            new = key_states.shape[2]
            self._step_positions = torch.arange(self.seen, self.seen + new, device=key_states.device)
            self.seen += new
        if layer_idx in self.full_layers:
            state = self.states[layer_idx]
            fresh = self._step_positions.expand(1, key_states.shape[1], -1)
            state.positions = fresh if state.positions is None else torch.cat([state.positions, fresh], dim=2)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def maybe_compress(self) -> bool:
        """Compress if due (after the prefill, or past budget + buffer); `update` calls this at the
        start of every forward pass. Returns whether it compressed."""
        if self.seen and self._due():
            self.compress()
            return True
        return False

    def _due(self) -> bool:
        if not self.full_layers:
            return False
        lengths = {l: self.layers[l].keys.shape[2] for l in self.full_layers}
        if self.budget_tokens is None:  # the first check follows the prefill
            # A count larger than the prompt is a decoding budget: nothing is evicted until the cache
            # outgrows it (a fixed sequence, as `score` reads, refuses such a count instead).
            prompt = lengths[self.full_layers[0]]
            self.budget_tokens = self.budget.tokens(prompt) if self.budget.is_ratio else int(self.budget.value)
            self.layer_targets = self.policy.layer_budgets(self.budget_tokens, self.num_layers)
            return any(n > self.layer_targets[l] for l, n in lengths.items())
        return any(n > self.layer_targets[l] + self.buffer for l, n in lengths.items())

    def observation(self) -> Observation:
        """What the policy sees now (full-attention layers; sliding ones are left out)."""
        entropy_next = torch.cat(self._entropy_next, dim=1)
        generated = torch.cat([torch.full_like(entropy_next[:, :1], float("nan")), entropy_next[:, :-1]], dim=1)
        seen = entropy_next.shape[1]
        change = torch.full((1, self.num_layers, seen), float("nan"), device=entropy_next.device)
        for layer, rows in enumerate(self._evolution):
            if rows:
                change[:, layer] = torch.cat(rows, dim=1)
        lens = None
        if "logit_lens" in self.needs:
            lens = torch.stack([torch.cat(rows, dim=1) for rows in self._lens], dim=1)
        views = []
        for layer in range(self.num_layers):
            state, cached = self.states[layer], self.layers[layer]
            sliding = layer not in self.full_layers
            views.append(
                LayerObservation(
                    keys=cached.keys, values=cached.values,
                    positions=state.positions if not sliding else torch.zeros(1, cached.keys.shape[1], 0, dtype=torch.long),
                    queries=state.queries, query_positions=state.query_positions,
                    cumulative_attention=state.cumulative, scaling=state.scaling,
                    sliding_window=self.sliding_window if sliding else None,
                )
            )
        return Observation(views, entropy_next, generated, change, top_k=self.top_k, logit_lens=lens)

    def compress(self) -> None:
        """Score every full-attention layer and keep `budget_tokens` entries per KV head, physically."""
        obs = self.observation()
        kept = kept_indices(self.policy, obs, Budget(self.budget_tokens, is_ratio=False))
        event = Compression(time=self.seen - 1, kept={}, before={})
        for layer, index in enumerate(kept):
            if index is None:
                continue
            state, cached = self.states[layer], self.layers[layer]
            gather = index[..., None].expand(-1, -1, -1, cached.keys.shape[-1])
            event.before[layer] = state.positions[0]
            cached.keys, cached.values = cached.keys.gather(2, gather), cached.values.gather(2, gather)
            state.positions = state.positions.gather(2, index)
            if state.cumulative is not None:
                group = state.cumulative.shape[1] // index.shape[1]
                state.cumulative = state.cumulative.gather(2, index.repeat_interleave(group, dim=1))
            event.kept[layer] = state.positions[0]
        self.compressions.append(event)
        self.last_observation = obs

    def sizes(self) -> dict[str, int]:
        """``full_tokens`` (tokens seen), ``kept_tokens`` (in the first full layer), and the bytes of
        keys and values in every layer now (``kept_bytes``) and without eviction (``full_bytes``)."""
        kept_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers if l.is_initialized)
        full_bytes = sum(
            l.keys.shape[0] * l.keys.shape[1] * l.keys.shape[3] * l.keys.element_size() * 2 * self.seen
            if i in self.full_layers else l.keys.numel() * l.keys.element_size() * 2
            for i, l in enumerate(self.layers) if l.is_initialized
        )
        kept = self.layers[self.full_layers[0]].keys.shape[2] if self.full_layers else self.seen
        return dict(full_tokens=self.seen, kept_tokens=kept, full_bytes=full_bytes, kept_bytes=kept_bytes)


def replay_specs(cache: CompressedCache) -> list[EvictionSpec]:
    """The cache's evictions as tracer specs (one per compression, layer and KV head), for
    `forward_influence.eviction.build_masks` to simulate the same generation by masking."""
    specs = []
    for event in cache.compressions:
        for layer, kept in event.kept.items():
            for head in range(kept.shape[0]):
                keep = set(kept[head].tolist())
                evicted = tuple(p for p in event.before[layer][head].tolist() if p not in keep)
                if evicted:
                    specs.append(EvictionSpec(evicted, event.time, layers=(layer,), heads=(head,)))
    return specs


@contextlib.contextmanager
def compressing(model: PreTrainedModel, cache: CompressedCache) -> Iterator[CompressedCache]:
    """Install the recording hooks and attention function for `cache` on `model`, for the block."""
    base = model.config._attn_implementation
    if base not in ("sdpa", "eager"):
        raise InputError(f"compression runs with sdpa or eager attention, not {base!r}")
    decoder = model.get_decoder()
    handles = []
    for index, layer in enumerate(decoder.layers):
        setattr(layer.self_attn, _RECORDER, cache)

        def hook(module, args, kwargs, output, index=index):
            hidden_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cache.record_layer(index, hidden_in, hidden_out)

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    handles.append(decoder.norm.register_forward_hook(lambda module, args, output: cache.record_final(output)))
    model.set_attn_implementation(_NAME.format(base))
    try:
        yield cache
    finally:
        model.set_attn_implementation(base)
        for handle in handles:
            handle.remove()
        for layer in decoder.layers:
            if hasattr(layer.self_attn, _RECORDER):
                delattr(layer.self_attn, _RECORDER)


def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    policy: Policy,
    budget: Budget,
    buffer: int = 128,
    max_new_tokens: int = 64,
    **generate_kwargs,
) -> tuple[torch.Tensor, CompressedCache]:
    """`model.generate` with a `CompressedCache`: returns the generated ids ``[1, prompt + new]`` and
    the cache (its `sizes()` and `compressions` tell what was kept). Extra keyword arguments go to
    `model.generate` (e.g. ``do_sample=True, temperature=0.7``); greedy by default."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise InputError("compressed generation supports batch size 1 only; generate one sequence at a time")
    cache = CompressedCache(model, policy, budget, buffer=buffer)
    generate_kwargs.setdefault("do_sample", False)
    with compressing(model, cache), torch.no_grad():
        output = model.generate(
            input_ids.to(model.device),
            attention_mask=torch.ones_like(input_ids, device=model.device),
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            min_new_tokens=generate_kwargs.pop("min_new_tokens", 0),
            **generate_kwargs,
        )
    return output, cache
