"""Budgets: how many cached tokens each layer keeps.

A budget is written three ways:

- ``0.25``, a ratio in (0, 1] of the tokens to compress (the prompt, or the whole trace offline);
- ``256``, a token count (digits only);
- ``prompt+0.25``, while decoding: the whole prompt plus that ratio of the tokens generated so far,
  so the budget grows with the generation (RPC's schedule). Offline, with nothing generated, it is
  refused.

One rule for counts everywhere: a count may not exceed the tokens the cache will ever hold (the
trace, offline; the prompt plus the new tokens, while generating), since nothing would be evicted.
A count between the prompt and that evicts only while decoding, as for long generations. Which
tokens a policy keeps at a budget is `kv_compression.kept`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from forward_influence.errors import InputError

PROMPT_PLUS = "prompt+"
BUFFER = 128  # the compression interval: new tokens a layer holds beyond its budget before it compresses again
BudgetKind = Literal["ratio", "count", "prompt+ratio"]


@dataclass(frozen=True)
class Budget:
    """Kept tokens per layer: `value` is a ratio, a count or the generated share, by `kind` (see the
    module docstring). `head_floor` (in [0, 1], or None for uniform heads) turns on per-head allocation."""

    value: float
    kind: BudgetKind = "ratio"
    head_floor: float | None = None

    def __post_init__(self) -> None:
        if self.head_floor is not None and not 0 <= self.head_floor <= 1:
            raise InputError(f"head_floor must lie in [0, 1], got {self.head_floor}", "head_floor")

    @classmethod
    def parse(cls, text: str | float, head_floor: float | None = None) -> Budget:
        """``"0.25"``, ``"256"`` or ``"prompt+0.25"``; raises `InputError` on anything else."""
        raw = str(text).strip()
        body = raw.removeprefix(PROMPT_PLUS)
        try:
            number = float(body)
        except ValueError:
            raise InputError(
                f"budget must be a ratio in (0, 1], a token count or prompt+RATIO, got {raw!r}", "budget"
            ) from None
        if not math.isfinite(number) or number <= 0:
            raise InputError(f"budget must be positive, got {raw}", "budget")
        if raw.startswith(PROMPT_PLUS):
            if number > 1:
                raise InputError(f"the ratio of prompt+RATIO must lie in (0, 1], got {raw}")
            return cls(number, "prompt+ratio", head_floor)
        if body.isdigit():
            return cls(number, "count", head_floor)
        if number > 1:
            raise InputError(f"a budget ratio must lie in (0, 1], got {raw} (a token count has digits only)")
        return cls(number, "ratio", head_floor)

    def __str__(self) -> str:
        if self.kind == "count":
            return str(int(self.value))
        return f"{PROMPT_PLUS if self.kind == 'prompt+ratio' else ''}{self.value:g}"

    def share(self) -> str:
        """The budget in words for titles: ``25%``, ``256 tokens`` or ``the prompt + 25%``."""
        if self.kind == "count":
            return f"{int(self.value)} tokens"
        return f"{'the prompt + ' if self.kind == 'prompt+ratio' else ''}{self.value:.0%}"

    def tokens(self, n_tokens: int) -> int:
        """Kept tokens for a cache of `n_tokens` compressed once (offline; a ratio rounds up, so 1% of
        10 tokens keeps one)."""
        self.check_offline()
        if self.kind == "ratio":
            return max(1, math.ceil(self.value * n_tokens - 1e-9))
        self.check_count(n_tokens, "the sequence")
        return int(self.value)

    def check_offline(self) -> None:
        """Refuse a budget that needs a generation (``prompt+RATIO``) where nothing is generated."""
        if self.kind == "prompt+ratio":
            raise InputError(
                f"budget {self} grows while decoding; offline, with nothing generated, use a ratio or a count"
            )

    def check_count(self, capacity: int, what: str) -> None:
        """Refuse a count larger than the `capacity` tokens the cache will ever hold (`what` names them)."""
        if self.kind == "count" and self.value > capacity:
            raise InputError(
                f"budget of {int(self.value)} tokens is larger than {what} ({capacity} tokens): "
                "nothing would be evicted"
            )

    def target(self, prompt: int, seen: int) -> int:
        """Kept tokens per layer after a compression while generating, with `prompt` prompt tokens and
        `seen` tokens processed."""
        if self.kind == "count":
            return int(self.value)
        if self.kind == "ratio":
            return max(1, math.ceil(self.value * prompt - 1e-9))
        return prompt + math.ceil(self.value * (seen - prompt) - 1e-9)
