"""Attention vs entropy: do the two kinds of signal pick the same tokens, and which tokens are they?

For each evaluation essay (its first `max_tokens` tokens, all known at the eviction time t = the
last token), every selection of `analyses.selections` ranks the candidates ``sinks..t``; then:

- ``overlap``: Jaccard overlap of each pair's top sets at several fractions;
- ``correlation``: Spearman rank correlation of each pair of signals over the candidates;
- ``sets``: per selection and fraction, where the set lies (mean relative position ``p / t`` and
  mean age ``t - p`` in tokens) and its part-of-speech split (shares of content, function and other
  tokens, `analyses.pos`); the row ``whole text`` is the same for every candidate.

Every number is computed per document and summarised across documents (mean, 95% t-interval).
Results are cached per document under ``<out>/cache`` (resumable).

    python -m analyses.attention_vs_entropy --docs 20 --out runs/attention_vs_entropy
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import pyplot as plt
from scipy import stats

from forward_influence.defaults import SINKS
from forward_influence.models import LoadedModel, load_model
from forward_influence.outputs import write_table
from forward_influence.sources import DEFAULT_MODEL
from forward_influence.stats import group_ci
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace

from . import pos
from .documents import add_shard_option, cache_folder, essay_segments, per_document, quick
from .plotting import overlap_heatmap, save_figure, theme
from .selections import DEFAULT_SELECTIONS, LABELS, jaccard, scores, top_sets

FRACTIONS = (0.05, 0.1, 0.25, 0.5)
WHOLE = "whole text"


def document_frame(
    tracer: Tracer,
    trace: Trace,
    selections: Sequence[str],
    fractions: Sequence[float],
    sinks: int = SINKS,
    seed: int = 0,
    model: str | None = None,
) -> pd.DataFrame:
    """Long table of one document: ``document, kind, a, b, fraction, value`` (see the module docstring).

    kind ``jaccard`` (a, b, fraction), ``spearman`` (a, b), and per set (a = selection, fraction):
    ``relative_position``, ``age``, ``content``, ``function``, ``other``.
    """
    ids = trace.token_ids
    t = len(ids) - 1
    ranking = scores(tracer, ids, selections, model=model)
    classes = np.array([pos.word_class(tag) for tag in pos.token_pos(tracer.tokenizer, ids)])
    rows = []

    def add(kind, a, b, fraction, value):
        rows.append(dict(document=trace.id, kind=kind, a=a, b=b, fraction=fraction, value=float(value)))

    def describe(name: str, positions: np.ndarray, fraction: float):
        add("relative_position", name, "", fraction, (positions / t).mean())
        add("age", name, "", fraction, (t - positions).mean())
        for word_class in ("content", "function", "other"):
            add(word_class, name, "", fraction, (classes[positions] == word_class).mean())

    candidates = np.arange(sinks, t + 1)
    describe(WHOLE, candidates, 1.0)
    for fraction in fractions:
        sets = top_sets(ranking, fraction, t, sinks=sinks, seed=seed)
        for name, chosen in sets.items():
            describe(name, np.array(chosen), fraction)
        for a, b in itertools.combinations(selections, 2):
            add("jaccard", a, b, fraction, jaccard(sets[a], sets[b]))
    ranked = [n for n in selections if ranking[n] is not None]
    for a, b in itertools.combinations(ranked, 2):
        x, y = ranking[a][candidates], ranking[b][candidates]
        keep = ~(np.isnan(x) | np.isnan(y))
        add("spearman", a, b, np.nan, stats.spearmanr(x[keep], y[keep]).statistic)
    return pd.DataFrame(rows)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% CI across documents per ``kind, a, b, fraction``."""
    keyed = frame.fillna({"fraction": -1.0})  # groupby drops NaN keys; Spearman rows have no fraction
    table = group_ci(keyed, ["kind", "a", "b", "fraction"], ["value"]).rename(columns={"n": "n_documents"})
    table["fraction"] = table.fraction.replace(-1.0, np.nan)
    return table


