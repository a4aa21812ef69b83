"""The compression runtime: a transformers cache that scores and physically evicts during generation.

`CompressedCache` is a `DynamicCache` whose full-attention layers are `CompressedLayer`s (transformers'
extension point for per-layer cache state): each remembers the original position of every entry and
what its policy reads about the layer. While the cache is active (`compressing(model, cache)`, or
`generate` / `teacher_forced`), hooks record what the policy declares in `Policy.reads`, online,
through the same functions the tracer's offline observation uses: each layer's recent query states
and the attention each key has received (an attention function registered with transformers'
`AttentionInterface` wraps the model's own ``sdpa`` or ``eager`` one), each token's representation
change across every layer and its distance to the last layer (decoder-layer hooks), and its top-k
entropies from the final hidden states (computed a chunk of positions at a time, so a long prompt
never materialises ``[tokens, vocab]`` logits).

Schedule. A compression happens at the start of a forward pass, before its queries attend: after the
prefill when the prompt exceeds the budget, then once a layer holds its budget + `buffer` tokens, so
`buffer` is the compression interval (R-KV's 128; the InfoKV paper's 1024). The budget of a
compression is `Budget.target` of the prompt and the tokens seen (fixed for a ratio or a count,
growing for ``prompt+RATIO``). Each KV head keeps the same number of entries (its own top-scoring
ones), so the cache stays dense. Kept keys keep their RoPE rotation of their original positions (no
re-rotation): the cache reports the original length, and each layer offsets its causal mask by the
tokens it has evicted, so a block of new tokens attends exactly as it would one token at a time, and
compressed generation equals the tracer's masked simulation of the same evictions (`replay_specs`).
Sliding-window layers (Gemma3) keep their own window and are not compressed. Batch size 1 only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from forward_influence.attention import attention_received
from forward_influence.defaults import QUERY_WINDOW
from forward_influence.errors import InputError
from forward_influence.eviction import EvictionSpec, evictions
from forward_influence.logits import logits_of, topk_entropies
from forward_influence.models import attention_implementation, cache_argument
from forward_influence.observation import LayerObservation, Observation, lens_entropies, rotary_frequencies
from forward_influence.reconstruction import Reconstruction, reconstruction_prompt
from forward_influence.signals import distance_to_final, representation_change

from .budget import BUFFER, Budget
from .kept import layer_scores, top_indices
from .policies import Policy
from .reconstruction_pass import reconstruction_scores

SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.9)
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


@dataclass
class Compression:
    """One eviction event: at `time` (the last position processed), the kept original positions per
    full-attention layer ``{layer: [kv_heads, k]}`` and the positions each head held before."""

    time: int
    kept: dict[int, torch.Tensor]
    before: dict[int, torch.Tensor] = field(repr=False)


class CompressedCache(DynamicCache):
    """A `DynamicCache` that keeps a budget of tokens per layer, chosen by `policy` (see the module
    docstring).

    Attributes after generation: `seen` (tokens processed), `prompt_length`, `planned` (the per-layer
    budgets of the last compression), `compressions` (the eviction events), `last_observation` (what
    the policy scored at the last eviction). A `frozen` cache neither compresses nor records. A policy
    that reconstructs the context (KVzip) needs the `tokenizer` to build its prompt.
    """

    def __init__(self, model: PreTrainedModel, policy: Policy, budget: Budget, buffer: int = BUFFER, tokenizer=None):
        super().__init__(config=model.config)
        if buffer < 0:
            raise InputError(f"--buffer must be at least 0, got {buffer}")
        if not policy.online:
            raise InputError(
                f"policy {policy.name!r} scores from a measured trace only; it cannot compress while generating"
            )
        if budget.head_floor is not None:
            raise InputError(
                "per-head budgets (AdaKV) need a ragged cache; the runtime keeps dense caches, "
                "so use them with the tracer (score, Forward Influence) only"
            )
        self.model, self.policy, self.budget, self.buffer = model, policy, budget, buffer
        self.reads = policy.reads()
        self.prompt = None
        if self.reads.reconstruction:
            if tokenizer is None:
                raise InputError(
                    f"policy {policy.name!r} reconstructs the context from the cache: pass the tokenizer, "
                    "which builds its prompt"
                )
            self.prompt = reconstruction_prompt(tokenizer)
        self.frozen = False
        self.token_ids: list[int] = []  # every token seen, for a pass that reconstructs them
        self.window = max(self.reads.window, QUERY_WINDOW)
        text = model.config.get_text_config(decoder=True)
        self.num_layers = text.num_hidden_layers
        types = getattr(text, "layer_types", None) or ["full_attention"] * self.num_layers
        self.full_layers = [i for i, kind in enumerate(types) if kind != "sliding_attention"]
        self.sliding_window = getattr(text, "sliding_window", None)
        for index in self.full_layers:
            self.layers[index] = CompressedLayer()
        self.seen = 0
        self.prompt_length: int | None = None
        self.planned: list[int] | None = None
        self.compressions: list[Compression] = []
        self.last_observation: Observation | None = None
        self._entropy: dict[int, list[torch.Tensor]] = {k: [] for k in self.reads.top_k}
        self._layer_change: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._final_distance: list[torch.Tensor] = []
        self._lens: dict[int, list[list[torch.Tensor]]] = {
            k: [[] for _ in range(self.num_layers)] for k in self.reads.logit_lens
        }
        self._outputs: list[torch.Tensor] = []
        self._step: torch.Tensor | None = None

    # -- recording ----------------------------------------------------------------------------

    def record_ids(self, ids: torch.Tensor) -> None:
        if self.reads.reconstruction and not self.frozen:
            self.token_ids += ids[0].tolist()

    def record_attention(self, module, query: torch.Tensor, key: torch.Tensor) -> None:
        if module.layer_idx in self.full_layers and not self.frozen:
            self.layers[module.layer_idx].record(
                query, key, self._step, self.window, self.reads.cumulative_attention, module.scaling
            )

    def record_layer(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        if self.frozen:
            return
        hidden_out = hidden_out.detach()
        if self.reads.layer_change:
            self._layer_change[layer].append(representation_change(hidden_in, hidden_out))
        if self.reads.logit_lens:
            for k, value in lens_entropies(self.model, hidden_out, sorted(self.reads.logit_lens)).items():
                self._lens[k][layer].append(value)
        if self.reads.final_distance:
            self._outputs.append(hidden_out)
            if layer == self.num_layers - 1:  # the stream after the last layer is known: D of every layer
                self._final_distance.append(distance_to_final(self._outputs).transpose(0, 1))
                self._outputs = []

    def record_final(self, final: torch.Tensor) -> None:
        if self.reads.top_k and not self.frozen:
            for k, value in topk_entropies(self.model, final[0].float(), self.reads.top_k).items():
                self._entropy[k].append(value[None])

    # -- the cache ----------------------------------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise InputError("CompressedCache supports batch size 1 only; generate one sequence at a time")
        if layer_idx == 0:
            self.maybe_compress()
            new = key_states.shape[2]
            self._step = torch.arange(self.seen, self.seen + new, device=key_states.device)
            if self.prompt_length is None:
                self.prompt_length = new
            self.seen += new
        if layer_idx in self.full_layers:
            self.layers[layer_idx].add_positions(self._step, key_states.shape[1])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def layer_targets(self) -> list[int]:
        """Kept tokens per layer if the cache compressed now."""
        return self.policy.layer_budgets(self.budget.target(self.prompt_length, self.seen), self.num_layers)

    def due(self) -> bool:
        """Whether a compression is due now: after the prefill, if a layer holds more than its budget;
        later, once a layer holds its budget of the last compression (or of the prefill) + `buffer`."""
        held = {layer: self.layers[layer].keys.shape[2] for layer in self.full_layers}
        if self.planned is None:
            targets = self.layer_targets()
            return any(n > targets[layer] for layer, n in held.items())
        return any(n > self.planned[layer] and n >= self.planned[layer] + self.buffer for layer, n in held.items())

    def maybe_compress(self) -> bool:
        """Compress if due; `update` calls this at the start of every forward pass. Returns whether it
        compressed."""
        if not self.seen or not self.full_layers or self.frozen:
            return False
        if self.due():
            self.compress()
            return True
        if self.planned is None:  # the prompt fits: later compressions count from its budget
            self.planned = self.layer_targets()
        return False

    def observation(self) -> Observation:
        """What the policy sees now (full-attention layers; sliding ones are left out)."""

        def stacked(rows: list[list[torch.Tensor]]) -> torch.Tensor:
            return torch.stack([torch.cat(layer_rows, dim=1) for layer_rows in rows], dim=1)

        views = []
        for layer in range(self.num_layers):
            cached = self.layers[layer]
            if layer in self.full_layers:
                views.append(
                    LayerObservation(
                        keys=cached.keys,
                        values=cached.values,
                        positions=cached.positions,
                        queries=cached.queries,
                        query_positions=cached.query_positions,
                        cumulative_attention=cached.cumulative,
                        scaling=cached.scaling,
                        inv_freq=rotary_frequencies(self.model, layer),
                        output_weight=self.model.get_decoder().layers[layer].self_attn.o_proj.weight,
                    )
                )
            else:
                empty = torch.zeros(1, cached.keys.shape[1], 0, dtype=torch.long, device=cached.keys.device)
                views.append(
                    LayerObservation(
                        keys=cached.keys,
                        values=cached.values,
                        positions=empty,
                        queries=None,
                        query_positions=None,
                        cumulative_attention=None,
                        scaling=1.0,
                        sliding_window=self.sliding_window,
                    )
                )
        return Observation(
            views,
            entropy_next={k: torch.cat(rows, dim=1) for k, rows in self._entropy.items()},
            layer_change=stacked(self._layer_change) if self.reads.layer_change else None,
            final_distance=torch.cat(self._final_distance, dim=2) if self.reads.final_distance else None,
            logit_lens={k: stacked(rows) for k, rows in self._lens.items()},
            reconstruction={spec: self.reconstruction(spec) for spec in self.reads.reconstruction},
            prompt_length=self.prompt_length,
        )

    def reconstruction(self, spec: Reconstruction) -> list[torch.Tensor | None]:
        """KVzip's reconstruction scores of the entries held now (`kv_compression.reconstruction_pass`);
        the cache is frozen while the pass runs, so the pass leaves it as it was."""
        frozen, self.frozen = self.frozen, True
        try:
            return reconstruction_scores(self.model, self, self.token_ids, spec, self.prompt)
        finally:
            self.frozen = frozen

    def compress(self) -> None:
        """Score every full-attention layer and keep `layer_targets()` entries per KV head, physically."""
        obs = self.observation()
        targets = self.layer_targets()
        kept = top_indices(obs, layer_scores(self.policy, obs, targets), targets)
        event = Compression(time=self.seen - 1, kept={}, before={})
        for layer, index in enumerate(kept):
            if index is None:
                continue
            cached = self.layers[layer]
            event.before[layer] = cached.positions[0]
            cached.keep(index)
            event.kept[layer] = cached.positions[0]
        self.compressions.append(event)
        self.planned = targets
        self.last_observation = obs

    def snapshot(self) -> CompressedCache:
        """An independent copy of the cache as it stands (its tensors shared until either one changes
        them: every update and eviction makes new tensors), to decode from while this one goes on."""
        other = copy.copy(self)
        other.layers = [copy.copy(layer) for layer in self.layers]
        other.compressions = list(self.compressions)
        other.planned = None if self.planned is None else list(self.planned)
        other._entropy = {k: list(rows) for k, rows in self._entropy.items()}
        other._layer_change = [list(rows) for rows in self._layer_change]
        other._final_distance = list(self._final_distance)
        other._lens = {k: [list(rows) for rows in layers] for k, layers in self._lens.items()}
        other._outputs = list(self._outputs)
        other.token_ids = list(self.token_ids)
        return other

    def sizes(self) -> dict[str, int]:
        """``full_tokens`` (tokens seen), ``kept_tokens`` (in the first full layer), and the bytes of
        keys and values in every layer now (``kept_bytes``) and without eviction (``full_bytes``)."""
        kept_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers if l.is_initialized)
        full_bytes = sum(
            l.keys.shape[0] * l.keys.shape[1] * l.keys.shape[3] * l.keys.element_size() * 2 * self.seen
            if i in self.full_layers
            else l.keys.numel() * l.keys.element_size() * 2
            for i, l in enumerate(self.layers)
            if l.is_initialized
        )
        kept = self.layers[self.full_layers[0]].keys.shape[2] if self.full_layers else self.seen
        return dict(full_tokens=self.seen, kept_tokens=kept, full_bytes=full_bytes, kept_bytes=kept_bytes)


def held(model: PreTrainedModel, token_ids: Sequence[int], policy: Policy, tokenizer=None) -> CompressedCache:
    """A cache holding the prefill of `token_ids` exactly as the runtime would before compressing it for
    `policy`, frozen: the offline twin of the runtime's state, for passes over a held cache."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=model.device)[None]
    cache = CompressedCache(model, policy, Budget(ids.shape[1], "count"), tokenizer=tokenizer)
    with compressing(model, cache), torch.no_grad():
        model.get_decoder()(ids, **cache_argument(cache))
    cache.frozen = True
    return cache


