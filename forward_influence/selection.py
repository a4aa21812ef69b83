"""Signal-based selections: the top fraction of a trace's prefix by one token signal.

A selection picks, among the candidate positions ``sinks .. t`` of the prefix that ends at the
eviction time t, the ``round(fraction * (t + 1))`` positions with the highest signal (ties broken by
position, NaN ranked lowest). The first `sinks` positions are never candidates: they are attention
sinks, whose eviction measures the sink effect rather than the token. ``random`` draws uniformly
with a seeded generator. Selection by a compression policy (InfoKV, ...) is wired in the CLI and in
analyses, which may import `kv_compression`.
"""

from __future__ import annotations

import numpy as np

from .defaults import SINKS
from .errors import InputError
from .signals import SIGNALS, TokenSignals

ALIASES = {
    "entropy": "entropy_next",
    "attention": "attention_snapkv",
    "snapkv": "attention_snapkv",
    "h2o": "attention_h2o",
}
SELECTIONS = SIGNALS + ("random",)


def canonical(name: str) -> str:
    """The canonical selection name for a name or alias (``entropy`` -> ``entropy_next``, ...)."""
    name = ALIASES.get(name, name)
    if name not in SELECTIONS:
        choices = ", ".join(list(SELECTIONS) + list(ALIASES))
        raise InputError(f"unknown selection {name!r}; choose from {choices}")
    return name


def select_top(
    scores: np.ndarray, fraction: float, time: int, sinks: int = SINKS, seed: int | None = None
) -> tuple[int, ...]:
    """Positions of the top `fraction` of ``scores[sinks..time]`` (random if `scores` is None)."""
    if not 0 < fraction < 1:
        raise InputError(f"fraction must lie in (0, 1), got {fraction}", "fraction")
    candidates = np.arange(min(sinks, time + 1), time + 1)
    count = min(len(candidates), max(1, round(fraction * (time + 1))))
    if scores is None:
        chosen = np.random.default_rng(seed).choice(candidates, size=count, replace=False)
    else:
        values = np.nan_to_num(np.asarray(scores, dtype=float)[candidates], nan=-np.inf)
        chosen = candidates[np.argsort(-values, kind="stable")[:count]]
    return tuple(sorted(int(p) for p in chosen))


def select(
    signals: TokenSignals, name: str, fraction: float, time: int, sinks: int = SINKS, seed: int = 0
) -> tuple[int, ...]:
    """Select by a signal name (or ``random``); `signals` must be read on the prefix ``0..time``."""
    name = canonical(name)
    scores = None if name == "random" else signals.get(name)
    return select_top(scores, fraction, time, sinks=sinks, seed=seed)
