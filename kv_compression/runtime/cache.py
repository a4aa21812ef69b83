"""The compressing cache: a transformers `DynamicCache` that keeps a budget of tokens per layer.

`CompressedCache` stores the layers (its full-attention ones are `CompressedLayer`s, transformers'
extension point for per-layer cache state), asks its `Schedule` at the start of every forward pass
whether a compression is due, and then scores the `observation` its `Recorder` has built with the
policy and keeps each KV head's top entries, physically. The budget of a compression is
`Budget.target` of the prompt and the tokens seen (fixed for a ratio or a count, growing for
``prompt+RATIO``); every KV head keeps the same number of entries, so the cache stays dense.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from forward_influence.defaults import QUERY_WINDOW
from forward_influence.errors import InputError
from forward_influence.eviction import AttentionLayout, EvictionSpec, evictions
from forward_influence.observation import Observation
from forward_influence.reconstruction import Reconstruction, reconstruction_prompt

from ..budget import BUFFER, Budget
from ..kept import layer_scores, top_indices
from ..policies import Policy
from .layer import CompressedLayer
from .reconstruction_pass import reconstruction_scores
from .recorder import Recorder, observation
from .schedule import Schedule


@dataclass
class Compression:
    """One eviction event: at `time` (the last position processed), the kept original positions per
    full-attention layer ``{layer: [kv_heads, k]}`` and the positions each head held before."""

    time: int
    kept: dict[int, torch.Tensor]
    before: dict[int, torch.Tensor] = field(repr=False)


class CompressedCache(DynamicCache):
    """A `DynamicCache` that keeps a budget of tokens per layer, chosen by `policy` on the schedule of
    `buffer` (see the module docstring and `kv_compression.runtime`).

    Attributes after generation: `seen` (tokens processed), `prompt_length`, `planned` (the per-layer
    budgets of the last compression), `compressions` (the eviction events), `last_observation` (what
    the policy scored at the last eviction). A `frozen` cache neither compresses nor records. A policy
    that reconstructs the context (KVzip) needs the `tokenizer` to build its prompt.
    """

    def __init__(self, model: PreTrainedModel, policy: Policy, budget: Budget, buffer: int = BUFFER, tokenizer=None):
        super().__init__(config=model.config)
        self.schedule = Schedule(buffer)
        if not policy.online:
            raise InputError(
                f"policy {policy.name!r} scores from a measured trace only; it cannot compress while generating"
            )
        if budget.head_floor is not None:
            raise InputError(
                "per-head budgets (AdaKV) need a ragged cache; the runtime keeps dense caches, "
                "so use them with the tracer (score, Forward Influence) only"
            )
        self.model, self.policy, self.budget = model, policy, budget
        self.reads = policy.reads()
        self.prompt = None
        if self.reads.reconstruction:
            if tokenizer is None:
                raise InputError(
                    f"policy {policy.name!r} reconstructs the context from the cache: pass the tokenizer, "
                    "which builds its prompt"
                )
            self.prompt = reconstruction_prompt(tokenizer)
        self.recorder = Recorder(model, self.reads)
        self.frozen = False
        self.window = max(self.reads.window, QUERY_WINDOW)
        self.layout = AttentionLayout.from_config(model.config)
        self.num_layers, self.full_layers = self.layout.num_layers, self.layout.full_layers
        for index in self.full_layers:
            self.layers[index] = CompressedLayer()
        self.seen = 0
        self.prompt_length: int | None = None
        self.planned: list[int] | None = None
        self.compressions: list[Compression] = []
        self.last_observation: Observation | None = None
        self._step: torch.Tensor | None = None

    @property
    def buffer(self) -> int:
        return self.schedule.buffer

    def record_attention(self, module, query: torch.Tensor, key: torch.Tensor) -> None:
        if module.layer_idx in self.full_layers:
            self.layers[module.layer_idx].record(
                query, key, self._step, self.window, self.reads.cumulative_attention, module.scaling
            )

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

    def held(self) -> dict[int, int]:
        """The entries each full-attention layer holds now, ``{layer: entries}``."""
        return {layer: self.layers[layer].keys.shape[2] for layer in self.full_layers}

    def layer_targets(self) -> list[int]:
        """Kept tokens per layer if the cache compressed now."""
        return self.policy.layer_budgets(self.budget.target(self.prompt_length, self.seen), self.num_layers)

    def room(self) -> int:
        """Tokens the cache can take before its next compression falls due (`Schedule.room`)."""
        return self.schedule.room(self.held(), self.planned)

    def maybe_compress(self) -> bool:
        """Compress if due; `update` calls this at the start of every forward pass. Returns whether it
        compressed."""
        if not self.seen or not self.full_layers or self.frozen:
            return False
        targets = self.layer_targets()
        if self.schedule.due(self.held(), self.planned, targets):
            self.compress(targets)
            return True
        if self.planned is None:  # the prompt fits: later compressions count from its budget
            self.planned = targets
        return False

    def compress(self, targets: list[int]) -> None:
        """Score every full-attention layer and keep `targets` entries per KV head, physically."""
        obs = observation(self)
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

    def reconstruction(self, spec: Reconstruction) -> list[torch.Tensor | None]:
        """KVzip's reconstruction scores of the entries held now (`kv_compression.runtime.reconstruction_pass`);
        the cache is frozen while the pass runs, so the pass leaves it as it was."""
        frozen, self.frozen = self.frozen, True
        try:
            return reconstruction_scores(self.model, self, self.recorder.token_ids, spec, self.prompt)
        finally:
            self.frozen = frozen

    def snapshot(self) -> CompressedCache:
        """An independent copy of the cache as it stands (its tensors shared until either one changes
        them: every update and eviction makes new tensors), to decode from while this one goes on."""
        other = copy.copy(self)
        other.layers = [copy.copy(layer) for layer in self.layers]
        other.compressions = list(self.compressions)
        other.planned = None if self.planned is None else list(self.planned)
        other.recorder = self.recorder.copy()
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


def replay_specs(cache: CompressedCache) -> list[EvictionSpec]:
    """The cache's evictions as tracer specs (one per compression, layer and KV head), for
    `forward_influence.eviction.build_masks` to simulate the same generation by masking."""
    return [
        spec
        for event in cache.compressions
        for layer, kept in event.kept.items()
        for spec in evictions(event.before[layer], kept, event.time, layer)
    ]