def replay_specs(cache: CompressedCache) -> list[EvictionSpec]:
    """The cache's evictions as tracer specs (one per compression, layer and KV head), for
    `forward_influence.eviction.build_masks` to simulate the same generation by masking."""
    return [
        spec
        for event in cache.compressions
        for layer, kept in event.kept.items()
        for spec in evictions(event.before[layer], kept, event.time, layer)
    ]


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
    handles.append(
        model.get_input_embeddings().register_forward_pre_hook(lambda module, args: cache.record_ids(args[0]))
    )
    try:
        with attention_implementation(model, _NAME.format(base)):
            yield cache
    finally:
        for handle in handles:
            handle.remove()
        for layer in decoder.layers:
            if hasattr(layer.self_attn, _RECORDER):
                delattr(layer.self_attn, _RECORDER)


def _one_sequence(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise InputError("compressed generation supports batch size 1 only; generate one sequence at a time")
    return input_ids


def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    policy: Policy,
    budget: Budget,
    buffer: int = BUFFER,
    max_new_tokens: int = 64,
    tokenizer=None,
    **generate_kwargs,
) -> tuple[torch.Tensor, CompressedCache]:
    """`model.generate` with a `CompressedCache`: returns the generated ids ``[1, prompt + new]`` and
    the cache (its `sizes()` and `compressions` tell what was kept). Extra keyword arguments go to
    `model.generate` (e.g. ``do_sample=True, temperature=0.7``); greedy by default. `tokenizer` as in
    `CompressedCache`."""
    input_ids = _one_sequence(input_ids)
    budget.check_count(input_ids.shape[1] + max_new_tokens, "the prompt plus the new tokens")
    cache = CompressedCache(model, policy, budget, buffer=buffer, tokenizer=tokenizer)
    generate_kwargs.setdefault("do_sample", False)
    with compressing(model, cache), torch.no_grad():
        output = model.generate(
            input_ids.to(model.device),
            attention_mask=torch.ones_like(input_ids, device=model.device),
            **cache_argument(cache),
            max_new_tokens=max_new_tokens,
            min_new_tokens=generate_kwargs.pop("min_new_tokens", 0),
            **generate_kwargs,
        )
    return output, cache


