"""Memory: the peak a traced run needs on its device, estimated from the model's configuration alone.

Two kinds of run, over traces of `tokens` tokens (bytes; ``size`` is the dtype's):

- a ``readout`` (the signals of `score`, `heatmap`, an observation) peaks in one of two phases, and the
  estimate is the larger. Both hold the weights; the cache, ``2 x layers x kv_heads x head_dim x
  tokens x size``; and, when it reads attention, every layer's queries in float32. The forward pass
  adds the residual stream of every layer as it is saved, one layer's MLP activations and, in a model
  with sliding-window layers, the boolean ``[tokens, tokens]`` window mask sdpa receives together
  with the copy in the dtype its kernel makes of it (the part that grows with the square of the
  length; full-attention layers take the causal fast path and no mask). The signals after it add the
  stacked float32 streams and the largest of: the representation change's three temporaries of the
  same size, one chunk of logits with the entropy's temporaries, one chunk of queries' attention
  scores;
- a ``replay`` of evictions (`influence`, `scan`): the weights; the clean prefix's cache held once
  and materialised once per row of a batch (`tracer.expand_cache`), ``batch_size + 1`` times; one
  additive ``[batch, 1, queries, tokens]`` mask per kind of layer (full attention, and the sliding
  window where the model has one) in the dtype, for the `chunk` query positions a pass runs at once
  (all of them without a chunk: the square again); per row, the float32 residual streams and the
  logits of those queries.

Within a phase every term is counted at its largest at once; `analyses/benchmarks/bench_scale.py`
writes the estimate beside each job's measured peak. `check_fits` refuses, before any weight loads, a
run whose estimate exceeds the device's memory, naming the option that would make it fit.
`FORWARD_INFLUENCE_MEMORY` (bytes, or with a unit: ``512MiB``, ``16GB``) sets the memory to plan for,
for a machine shared with other work.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from .attention import QUERY_CHUNK
from .errors import InputError
from .eviction import AttentionLayout
from .logits import DEFAULT_CHUNK

MEMORY_VARIABLE = "FORWARD_INFLUENCE_MEMORY"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FLOAT32 = 4
# Temporaries of the readout's steps, each counted in copies of what the step works on.
MLP_TEMPORARIES = 3  # one layer's gate and up projections and their product, per token and intermediate unit
STREAM_TEMPORARIES = 3  # the representation change: both streams normalised, and their product
ENTROPY_TEMPORARIES = 4  # a chunk's logits, log-probabilities, probabilities and their product
SCORE_TEMPORARIES = 3  # a chunk of queries' attention scores, masked scores and probabilities
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

Run = Literal["readout", "replay"]


@dataclass(frozen=True)
class Shape:
    """What the estimate reads of a configuration (`Shape.of`)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    sliding: bool

    @classmethod
    def of(cls, config) -> Shape:
        text = config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        return cls(
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate=text.intermediate_size,
            vocab=text.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", True)),
            sliding=any(window is not None for window in AttentionLayout.from_config(config).windows),
        )

    @property
    def parameters(self) -> int:
        """Embeddings (and an untied output head), attention and gated MLP per layer; norms are negligible."""
        attention = (
            self.heads + 2 * self.kv_heads
        ) * self.head_dim * self.hidden + self.heads * self.head_dim * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * (
            attention + 3 * self.hidden * self.intermediate
        )

    def cache_bytes(self, tokens: int, size: int) -> int:
        """Keys and values of `tokens` tokens in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * size


@dataclass(frozen=True)
class Peak:
    """The estimated peak of a run, by part (bytes): what its peak phase holds."""

    weights: int
    cache: int
    masks: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.masks + self.activations


def estimate(
    config,
    tokens: int,
    run: Run = "readout",
    dtype: str = "float32",
    batch_size: int = 1,
    chunk: int | None = None,
    attention: bool = True,
) -> Peak:
    """The peak of a `run` over traces of `tokens` tokens (see the module docstring): a replay of
    `batch_size` rows at a time, `chunk` query positions per pass (None: all); a readout that reads
    attention probabilities when `attention`."""
    shape, size = Shape.of(config), DTYPE_BYTES[dtype]
    weights = shape.parameters * size
    streams = (shape.layers + 1) * shape.hidden
    cache = shape.cache_bytes(tokens, size)
    if run == "readout":
        stacked = FLOAT32 * tokens * streams
        queries = FLOAT32 * tokens * shape.layers * shape.heads * shape.head_dim if attention else 0
        window_mask = tokens * tokens * (1 + size) if shape.sliding else 0
        forward = stacked + MLP_TEMPORARIES * size * tokens * shape.intermediate
        signals = stacked + max(
            STREAM_TEMPORARIES * stacked,
            ENTROPY_TEMPORARIES * FLOAT32 * min(tokens, DEFAULT_CHUNK) * shape.vocab,
            SCORE_TEMPORARIES * FLOAT32 * shape.heads * min(tokens, QUERY_CHUNK) * tokens if attention else 0,
        )
        if forward + window_mask >= signals:
            return Peak(weights, cache, window_mask, queries + forward)
        return Peak(weights, cache, 0, queries + signals)
    queries = min(chunk or tokens, tokens)
    masks = batch_size * queries * tokens * size * (2 if shape.sliding else 1)
    activations = batch_size * FLOAT32 * queries * (streams + shape.vocab)
    return Peak(weights, cache * (batch_size + 1), masks, activations)


def parse_bytes(text: str) -> int:
    """Bytes from ``123``, ``512MiB``, ``16GB`` (units B, KB, MB, GB, KiB, MiB, GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise InputError(f"{MEMORY_VARIABLE}={text!r} is not a size such as 16GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def device_memory(device: str = "cpu") -> int | None:
    """The memory a run may use on `device` (bytes): `FORWARD_INFLUENCE_MEMORY` when set, else the
    GPU's total memory or the machine's physical memory (None where it cannot be read)."""
    if os.environ.get(MEMORY_VARIABLE):
        return parse_bytes(os.environ[MEMORY_VARIABLE])
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(
    config,
    tokens: int,
    run: Run = "readout",
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 1,
    chunk: int | None = None,
    options: tuple[str, ...] = ("max_tokens",),
) -> Peak:
    """The estimated `Peak` of the run (`estimate`), or an `InputError` when it exceeds the device's
    memory, naming the first of `options` (the run's parameters that bound its memory, among
    ``chunk``, ``batch_size`` and ``max_tokens``, in the order to try them) and the largest value of it,
    halving from the current one, whose estimate fits."""
    settings = dict(chunk=chunk or tokens, batch_size=batch_size, max_tokens=tokens)

    def peak(values: dict[str, int]) -> Peak:
        return estimate(config, values["max_tokens"], run, dtype, values["batch_size"], values["chunk"])

    needed, memory = peak(settings), device_memory(device)
    if memory is None or needed.total <= memory:
        return needed
    where = f"{tokens} tokens need about {_gib(needed.total)}, more than the {_gib(memory)} of {device}"
    for option in options:
        value = settings[option] // 2
        while value >= 1:
            if peak({**settings, option: value}).total <= memory:
                raise InputError(f"{where}; pass {option} {value}", option)
            value //= 2
    raise InputError(f"{where}, and the weights alone take {_gib(needed.weights)}")
