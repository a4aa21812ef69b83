"""Memory: the peak a traced run needs on its device, estimated from the model's configuration alone.

A run that replays evictions holds at its peak (bytes, for `tokens` per trace):

- the weights: the parameter count of the configuration times the bytes of the dtype;
- the cache: the clean prefix's keys and values, ``2 x layers x kv_heads x head_dim x tokens``, held
  once and materialised once per row of a batched pass (`tracer.expand_cache`), so ``batch_size + 1``
  times;
- the masks: one additive ``[batch, 1, queries, tokens]`` mask per kind of layer (full attention, and
  the sliding window where the model has one), in the dtype;
- the activations of one pass: per row, the float32 residual stream of every layer and the queries of
  the `chunk` query positions it runs at once (the whole suffix without a chunk), their attention
  scores over every key (float32, per query head: the part that grows with the square of the length
  unless a chunk bounds it) and the logits of the chunk.

The estimate errs high (every term at its largest at once); `check_fits` refuses a run whose estimate
exceeds the memory the device has, before any weight loads, and names the option that would make it
fit. `FORWARD_INFLUENCE_MEMORY` (bytes, or with a unit: ``512MiB``, ``16GB``) overrides the device's
memory, for a machine shared with other work.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import InputError

MEMORY_VARIABLE = "FORWARD_INFLUENCE_MEMORY"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


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
            sliding=bool(getattr(text, "sliding_window", None))
            and "sliding_attention" in (getattr(text, "layer_types", None) or ()),
        )

    @property
    def parameters(self) -> int:
        """Embeddings (and an untied output head), attention and gated MLP per layer; norms are negligible."""
        attention = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * (attention + mlp)


@dataclass(frozen=True)
class Peak:
    """The estimated peak of a run, by part (bytes)."""

    weights: int
    cache: int
    masks: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.masks + self.activations


def estimate(config, tokens: int, dtype: str = "float32", batch_size: int = 1, chunk: int | None = None) -> Peak:
    """The peak of a run over traces of `tokens` tokens replaying `batch_size` rows at a time, each pass
    `chunk` query positions at a time (None: all of them), in `dtype` (see the module docstring)."""
    shape, size = Shape.of(config), DTYPE_BYTES[dtype]
    queries = min(chunk or tokens, tokens)
    cache = 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * size * (batch_size + 1)
    masks = batch_size * queries * tokens * size * (2 if shape.sliding else 1)
    per_row = 4 * queries * (
        (shape.layers + 1) * shape.hidden + shape.layers * shape.heads * shape.head_dim + shape.heads * tokens + shape.vocab
    )
    return Peak(shape.parameters * size, cache, masks, batch_size * per_row)


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
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 1,
    chunk: int | None = None,
    options: tuple[str, ...] = ("chunk", "batch_size", "max_tokens"),
) -> Peak:
    """The estimated `Peak` of the run, or an `InputError` when it exceeds the device's memory, naming
    the first of `options` (the run's parameters that bound memory, in the order to try them) whose
    smaller value would fit: the largest such value, a power of two, or the largest fitting length."""
    peak, memory = estimate(config, tokens, dtype, batch_size, chunk), device_memory(device)
    if memory is None or peak.total <= memory:
        return peak
    where = f"a run over {tokens} tokens needs about {_gib(peak.total)}, more than the {_gib(memory)} of {device}"
    settings = dict(chunk=chunk or tokens, batch_size=batch_size, max_tokens=tokens)
    for option in options:
        value = settings[option] // 2
        while value >= 1:
            trial = {**settings, option: value}
            if estimate(config, trial["max_tokens"], dtype, trial["batch_size"], trial["chunk"]).total <= memory:
                raise InputError(f"{where}; pass {option} {value}", option)
            value //= 2
    raise InputError(f"{where}, even one token at a time: the weights alone take {_gib(peak.weights)}")