def _feed(
    decoder: torch.nn.Module, cache: CompressedCache, ids: torch.Tensor, stops: Sequence[int] = ()
) -> tuple[list[torch.Tensor], dict[int, CompressedCache]]:
    """Feed ``ids [1, n]`` to a cache that is already `compressing`, in blocks that end where a
    compression falls due (or at a stop): the final normed hidden states of each block and a snapshot
    of the cache after each stop (after the first p tokens)."""
    states, snapshots, start, end, device = [], {}, 0, ids.shape[1], ids.device
    while start < end:
        cache.maybe_compress()
        # Tokens until a layer's next compression falls due (see `CompressedCache.due`), or a stop.
        room = min(
            (
                max(cache.planned[layer] + cache.buffer, cache.planned[layer] + 1) - cache.layers[layer].keys.shape[2]
                for layer in cache.full_layers
            ),
            default=end - start,
        )
        size = min([end - start, max(room, 1), *(p - start for p in stops if p > start)])
        positions = torch.arange(cache.seen, cache.seen + size, device=device)[None]
        states.append(
            decoder(ids[:, start : start + size], position_ids=positions, **cache_argument(cache)).last_hidden_state[0]
        )
        start += size
        if start in stops:
            snapshots[start] = cache.snapshot()
    return states, snapshots


