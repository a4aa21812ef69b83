"""Influence by distance: how far ahead does evicting each selection change the model?

Two views over the evaluation essays, each cached per document (resumable) and summarised with 95%
t-intervals across documents:

- Sets. For every essay, the top `fraction` of the prefix ``0..t`` chosen by each selection (entropy
  with both alignments, SnapKV and H2O attention, evolution, InfoKV, random; `analyses.selections`)
  is evicted at t, and the KL of the next-token distributions and the hidden-state cosine distance
  per layer band (early / middle / late third of the layers) are recorded at every distance after t,
  then averaged in distance buckets (`forward_influence.measure`).
- Tokens. Every token of the `scan_tokens` before t is evicted alone at its own time
  (`forward_influence.scan`), giving its near (d = 1..8) and far (d >= 33) Forward Influence. Each
  signal, read as a compressor at ``t + window`` would see it, is cut into deciles per document:
  the mean FI per decile shows whether a signal predicts far influence, and the Spearman correlation
  of each signal with ``fi_near`` and ``fi_far`` says by how much; the paired table says whether
  entropy (or InfoKV) ranks a token's influence better than attention does on the same documents.

    python -m analyses.influence_by_distance --docs 20 --out runs/influence
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from scipy import stats

from forward_influence.defaults import WINDOW
from forward_influence.measure import BANDS, InfluenceSettings, influence_by_distance, summarize
from forward_influence.models import LoadedModel, load_model
from forward_influence.outputs import write_table
from forward_influence.scan import scan
from forward_influence.selection import select_top
from forward_influence.sources import DEFAULT_MODEL
from forward_influence.stats import group_ci
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from kv_compression.names import parse

from .documents import add_shard_option, cache_folder, essay_segments, per_document, quick
from .plotting import distinct_palette, save_figure, theme
from .selections import DEFAULT_SELECTIONS, INFOKV, LABELS, policy_scores, scores

TOKEN_SIGNALS = tuple(name for name in DEFAULT_SELECTIONS if name != "random")
ATTENTION_SIGNALS = ("attention_snapkv", "attention_h2o")
DECILES = 10


def infokv_selector(tracer: Tracer, settings: InfluenceSettings, model: str | None):
    """A `measure.Selector` for InfoKV's top set of the prefix (`selections.INFOKV`)."""
    policy = parse(INFOKV, model, quiet=True)

    def select(trace: Trace, signals, t: int) -> tuple[int, ...]:
        ranking = policy_scores(tracer, trace.token_ids[: t + 1], policy)
        return select_top(ranking, settings.fraction, t, sinks=settings.sinks)

    return select


def token_frame(
    tracer: Tracer,
    trace: Trace,
    start: int,
    end: int,
    max_distance: int,
    window: int = WINDOW,
    model: str | None = None,
    signals: Sequence[str] = TOKEN_SIGNALS,
) -> pd.DataFrame:
    """One row per token of ``[start, end)``: ``document, position, fi_near, fi_far, <signals>``, each
    signal read as a compressor at ``end + window`` would see it (policies leave their own window
    unranked, so the window is at least theirs)."""
    ids = trace.token_ids
    fi = scan(tracer, ids[: end + max_distance], start, end, max_distance)
    window = max(window, parse(INFOKV, model, quiet=True).window)
    ranking = scores(tracer, ids[: end + window], signals, model=model)
    frame = fi[["position", "fi_near", "fi_far"]].copy()
    frame.insert(0, "document", trace.id)
    for name in signals:
        frame[name] = ranking[name][start:end]
    return frame