def plot(table: pd.DataFrame, fraction: float, title: str, path: Path) -> list[Path]:
    """Three panels at one fraction: Jaccard overlap matrix, content-word share, mean age of each set."""
    theme()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.4), gridspec_kw=dict(width_ratios=[1.25, 1, 1]), layout="constrained")
    pairs = table[(table.kind == "jaccard") & np.isclose(table.fraction, fraction)]
    names = list(dict.fromkeys([*pairs.a, *pairs.b]))
    matrix = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for row in pairs.itertuples():
        matrix.loc[row.a, row.b] = matrix.loc[row.b, row.a] = row.value_mean
    labels = [LABELS.get(n, n) for n in names]
    overlap_heatmap(axes[0], matrix, labels, "Jaccard overlap")
    axes[0].set_title(f"overlap of the top {fraction:.0%} sets (mean over documents)", fontsize=10)

    for ax, kind, xlabel in (
        (axes[1], "content", "share of content words (nouns, verbs, adjectives, adverbs)"),
        (axes[2], "age", "mean age t - position (tokens)"),
    ):
        rows = table[(table.kind == kind) & (np.isclose(table.fraction, fraction) | (table.a == WHOLE))]
        rows = rows.set_index("a").loc[[n for n in [*names, WHOLE] if n in set(rows.a)]]
        y = np.arange(len(rows))
        err = [(rows.value_mean - rows.value_ci_low).fillna(0), (rows.value_ci_high - rows.value_mean).fillna(0)]
        colors = ["0.6" if n == WHOLE else sns.color_palette("colorblind")[0] for n in rows.index]
        ax.barh(y, rows.value_mean, xerr=err, color=colors, capsize=3)
        ax.set_yticks(y, [LABELS.get(n, n) for n in rows.index])
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title("95% CI across documents; grey: all candidate tokens", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def run(
    model: str | LoadedModel,
    traces: Sequence[Trace],
    out: Path,
    selections: Sequence[str] = DEFAULT_SELECTIONS,
    fractions: Sequence[float] = FRACTIONS,
    seed: int = 0,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> pd.DataFrame | Path:
    """Measure every document (cached), write ``attention_vs_entropy_per_document.csv``,
    ``attention_vs_entropy.csv`` and the figure ``attention_vs_entropy.png/.svg``; returns the summary
    (a shard run: the cache folder, `documents.shard_of`)."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    tracer = Tracer(loaded)
    key = dict(selections=list(selections), fractions=list(fractions), seed=seed)
    folder = cache_folder(out, loaded.name) / "attention_vs_entropy"
    frame = per_document(
        traces,
        lambda trace: document_frame(tracer, trace, selections, fractions, seed=seed, model=loaded.name),
        folder,
        key,
        "attention vs entropy",
        progress,
        shard,
    )
    if shard is not None:  # the shard contract (`documents.shard_of`)
        return folder
    table = summarize(frame)
    write_table(frame, out / "attention_vs_entropy_per_document.csv")
    write_table(table, out / "attention_vs_entropy.csv")
    lengths = sorted({len(t) for t in traces})
    title = (
        f"{loaded.name}: attention vs entropy selections, {len(traces)} evaluation essays "
        f"x {lengths[0] if len(lengths) == 1 else f'{lengths[0]}-{lengths[-1]}'} tokens"
    )
    fraction = 0.1 if 0.1 in fractions else fractions[0]
    plot(table, fraction, title, out / "attention_vs_entropy")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--docs", type=int, default=3 if quick() else 20, help="evaluation essays (default 20)")
    parser.add_argument("--max-tokens", type=int, default=256 if quick() else 1024, help="tokens per essay")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random selection (default 0)")
    parser.add_argument("--out", type=Path, default=Path("runs/attention_vs_entropy"))
    add_shard_option(parser)
    args = parser.parse_args(argv)
    traces = essay_segments(load_model(args.model).tokenizer, args.docs, args.max_tokens)
    table = run(args.model, traces, args.out, seed=args.seed, shard=args.shard)
    if args.shard is not None:
        print(table)
        return
    print(table.to_string(index=False, float_format="{:.3g}".format))
    print(args.out / "attention_vs_entropy.csv")


if __name__ == "__main__":
    main()