def teacher_forced(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    continuation_ids: torch.Tensor,
    policy: Policy,
    budget: Budget,
    buffer: int = BUFFER,
    stops: Sequence[int] = (),
    tokenizer=None,
) -> tuple[torch.Tensor, CompressedCache, dict[int, CompressedCache]]:
    """Feed a fixed continuation to a compressed cache, as decoding those tokens would: the final normed
    hidden states ``[len(continuation), hidden]`` that predict each continuation token (the first from
    the prompt's last position), the cache, and a `snapshot` of the cache at each of `stops` (after the
    first p continuation tokens; its state is ``states[p]``), to decode from without replaying again.
    `tokenizer` as in `CompressedCache`.

    The tokens run in blocks that end where a compression falls due (or at a stop), so the cache
    compresses at the same times, scores the same observations and keeps the same tokens as
    one-token-at-a-time decoding, which it equals (tested), in a handful of forward passes instead of
    one per token."""
    prompt_ids, continuation_ids = _one_sequence(prompt_ids), _one_sequence(continuation_ids)
    budget.check_count(prompt_ids.shape[1] + continuation_ids.shape[1], "the prompt plus the continuation")
    cache = CompressedCache(model, policy, budget, buffer=buffer, tokenizer=tokenizer)
    decoder, device = model.get_decoder(), model.device
    with compressing(model, cache), torch.no_grad():
        first = decoder(prompt_ids.to(device), **cache_argument(cache)).last_hidden_state[0, -1:]
        # The last token predicts nothing in the continuation.
        states, snapshots = _feed(decoder, cache, continuation_ids[:, :-1].to(device), stops)
    return torch.cat([first, *states]).float(), cache, snapshots


