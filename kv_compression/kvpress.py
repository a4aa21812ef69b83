"""NVIDIA kvpress, both ways: our policies as kvpress presses, kvpress's presses in our measurements.

kvpress (``pip install 'forward-influence[kvpress]'``, which needs transformers < 5.3; `make setup`
builds it in ``.venv-kvpress``) compresses during the prefill, inside each attention layer's forward
hook. That layer never sees what comes after it, while InfoKV needs every prompt token's entropy from
the final hidden states and its distance to the last layer. So `PolicyPress` scores *after* the
prefill: during kvpress's prefill (``model.model(context, past_key_values=cache)`` under the press)
the prefill runs on our `CompressedCache`, whose hooks record what the policy reads, exactly as
`kv_compression.runtime` does while generating; when the last layer is done the policy scores every
layer, the kept entries are copied into kvpress's cache, and generation continues from there with
kvpress's own positions. The cost is our runtime's recording, no second pass: about 1.2 times a plain
prefill for InfoKV on the embedded model (its top-256 entropy of every prompt token; 1.02 for SnapKV;
`analyses/benchmarks/bench_compression.py`). A press keeps ``int(n * (1 - compression_ratio))``
tokens per layer and KV head, as kvpress's presses do.

The other way, `press_scores` runs a kvpress press over a trace and records the scores its
``score()`` gives every cached token of every layer; the policy ``kvpress:CLASS[:field=value...]``
(`kv_compression.policies.KvpressScores`) then keeps the tokens the press keeps, and the tracer's
masks replay that choice (``score``, ``compare``, ``eval --task fidelity``). The press runs at each
budget's own compression ratio (`PressScores`), since a press's scores may depend on it (CriticalKV's
first stage keeps a share of the budget). Measurable are the presses that score every token (kvpress's
``ScorerPress`` kind: all of them query-agnostic here, since the trace's prefill is the context) and
the scoring wrappers, whose inner press is named as a field (``CriticalKVPress:press=SnapKVPress``,
the inner with its default fields). Every other press is refused in one line that says why
(`press_class`): it compresses while decoding, or by its own rule across heads, channels, layers,
chunks or merged tokens, or, like KVzip, after passes of its own (the native `kvzip` policy measures
KVzip).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import typing
from collections.abc import Iterator, Sequence

import torch

from forward_influence.errors import InputError

from .budget import Budget
from .names import field_value
from .policies import Policy
from .runtime import CompressedCache, compressing

try:
    import kvpress
    from kvpress import BasePress, ScorerPress
except ImportError:  # the extra is not installed: every entry point says so
    kvpress = None
    BasePress = ScorerPress = object

INSTALL = (
    "pip install 'forward-influence[kvpress]' (kvpress needs transformers < 5.3: `make setup` builds .venv-kvpress)"
)


def require() -> None:
    if kvpress is None:
        raise InputError(f"kvpress is not installed: {INSTALL}")


@dataclasses.dataclass
class PolicyPress(BasePress):
    """One of our policies as a kvpress press (see the module docstring): `compression_ratio` is the
    share of each layer's tokens evicted at the end of the prefill."""

    policy: Policy = None
    compression_ratio: float = 0.0

    def __post_init__(self) -> None:
        require()
        if not 0 <= self.compression_ratio < 1:
            raise InputError(f"compression_ratio must lie in [0, 1), got {self.compression_ratio}")

    @contextlib.contextmanager
    def __call__(self, model) -> Iterator[None]:
        decoder, stack, target = model.get_decoder(), contextlib.ExitStack(), {}

        def before(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            ids = kwargs.get("input_ids", args[0] if args else None)
            if cache is None or cache.get_seq_length() > 0 or self.compression_ratio == 0:
                return None  # not a prefill: kvpress presses compress the context only
            kept = max(1, int(ids.shape[1] * (1 - self.compression_ratio)))
            ours = CompressedCache(model, self.policy, Budget(kept, "count"), buffer=ids.shape[1])
            stack.enter_context(compressing(model, ours))
            target.update(cache=cache, ours=ours)
            return args, {**kwargs, "past_key_values": ours}

        def after(module, args, kwargs, output):
            if not target:
                return output
            ours, cache = target.pop("ours"), target.pop("cache")
            ours.maybe_compress()
            stack.close()
            for index, layer in enumerate(ours.layers):
                cache.update(layer.keys, layer.values, index)
            return output

        handles = [
            decoder.register_forward_pre_hook(before, with_kwargs=True),
            decoder.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            yield
        finally:
            stack.close()
            for handle in handles:
                handle.remove()


def press(name: str, compression_ratio: float = 0.0, model: str | None = None) -> PolicyPress:
    """A policy of ours by CLI name (``NAME[:field=value...]``; `model` picks per-model files such as
    InfoKV's calibration) as a kvpress press, e.g. ``press("infokv", compression_ratio=0.75)``."""
    from .names import parse

    return PolicyPress(policy=parse(name, model, quiet=True), compression_ratio=compression_ratio)


SCORING_RATIO = 1e-6  # a compression ratio that evicts nothing yet makes a press score every token
SUPPORTED = (
    "ScorerPress presses (a score per token, e.g. SnapKVPress) and scoring wrappers (CriticalKVPress:press=NAME)"
)


def refusal(name: str) -> str | None:
    """Why the kvpress press `name` cannot be measured by our tracer (one line), or None if it can."""
    cls = getattr(kvpress, name, None)
    lineage = " ".join(base.__name__ for base in cls.__mro__) if isinstance(cls, type) else ""
    if not (isinstance(cls, type) and issubclass(cls, BasePress)):
        why = "not a kvpress press"
    elif cls in (BasePress, ScorerPress):
        why = "a base class, not a press"
    elif issubclass(cls, ScorerPress):
        return None
    elif "DecodingPress" in lineage:
        why = "it compresses while decoding, not the prefill"
    elif "KVzip" in lineage:
        why = "it scores by reconstructing the context in passes of its own (the native policy kvzip measures KVzip)"
    elif "press" in inspect.signature(cls).parameters:
        why = "a wrapper that selects by its own rule (per head, chunk, block or layer), not by one score per token"
    else:
        why = "it compresses by its own rule (heads, channels, layers or merged tokens), not by one score per token"
    return f"kvpress:{name}: cannot be measured: {why}; measurable are {SUPPORTED}"


def press_class(spec: str, compression_ratio: float = SCORING_RATIO):
    """The kvpress press of ``CLASS[:field=value...]`` at `compression_ratio` (fields are converted to the
    press's parameter types; a ``press`` field names an inner press, built with its default fields)."""
    require()
    name, *assignments = spec.split(":")
    if (why := refusal(name)) is not None:
        raise InputError(why)
    cls = getattr(kvpress, name)
    hints = {k: v for k, v in typing.get_type_hints(cls.__init__).items() if k != "return"}
    fields = {}
    for assignment in assignments:
        field, _, text = assignment.partition("=")
        if field not in hints or field == "compression_ratio":
            raise InputError(f"kvpress:{spec}: {field!r} is not a field of {name}")
        where = f"kvpress:{name}: {field}"
        if field == "press":
            if refusal(text) is not None or "press" in inspect.signature(getattr(kvpress, text)).parameters:
                raise InputError(f"{where} must name a kvpress ScorerPress that scores by itself, got {text!r}")
            fields[field] = press_class(text, compression_ratio)
        else:
            fields[field] = _field_value(where, hints[field], text)
    if "press" in hints:
        if "press" not in fields:
            raise InputError(f"kvpress:{name}: a wrapper; name its inner press, e.g. kvpress:{name}:press=SnapKVPress")
        return cls(**fields)  # the wrapper's ratio is its inner press's
    return cls(compression_ratio=compression_ratio, **fields)


def _field_value(where: str, kind: type, text: str) -> object:
    """A press field's value from text (`kv_compression.names.field_value`). Every integer field of a
    press is a count (a window, a kernel, a number of sinks), so a negative one is refused here rather
    than failing inside the press."""
    value = field_value(where, kind, text)
    if kind is int and value < 0:
        raise InputError(f"{where} must be a non-negative integer, got {value}")
    if kind is float and not math.isfinite(value):
        raise InputError(f"{where} must be a finite number, got {text}")
    return value


def press_scores(
    model, token_ids: Sequence[int], spec: str, compression_ratio: float = SCORING_RATIO
) -> list[torch.Tensor | None]:
    """Per layer, the scores ``[1, kv_heads, tokens]`` a kvpress press at `compression_ratio` gives the
    tokens of a prefill of `token_ids` (None for layers it leaves alone)."""
    scorer = press_class(spec, compression_ratio)
    recorded: dict[int, torch.Tensor] = {}
    original = scorer.score

    def record(module, *args, **kwargs):
        scores = original(module, *args, **kwargs)
        recorded[module.layer_idx] = scores.detach().float()
        return scores

    scorer.score = record
    ids = torch.as_tensor(token_ids, dtype=torch.long)[None].to(model.device)
    from transformers import DynamicCache

    with scorer(model), torch.no_grad():
        model.get_decoder()(input_ids=ids, past_key_values=DynamicCache())
    return [recorded.get(layer) for layer in range(model.config.get_text_config(decoder=True).num_hidden_layers)]


@dataclasses.dataclass
class PressScores:
    """A kvpress press's scores of one prefill, recorded once per compression ratio when first asked
    (`press_scores`): a press's scores may depend on how much it keeps."""

    model: object
    token_ids: list[int]
    spec: str
    recorded: dict[float, list[torch.Tensor | None]] = dataclasses.field(default_factory=dict, repr=False)

    def at(self, compression_ratio: float = SCORING_RATIO) -> list[torch.Tensor | None]:
        if compression_ratio not in self.recorded:
            self.recorded[compression_ratio] = press_scores(self.model, self.token_ids, self.spec, compression_ratio)
        return self.recorded[compression_ratio]

    def keeping(self, kept: int, tokens: int) -> list[torch.Tensor | None]:
        """The scores of the press set to keep `kept` of `tokens` tokens (kvpress keeps
        ``int(tokens * (1 - ratio))``; the margin keeps the product from rounding down)."""
        return self.at(max(SCORING_RATIO, 1 - (kept + 1e-3) / tokens))


def kept_positions(model, token_ids: Sequence[int], compressor) -> list[torch.Tensor | None]:
    """Per layer, the positions ``[kv_heads, k]`` (ascending) that a kvpress press keeps of a prefill
    of `token_ids` (None for a layer it leaves whole), found by matching each kept key to the nearest
    key of an uncompressed prefill. kvpress patches the attention functions, so the two prefills round
    differently (relative differences of about 1e-3 in deep layers); each match must be within 1% of the
    key's norm and at most half as far as the next nearest position, or the match is refused."""
    require()
    from transformers import DynamicCache

    ids = torch.as_tensor(token_ids, dtype=torch.long)[None].to(model.device)
    full, kept = DynamicCache(), DynamicCache()
    with torch.no_grad():
        model.get_decoder()(input_ids=ids, past_key_values=full)
        with compressor(model):
            model.get_decoder()(input_ids=ids, past_key_values=kept)
    positions = []
    for whole, small in zip(full.layers, kept.layers):
        if small.keys.shape[2] == whole.keys.shape[2]:
            positions.append(None)
            continue
        distance = torch.cdist(small.keys[0].float(), whole.keys[0].float())  # [kv_heads, k, n]
        two = distance.topk(2, dim=-1, largest=False)
        norm = small.keys[0].float().norm(dim=-1)
        if ((two.values[..., 0] > 0.01 * norm) | (two.values[..., 0] > 0.5 * two.values[..., 1])).any():
            raise RuntimeError("a kept key matches no single position of the uncompressed prefill")
        positions.append(two.indices[..., 0].sort(dim=-1).values)
    return positions
