"""Influence by distance: how far ahead does evicting each selection change the model?

For every trace, the top fraction of the prefix ``0..t`` chosen by each selection (entropy, SnapKV
attention, H2O attention, random, ...) is evicted at t, and the KL of the next-token distributions
is recorded at every distance after t, then averaged in distance buckets with 95% CIs across
documents (`forward_influence.measure`).

    python -m analyses.influence_by_distance --docs 5 --max-tokens 1024 --out runs/influence
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import pyplot as plt

from forward_influence import corpus
from forward_influence.measure import InfluenceSettings, influence_by_distance, summarize
from forward_influence.models import DEFAULT_MODEL, load_model
from forward_influence.outputs import write_table
from forward_influence.tracer import Tracer
from forward_influence.traces import read_traces

from .plotting import save_figure, theme

DEFAULT_SELECTIONS = ("entropy_next", "entropy_generated", "attention_snapkv", "attention_h2o", "random")


def plot_influence(table: pd.DataFrame, title: str, path: str | Path) -> list[Path]:
    """KL by distance bucket, one line per selection, with the 95% CI as error bars (log scale)."""
    theme()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    buckets = list(dict.fromkeys(table.bucket))
    x = {b: i for i, b in enumerate(buckets)}
    palette = sns.color_palette("colorblind", table.selection.nunique())
    groups = list(table.groupby("selection", sort=False))
    for i, (color, (selection, rows)) in enumerate(zip(palette, groups)):
        dodge = (i - (len(groups) - 1) / 2) * 0.06  # keep overlapping error bars apart
        xs = np.array([x[b] for b in rows.bucket]) + dodge
        low = (rows.kl_mean - rows.kl_ci_low).clip(lower=0).fillna(0)
        high = (rows.kl_ci_high - rows.kl_mean).clip(lower=0).fillna(0)
        ax.errorbar(xs, rows.kl_mean, yerr=[low, high], marker="o", capsize=3, label=selection, color=color)
    ax.set_xticks(range(len(buckets)), buckets)
    ax.set_yscale("log")
    ax.set_xlabel("distance after the eviction time (tokens)")
    ax.set_ylabel("KL(clean || evicted) (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.legend(title="evicted set", fontsize=8)
    return save_figure(fig, path)


def run(model: str, traces: list, selections, settings: InfluenceSettings, out: Path, label: str) -> pd.DataFrame:
    """Measure, write ``influence_per_distance.csv``, ``influence.csv`` and ``influence.png/.svg`` to `out`."""
    loaded = load_model(model)
    tracer = Tracer(loaded)
    per_distance = influence_by_distance(tracer, traces, selections, settings)
    table = summarize(per_distance)
    write_table(per_distance, out / "influence_per_distance.csv")
    write_table(table, out / "influence.csv")
    title = (
        f"{loaded.name}: {settings.fraction:.0%} of the prefix evicted at t, {label}\n"
        "mean KL per distance bucket, 95% CI across documents"
    )
    plot_influence(table, title, out / "influence")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--docs", type=int, default=5, help="evaluation essays to use (default 5)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens kept per essay (default 1024)")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the prefix evicted (default 0.1)")
    parser.add_argument("--evict-at", type=int, default=512, help="eviction time t (default 512)")
    parser.add_argument("--out", type=Path, default=Path("runs/influence"))
    args = parser.parse_args(argv)
    tokenizer = load_model(args.model).tokenizer
    names = corpus.essay_names("evaluation")[: args.docs]
    traces = [read_traces(f"essay:{n}", tokenizer, args.max_tokens)[0] for n in names]
    settings = InfluenceSettings(fraction=args.fraction, evict_at=args.evict_at)
    table = run(args.model, traces, DEFAULT_SELECTIONS, settings, args.out, f"{len(traces)} evaluation essays")
    print(table.to_string(index=False))
    print(args.out / "influence.csv")


if __name__ == "__main__":
    main()