def greedy_agreement(model: PreTrainedModel, cache: CompressedCache, state: torch.Tensor, tokens: Sequence[int]) -> int:
    """How many leading `tokens` greedy decoding from a compressed cache reproduces, where `state` is
    the final normed hidden state ``[hidden]`` of the cache's last position (e.g. from `teacher_forced`);
    the cache is consumed.

    While greedy decoding agrees with `tokens`, it has fed exactly those tokens, so its choice at each
    step is the argmax after teacher-forcing them: one blocked pass (compressions at the same times as
    decoding) replaces a forward pass per token, and the count equals that of `greedy_continuation`
    (tested; a different float rounding could only matter at an exact tie between two logits)."""
    if not tokens:
        return 0
    decoder, device = model.get_decoder(), model.device
    with compressing(model, cache), torch.no_grad():
        states, _ = _feed(decoder, cache, torch.tensor([list(tokens[:-1])], device=device))
    choices = logits_of(model, torch.cat([state[None].to(model.dtype), *states])).argmax(dim=-1).tolist()
    return next((i for i, (a, b) in enumerate(zip(choices, tokens)) if a != b), len(tokens))


def greedy_continuation(model: PreTrainedModel, cache: CompressedCache, state: torch.Tensor, steps: int) -> list[int]:
    """Decode `steps` tokens greedily from a compressed cache that has processed a sequence (e.g. after
    `teacher_forced`), starting from `state`, the final normed hidden state ``[hidden]`` of its last
    position; the cache keeps compressing on its schedule."""
    decoder, tokens = model.get_decoder(), []
    with compressing(model, cache), torch.no_grad():
        for _ in range(steps):
            token = int(logits_of(model, state.to(model.dtype)).argmax())
            tokens.append(token)
            position = torch.tensor([[cache.seen]], device=model.device)
            state = decoder(
                torch.tensor([[token]], device=model.device), position_ids=position, **cache_argument(cache)
            ).last_hidden_state[0, -1]
    return tokens
