"""The policy contract and the helpers every policy shares.

A policy is a small dataclass whose fields are its only knobs and whose `score(obs, layer)` returns
``[batch, kv_heads, tokens]`` scores for the cached tokens of one layer: higher means keep. Tokens a
method always keeps (sinks, an observation window) score +inf. A policy declares what it reads
beyond keys, values and positions with `reads()` (a `forward_influence.observation.Reads`), so the
offline tracer and the online runtime compute only that. Options are `Literal` fields checked when
the policy is built: an unknown value is an `InputError`, never a silent default. GQA is explicit:
per-query-head quantities are reduced over the query heads of each KV group by `group_reduce` (mean
or max, a field of the policies that need it). `layer_budgets` spreads a per-layer budget over
layers (uniform unless the policy says otherwise, as PyramidKV does).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch

from forward_influence.errors import InputError
from forward_influence.observation import Observation, Reads

GroupReduce = Literal["mean", "max"]
AT_LEAST_ONE = "at least 1"
Count = Annotated[int, AT_LEAST_ONE]  # a window, kernel or k: a positive integer


@dataclass(frozen=True)
class Interval:
    """The values a number field may take: ``[low, high]``, or ``(low, high]`` when `open_low`."""

    low: float
    high: float
    open_low: bool = False

    def __contains__(self, value: float) -> bool:
        return (self.low < value if self.open_low else self.low <= value) and value <= self.high

    def __str__(self) -> str:
        high = "inf)" if math.isinf(self.high) else f"{self.high:g}]"
        return f"{'(' if self.open_low else '['}{self.low:g}, {high}"


Ratio = Annotated[float, Interval(0, 1)]  # a mixing weight or a share
Share = Annotated[float, Interval(0, 1, open_low=True)]  # a share that must keep something
Cosine = Annotated[float, Interval(-1, 1)]  # a cosine similarity
Positive = Annotated[float, Interval(0, math.inf, open_low=True)]  # a step size or a scale
NonNegative = Annotated[float, Interval(0, math.inf)]  # an offset or a regulariser


def group_reduce(x: torch.Tensor, num_kv_heads: int, how: GroupReduce = "mean") -> torch.Tensor:
    """``[batch, heads, tokens]`` -> ``[batch, kv_heads, tokens]`` over each GQA group (mean or max)."""
    b, h, t = x.shape
    grouped = x.reshape(b, num_kv_heads, h // num_kv_heads, t)
    return grouped.amax(dim=2) if how == "max" else grouped.mean(dim=2)


def broadcast_heads(values: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A per-token ``[batch, tokens]`` score broadcast to every KV head: ``[batch, kv_heads, tokens]``."""
    return values[:, None, :].expand(-1, num_kv_heads, -1).clone()


def protect(scores: torch.Tensor, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """Set the first `sinks` and last `recent` tokens of the cache to +inf (always kept)."""
    scores = scores.clone()
    if sinks:
        scores[..., :sinks] = float("inf")
    if recent:
        scores[..., -recent:] = float("inf")
    return scores


def pool(
    scores: torch.Tensor, kernel: int, how: Literal["avg", "max"] = "avg", count_padding: bool = False
) -> torch.Tensor:
    """1-D pooling over tokens with stride 1 and same-size output (SnapKV's clustering). Average
    pooling divides by the tokens inside the kernel unless `count_padding` (PyTorch's default)."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if how == "max":
        out = torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        out = torch.nn.functional.avg_pool1d(
            flat, kernel, stride=1, padding=kernel // 2, count_include_pad=count_padding
        )
    return out[..., : shape[-1]].reshape(shape)


def normalise(x: torch.Tensor, how: Literal["zscore", "rank"]) -> torch.Tensor:
    """Per row (layer, KV head) over tokens: ``zscore`` or ``rank`` (scaled to [0, 1]); +inf ignored."""
    finite = torch.isfinite(x)
    values = torch.where(finite, x, torch.nan)
    if how == "zscore":
        mean = values.nanmean(dim=-1, keepdim=True)
        std = ((values - mean) ** 2).nanmean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
        out = (values - mean) / std
    else:
        ranks = torch.nan_to_num(values, nan=float("inf")).argsort(dim=-1).argsort(dim=-1).float()
        out = ranks / (finite.sum(dim=-1, keepdim=True) - 1).clamp_min(1)
    return torch.where(finite, out, x)


def check_fields(policy: object) -> None:
    """Raise `InputError` for a field value outside its declared type: a `Literal` option not among
    its choices, a bool that is not one, a `Count` below 1, a number outside its declared `Interval`
    (`Ratio`, `Share`, `Cosine`, `Positive`, `NonNegative`), a negative integer or a non-finite number."""
    hints = typing.get_type_hints(type(policy), include_extras=True)
    for field in dataclasses.fields(policy):
        value, kind = getattr(policy, field.name), hints.get(field.name)
        where = f"{getattr(policy, 'name', type(policy).__name__)}: {field.name}"
        interval = next((a for a in typing.get_args(kind)[1:] if isinstance(a, Interval)), None)
        if typing.get_origin(kind) is Annotated and interval is not None:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value not in interval:
                raise InputError(f"{where} must lie in {interval}, got {value!r}")
        elif typing.get_origin(kind) is Annotated and AT_LEAST_ONE in typing.get_args(kind)[1:]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{where} must be an integer of at least 1, got {value!r}")
        elif typing.get_origin(kind) is Literal:
            if value not in typing.get_args(kind):
                choices = ", ".join(map(str, typing.get_args(kind)))
                raise InputError(f"{where} must be one of {choices}, got {value!r}")
        elif kind is bool:
            if not isinstance(value, bool):
                raise InputError(f"{where} must be true or false, got {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{where} must be a non-negative integer, got {value!r}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{where} must be a finite number, got {value!r}")


@dataclass
class Policy:
    """Base class: subclasses set `name` (the CLI name), declare `reads` and implement `score`."""

    name: ClassVar[str] = ""
    online: ClassVar[bool] = True  # False: scores only from a traced trace, never inside generation
    budgeted: ClassVar[bool] = False  # True: what it keeps depends on how many it keeps (`kept_scores`)

    def __post_init__(self) -> None:
        check_fields(self)

    def reads(self) -> Reads:
        """What `score` reads beyond each layer's keys, values and positions (none by default)."""
        return Reads()

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        """Scores ``[batch, kv_heads, tokens]`` of layer `layer`'s cached tokens, in cache order:
        higher means keep, +inf for tokens the method always keeps. A subclass states its rule here
        and reads only what `reads` declares."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(obs, layer)")

    def kept_scores(self, obs: Observation, layer: int, kept: int) -> torch.Tensor:
        """Scores whose `kept` best per KV head are the tokens the policy keeps of layer `layer`: `score`,
        unless the choice depends on how many are kept (a `budgeted` policy, such as CriticalKV, whose
        first stage keeps a share of the budget by another rule)."""
        return self.score(obs, layer)

    def layer_budgets(self, tokens: int, num_layers: int) -> list[int]:
        """Kept tokens per layer for a per-layer budget of `tokens` (uniform)."""
        return [tokens] * num_layers

    @staticmethod
    def kv_heads(obs: Observation, layer: int) -> int:
        return obs.layers[layer].keys.shape[1]