def token_tables(
    per_token: pd.DataFrame, signals: Sequence[str] = TOKEN_SIGNALS, attention: Sequence[str] = ATTENTION_SIGNALS
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(deciles, correlations, paired) across documents.

    deciles: ``signal, decile (1 = lowest), n, fi_near_*, fi_far_*`` — per document the tokens are cut
    into deciles of the signal, the FI is averaged per decile, then mean and CI across documents.
    correlations: ``signal, target, n, spearman_mean, spearman_ci_low, spearman_ci_high`` — the
    Spearman correlation of the signal with the target per document, then mean and CI.
    paired: ``signal, against, target, n, difference_mean, difference_ci_low, difference_ci_high`` —
    each non-attention signal's Spearman minus each `attention` signal's on the same document, then
    mean and CI: a positive interval says the signal ranks that influence better than the attention.
    """
    decile_rows, correlation_rows = [], []
    for document, doc in per_token.groupby("document", sort=False):
        for signal in signals:
            valid = doc.dropna(subset=[signal])
            if len(valid) < DECILES:
                continue
            decile = pd.qcut(valid[signal].rank(method="first"), DECILES, labels=range(1, DECILES + 1))
            means = valid.groupby(decile, observed=True)[["fi_near", "fi_far"]].mean().reset_index(names="decile")
            decile_rows.append(means.assign(document=document, signal=signal))
            for target in ("fi_near", "fi_far"):
                both = valid.dropna(subset=[target])
                rho = stats.spearmanr(both[signal], both[target]).statistic
                correlation_rows.append(dict(document=document, signal=signal, target=target, spearman=rho))
    deciles = group_ci(pd.concat(decile_rows, ignore_index=True), ["signal", "decile"], ["fi_near", "fi_far"])
    rhos = pd.DataFrame(correlation_rows)
    correlations = group_ci(rhos, ["signal", "target"], ["spearman"])
    wide = rhos.pivot(index=["document", "target"], columns="signal", values="spearman")
    against = [a for a in attention if a in wide]
    differences = [
        pd.DataFrame(
            {
                "signal": signal,
                "against": other,
                "target": wide.index.get_level_values("target"),
                "difference": (wide[signal] - wide[other]).to_numpy(),
            }
        )
        for signal in signals
        if signal in wide and signal not in attention
        for other in against
    ]
    paired = (
        group_ci(pd.concat(differences, ignore_index=True), ["signal", "against", "target"], ["difference"])
        if differences
        else pd.DataFrame()
    )
    return deciles, correlations, paired


def _errorbars(ax, x, rows, column, **kwargs):
    low = (rows[f"{column}_mean"] - rows[f"{column}_ci_low"]).clip(lower=0).fillna(0)
    high = (rows[f"{column}_ci_high"] - rows[f"{column}_mean"]).clip(lower=0).fillna(0)
    ax.errorbar(x, rows[f"{column}_mean"], yerr=[low, high], marker="o", capsize=3, **kwargs)


def plot_influence(table: pd.DataFrame, title: str, path: str | Path) -> list[Path]:
    """KL (log scale) and hidden-state cosine distance per layer band by distance bucket, one line per
    selection, 95% CIs as error bars."""
    theme()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8), layout="constrained")
    buckets = list(dict.fromkeys(table.bucket))
    x = {b: i for i, b in enumerate(buckets)}
    groups = list(table.groupby("selection", sort=False))
    palette = distinct_palette([selection for selection, _ in groups]).values()
    for panel, (ax, column) in enumerate(zip(axes, ("kl", *BANDS))):
        for i, (color, (selection, rows)) in enumerate(zip(palette, groups)):
            dodge = (i - (len(groups) - 1) / 2) * 0.06  # keep overlapping error bars apart
            xs = np.array([x[b] for b in rows.bucket]) + dodge
            _errorbars(ax, xs, rows, column, label=LABELS.get(selection, selection), color=color)
        ax.set_xticks(range(len(buckets)), buckets)
        ax.set_yscale("log")
        ax.set_xlabel("distance after the eviction time (tokens)")
        if column == "kl":
            ax.set_ylabel("KL(clean || evicted) (nats / token)")
            ax.set_title("next-token distributions", fontsize=10)
        else:
            ax.set_ylabel("1 - cos(clean, evicted) of the residual stream")
            ax.set_title(f"hidden states, {column.removeprefix('hidden_cos_')} third of the layers", fontsize=10)
        if panel == 0:
            ax.legend(title="evicted set", fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def plot_tokens(deciles: pd.DataFrame, correlations: pd.DataFrame, title: str, path: str | Path) -> list[Path]:
    """Per-token view: mean fi_near and fi_far by signal decile, and the Spearman correlations."""
    theme()
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), layout="constrained")
    signals = list(dict.fromkeys(deciles.signal))
    palette = distinct_palette(signals)
    for ax, target, name in ((axes[0], "fi_near", "near (d = 1-8)"), (axes[1], "fi_far", "far (d >= 33)")):
        for signal in signals:
            rows = deciles[deciles.signal == signal]
            _errorbars(
                ax, rows.decile.astype(int), rows, target, label=LABELS.get(signal, signal), color=palette[signal]
            )
        ax.set_yscale("log")
        ax.set_xticks(range(1, DECILES + 1))
        ax.set_xlabel("decile of the signal within its document (10 = highest)")
        ax.set_ylabel(f"mean Forward Influence, {name} (nats / token)")
        ax.set_title(f"{name} influence of a token evicted alone", fontsize=10)
    axes[0].legend(title="signal", fontsize=8)
    wide = correlations.assign(label=correlations.signal.map(lambda s: LABELS.get(s, s)))
    y = np.arange(len(signals))
    for offset, (target, color) in zip((-0.2, 0.2), (("fi_near", "0.55"), ("fi_far", palette[signals[0]]))):
        rows = wide[wide.target == target].set_index("signal").loc[signals]
        err = [
            (rows.spearman_mean - rows.spearman_ci_low).fillna(0),
            (rows.spearman_ci_high - rows.spearman_mean).fillna(0),
        ]
        axes[2].barh(y + offset, rows.spearman_mean, height=0.4, xerr=err, capsize=3, color=color, label=target)
    axes[2].axvline(0, color="black", linewidth=0.8)
    axes[2].set_yticks(y, [LABELS.get(s, s) for s in signals])
    axes[2].invert_yaxis()
    axes[2].set_xlabel("Spearman correlation with the token's Forward Influence")
    axes[2].set_title("rank correlation per document, 95% CI", fontsize=10)
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def run(
    model: str | LoadedModel,
    traces: Sequence[Trace],
    out: Path,
    selections: Sequence[str] = DEFAULT_SELECTIONS,
    settings: InfluenceSettings | None = None,
    scan_tokens: int = 128,
    scan_distance: int = 64,
    label: str | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict[str, pd.DataFrame] | Path:
    """Measure both views and write their CSVs and figures to `out` (``scan_tokens=0`` skips the
    per-token view); returns the tables by file stem. With a `shard` ``(i, n)`` only that shard's
    documents are measured into the cache, nothing is written and the cache folder is returned
    (`documents.shard_of`)."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    tracer = Tracer(loaded)
    settings = settings or InfluenceSettings()
    if settings.evict_at is None:  # one t for every document: the middle of the shortest
        settings = replace(settings, evict_at=min(len(trace) for trace in traces) // 2)
    cache = cache_folder(out, loaded.name)
    extra = {"infokv": infokv_selector(tracer, settings, loaded.name)} if "infokv" in selections else {}
    key = dict(selections=list(selections), settings=asdict(settings))
    per_distance = per_document(
        traces,
        lambda trace: influence_by_distance(tracer, [trace], selections, settings, extra, progress=False),
        cache / "influence",
        key,
        "influence by distance",
        progress,
        shard,
    )
    per_token = None
    if scan_tokens:
        start, t = max(settings.sinks, settings.evict_at - scan_tokens), settings.evict_at
        signals = [name for name in selections if name != "random"]
        per_token = per_document(
            traces,
            lambda trace: token_frame(tracer, trace, start, t, scan_distance, settings.window, loaded.name, signals),
            cache / "tokens",
            dict(start=start, end=t, distance=scan_distance, window=settings.window, signals=signals),
            "per-token influence",
            progress,
            shard,
        )
    if shard is not None:  # the shard contract (`documents.shard_of`)
        return cache
    table = summarize(per_distance)
    lengths = sorted({len(t) for t in traces})
    label = label or f"{len(traces)} evaluation essays x {lengths[0]}{'+' if len(lengths) > 1 else ''} tokens"
    tables = {"influence_per_distance": per_distance, "influence": table}
    write_table(per_distance, out / "influence_per_distance.csv")
    write_table(table, out / "influence.csv")
    t = settings.evict_at
    plot_influence(
        table,
        f"{loaded.name}: {settings.fraction:.0%} of the prefix evicted at t = {t}, {label}\n"
        "mean per distance bucket, 95% CI across documents",
        out / "influence",
    )
    if per_token is not None:
        deciles, correlations, paired = token_tables(per_token, signals)
        tables.update(
            per_token=per_token, per_token_deciles=deciles, per_token_correlations=correlations, per_token_paired=paired
        )
        for name in ("per_token", "per_token_deciles", "per_token_correlations", "per_token_paired"):
            write_table(tables[name], out / f"{name}.csv")
        plot_tokens(
            deciles,
            correlations,
            f"{loaded.name}: each token of positions {start}-{t - 1} evicted alone, {label}",
            out / "per_token",
        )
    return tables


def main(argv: list[str] | None = None) -> None:
    small = quick()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--docs", type=int, default=3 if small else 20, help="evaluation essays (default 20)")
    parser.add_argument(
        "--max-tokens", type=int, default=256 if small else 1024, help="tokens per essay (default 1024)"
    )
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the prefix evicted (default 0.1)")
    parser.add_argument("--evict-at", type=int, default=128 if small else 512, help="eviction time t (default 512)")
    parser.add_argument(
        "--scan-tokens",
        type=int,
        default=24 if small else 128,
        help="tokens before t scanned one by one (default 128; 0 skips the per-token view)",
    )
    parser.add_argument("--scan-distance", type=int, default=40 if small else 64, help="distances per scanned token")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random selection (default 0)")
    parser.add_argument("--out", type=Path, default=Path("runs/influence"))
    parser.add_argument(
        "--selections",
        default=",".join(DEFAULT_SELECTIONS),
        help="comma-separated selections (default %(default)s; add learned for the learned policy)",
    )
    add_shard_option(parser)
    args = parser.parse_args(argv)
    traces = essay_segments(load_model(args.model).tokenizer, args.docs, args.max_tokens)
    settings = InfluenceSettings(fraction=args.fraction, evict_at=args.evict_at, seed=args.seed)
    tables = run(
        args.model,
        traces,
        args.out,
        selections=[name.strip() for name in args.selections.split(",") if name.strip()],
        settings=settings,
        scan_tokens=args.scan_tokens,
        scan_distance=args.scan_distance,
        shard=args.shard,
    )
    if args.shard is not None:
        print(tables)
        return
    for name in ("influence", "per_token_correlations", "per_token_paired"):
        if name in tables:
            print(tables[name].to_string(index=False, float_format="{:.3g}".format))
    print(args.out / "influence.csv")


if __name__ == "__main__":
    main()
