"""Token-level selections of a trace's prefix: which tokens each signal or policy ranks highest.

The analyses compare rankings of the tokens ``0..t`` known at an eviction time t:

- the raw token signals of `forward_influence.signals` (``entropy_next``, ``entropy_generated``,
  ``attention_snapkv``, ``attention_h2o``, ``evolution``), averaged over layers and heads;
- ``infokv``, ``learned``: the published InfoKV's score and the learned policy's (`kv_compression`;
  the model's fitted weights), averaged over the full-attention layers and KV heads; the tokens a
  policy always keeps (its window, scored +inf) are left unranked;
- ``random``: a seeded uniform draw.

Two uses: `top_sets` picks the top fraction of the candidates ``sinks..t`` (the set whose eviction
Forward Influence measures), and `kept_sets` is what a compressor at a budget keeps: the first
`sinks` and last `window` tokens of the prefix plus the best-ranked others up to the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from forward_influence.defaults import SINKS, WINDOW
from forward_influence.errors import InputError
from forward_influence.selection import select_top
from forward_influence.signals import TokenSignals, token_signals
from forward_influence.tracer import Tracer
from kv_compression.budget import Budget
from kv_compression.kept import layer_scores, mean_token_scores
from kv_compression.names import parse
from kv_compression.offline import observation
from kv_compression.policies import Policy

INFOKV = "infokv"  # the policy behind the ``infokv`` selection: the published rule
SIGNAL_SELECTIONS = ("entropy_next", "entropy_generated", "attention_snapkv", "attention_h2o", "evolution")
POLICY_SELECTIONS = {"infokv": INFOKV, "learned": "learned"}  # selection name -> the policy that ranks
KNOWN_SELECTIONS = (*SIGNAL_SELECTIONS, *POLICY_SELECTIONS, "random")
DEFAULT_SELECTIONS = (*SIGNAL_SELECTIONS, "infokv", "random")  # unless told (learned needs the model's fit)
LABELS = {
    "entropy_next": "entropy (next)",
    "entropy_generated": "entropy (generated)",
    "attention_snapkv": "SnapKV attention",
    "attention_h2o": "H2O attention",
    "evolution": "evolution",
    "infokv": "InfoKV",
    "learned": "learned",
    "random": "random",
}


def check_selections(names: Sequence[str]) -> list[str]:
    """`names` if all are known, else `InputError` naming the choices."""
    unknown = [n for n in names if n not in KNOWN_SELECTIONS]
    if unknown or not names:
        raise InputError(
            f"unknown selection {', '.join(unknown) or '(none)'}; choose from {', '.join(KNOWN_SELECTIONS)}"
        )
    return list(names)


def policy_scores(tracer: Tracer, token_ids: Sequence[int], policy: Policy) -> np.ndarray:
    """``[tokens]`` mean score of `policy` over full-attention layers and KV heads; protected tokens NaN."""
    obs = observation(tracer, token_ids, [policy])
    return mean_token_scores(layer_scores(policy, obs)).cpu().numpy()


def scores(
    tracer: Tracer,
    token_ids: Sequence[int],
    names: Sequence[str],
    signals: TokenSignals | None = None,
    model: str | None = None,
) -> dict[str, np.ndarray | None]:
    """Per-token ranking score ``[tokens]`` of each selection (None for ``random``) on `token_ids`.

    `signals` (read on the same tokens) saves the signal pass when the caller has it.
    """
    out: dict[str, np.ndarray | None] = {}
    if any(n in SIGNAL_SELECTIONS for n in names) and signals is None:
        signals = token_signals(tracer, token_ids)
    for name in check_selections(names):
        if name == "random":
            out[name] = None
        elif name in POLICY_SELECTIONS:
            out[name] = policy_scores(tracer, token_ids, parse(POLICY_SELECTIONS[name], model, quiet=True))
        else:
            out[name] = signals.get(name)
    return out


def top_sets(
    ranking: dict[str, np.ndarray | None], fraction: float, time: int, sinks: int = SINKS, seed: int = 0
) -> dict[str, tuple[int, ...]]:
    """The top `fraction` of the prefix ``0..time`` by each score (see `select_top`)."""
    return {name: select_top(s, fraction, time, sinks=sinks, seed=seed) for name, s in ranking.items()}


def kept_sets(
    ranking: dict[str, np.ndarray | None],
    budget: Budget,
    time: int,
    sinks: int = SINKS,
    window: int = WINDOW,
    seed: int = 0,
) -> dict[str, tuple[int, ...]]:
    """What each ranking keeps of the prefix ``0..time`` at `budget` (`Budget.tokens` of its tokens).

    Sinks and the last `window` tokens are kept first (as every compressor here does); the best
    ranked of the others fill the rest. A budget below the protected tokens keeps only those.
    """
    n = time + 1
    protected = set(range(min(sinks, n))) | set(range(max(0, n - window), n))
    free = max(0, budget.tokens(n) - len(protected))
    middle = np.array(sorted(set(range(n)) - protected), dtype=int)
    kept = {}
    for name, s in ranking.items():
        if s is None:
            chosen = np.random.default_rng(seed).choice(middle, size=min(free, len(middle)), replace=False)
        else:
            values = np.nan_to_num(np.asarray(s, dtype=float)[middle], nan=-np.inf)
            chosen = middle[np.argsort(-values, kind="stable")[:free]]
        kept[name] = tuple(sorted(protected | {int(p) for p in chosen}))
    return kept


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|A ∩ B| / |A ∪ B| (1 for two empty sets)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0
