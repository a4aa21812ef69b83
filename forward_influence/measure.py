"""Influence by distance for signal-chosen sets, over one or many traces.

`influence_by_distance` is the measurement behind ``forward-influence influence`` and the demo: for
each trace it reads the token signals on the prefix ``0..t`` (what is known at the eviction time),
picks the top fraction of that prefix by each selection, evicts each set at t in one batched pass,
and records the divergence at every distance. `summarize` turns that into a table by distance
bucket with 95% confidence intervals across documents (across the bucket's query positions when
there is a single document).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
from tqdm.auto import tqdm

from .defaults import SINKS, TOP_K, WINDOW
from .errors import InputError
from .eviction import EvictionSpec
from .influence import LAYER_BANDS, clean_run, evict, per_distance_frame
from .selection import canonical, select
from .signals import TokenSignals, token_signals
from .stats import DEFAULT_EDGES, by_bucket, mean_ci
from .tracer import Tracer
from .traces import Trace

# A selector picks positions from (trace, signals on the prefix, time); the CLI adds policy-based ones.
Selector = Callable[[Trace, TokenSignals, int], Sequence[int]]


@dataclass(frozen=True)
class InfluenceSettings:
    """What to evict and how far to look.

    fraction: share of the prefix ``0..t`` evicted by each selection, in (0, 1).
    evict_at: eviction time t (None: the middle of each trace).
    max_distance: distances 1..D measured after t (None: to the end of the trace).
    layers, heads: restrict the eviction to these layers / KV heads (None: all).
    sinks: the first positions that are never evicted.
    """

    fraction: float = 0.1
    evict_at: int | None = None
    max_distance: int | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    sinks: int = SINKS
    top_k: int = TOP_K
    window: int = WINDOW
    seed: int = 0
    batch_size: int = 4


def check_time(evict_at: int, sinks: int = SINKS) -> None:
    """The half of the eviction-time rule that needs no trace: a token to evict after the sinks."""
    if evict_at < sinks:
        raise InputError(
            f"evict_at {evict_at} must be at least sinks ({sinks}): the first {sinks} positions are "
            "attention sinks, never evicted",
            "evict_at",
            "sinks",
        )


def eviction_time(trace: Trace, evict_at: int | None, sinks: int = SINKS) -> int:
    """The eviction time t of a trace: `evict_at`, or the middle of the trace when None.

    One rule for every command: t must leave a token to evict after the first `sinks` positions and a
    position to measure after it, ``sinks <= t <= len(trace) - 2``; an `InputError` names the option
    only when the user gave it.
    """
    n = len(trace)
    if evict_at is None:
        t = n // 2
        if not sinks <= t <= n - 2:
            raise InputError(
                f"trace {trace.id!r} has {n} tokens, too few to evict a token after the first {sinks} "
                "(the sinks) and measure a later one; use a longer trace"
            )
        return t
    check_time(evict_at, sinks)
    if evict_at > n - 2:
        raise InputError(
            f"evict_at {evict_at} is beyond trace {trace.id!r} ({n} tokens; it must be < {n - 1})", "evict_at"
        )
    return evict_at


def influence_by_distance(
    tracer: Tracer,
    traces: Sequence[Trace],
    selections: Sequence[str],
    settings: InfluenceSettings = InfluenceSettings(),
    selectors: dict[str, Selector] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-distance divergences for every trace and selection (see `per_distance_frame`).

    `selections` are signal names, aliases or ``random``, or keys of `selectors` (extra selection
    rules given by the caller, e.g. compression policies).
    """
    selectors = selectors or {}
    names = [s if s in selectors else canonical(s) for s in selections]
    times = [eviction_time(trace, settings.evict_at, settings.sinks) for trace in traces]  # before any work
    frames = []
    for trace, t in tqdm(list(zip(traces, times)), desc="traces", unit="trace", disable=not progress):
        end = len(trace) if settings.max_distance is None else min(len(trace), t + 1 + settings.max_distance)
        signals = token_signals(tracer, trace.token_ids[: t + 1], top_k=settings.top_k, window=settings.window)
        specs = []
        for name in names:
            if name in selectors:
                positions = tuple(sorted(int(p) for p in selectors[name](trace, signals, t)))
            else:
                positions = select(signals, name, settings.fraction, t, sinks=settings.sinks, seed=settings.seed)
            specs.append(EvictionSpec(positions, t, settings.layers, settings.heads))
        clean = clean_run(tracer, trace.token_ids[:end])
        divergence = evict(tracer, clean, specs, end - t - 1, batch_size=settings.batch_size)
        frames.append(per_distance_frame(divergence, names, trace.id, t))
    return pd.concat(frames, ignore_index=True)


BANDS = tuple(f"hidden_cos_{band}" for band in LAYER_BANDS)
VALUES = ("kl", "top1_agreement", "hidden_cos", "hidden_rel_l2", *BANDS)


def summarize(per_distance: pd.DataFrame, edges: Sequence[int] = DEFAULT_EDGES) -> pd.DataFrame:
    """Table by selection and distance bucket: mean and 95% CI of KL, mean agreement and hidden distance.

    Columns: ``selection, bucket, distance_lo, distance_hi, kl_mean, kl_ci_low, kl_ci_high,
    top1_agreement, hidden_cos_mean, hidden_rel_l2_mean, n_documents``, then mean and CI of the
    hidden-state cosine distance per layer band (``hidden_cos_early_mean``, ``..._ci_low``, ...).
    """
    per_doc = by_bucket(per_distance, VALUES, edges)
    single = per_distance.document.nunique() < 2
    rows = []
    for (selection, bucket), group in per_doc.groupby(["selection", "bucket"], sort=False):
        if single:
            lo, hi = group.distance_lo.iloc[0], group.distance_hi.iloc[0]
            inside = per_distance[(per_distance.selection == selection) & per_distance.distance.between(lo, hi)]
        else:
            inside = group
        kl = mean_ci(inside.kl)
        bands = {}
        for band in BANDS:
            bands[f"{band}_mean"], bands[f"{band}_ci_low"], bands[f"{band}_ci_high"] = mean_ci(inside[band])
        rows.append(
            dict(
                selection=selection,
                bucket=bucket,
                distance_lo=int(group.distance_lo.iloc[0]),
                distance_hi=int(group.distance_hi.max()),
                kl_mean=kl[0],
                kl_ci_low=kl[1],
                kl_ci_high=kl[2],
                top1_agreement=group.top1_agreement.mean(),
                hidden_cos_mean=group.hidden_cos.mean(),
                hidden_rel_l2_mean=group.hidden_rel_l2.mean(),
                n_documents=group.document.nunique(),
                **bands,
            )
        )
    return pd.DataFrame(rows)
