"""The demo, the main job: the paper's analysis on the embedded model, as one HTML report.

On a handful of evaluation essays it runs influence by distance (the top 10% by each signal evicted
at t), attention vs entropy (overlap, rank correlation, positions, parts of speech) and a policy
comparison at a 25% budget, draws a token heatmap of InfoKV's choice on the first essay, and writes
every table and figure under the output folder plus ``report.html``, which holds them all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from forward_influence.measure import InfluenceSettings
from forward_influence.models import LoadedModel, load_model
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from kv_compression.budget import Budget

from . import attention_vs_entropy, heatmap, influence_by_distance
from .compare import compare, display_table
from .documents import essay_segments
from .report import Report
from .selections import LABELS

HEATMAP_TOKENS = 320
QUARTER = Budget(0.25)


def run_demo(
    model: str | LoadedModel,
    out: Path,
    docs: int = 4,
    max_tokens: int = 768,
    fraction: float = 0.1,
    evict_at: int = 384,
    budget: Budget = QUARTER,
    seed: int = 0,
) -> Path:
    """Run the demo; returns the path of ``report.html``."""
    if not isinstance(model, LoadedModel):
        print(f"loading {model} ...", file=sys.stderr)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    tracer = Tracer(loaded)
    traces = essay_segments(loaded.tokenizer, docs, max_tokens)
    label = f"{len(traces)} evaluation essays x {max_tokens} tokens"
    report = Report(f"Forward Influence demo: {loaded.name}, {label}")
    report.text(
        "Every number below is a mean over documents with its 95% t-interval across documents; the CSVs "
        "and figures lie next to this report. Reproduce with the same command and seed.",
        note=True,
    )

    settings = InfluenceSettings(fraction=fraction, evict_at=evict_at, seed=seed)
    tables = influence_by_distance.run(loaded, traces, out / "influence", settings=settings, scan_tokens=0, label=label)
    influence = tables["influence"]
    report.heading("1. Influence by distance")
    report.text(
        f"The top {fraction:.0%} of the prefix 0..{evict_at} by each signal is evicted at t = {evict_at}; "
        "the KL of the next-token distributions (and the hidden-state distance per third of the layers) is "
        "followed at every later distance."
    )
    report.figure(out / "influence" / "influence.png", "KL and hidden-state distance by distance bucket, 95% CI")
    report.table(influence[["selection", "bucket", "kl_mean", "kl_ci_low", "kl_ci_high", "top1_agreement"]])

    table = attention_vs_entropy.run(loaded, traces, out / "attention_vs_entropy", fractions=(0.1, 0.25), seed=seed)
    report.heading("2. Attention vs entropy")
    report.text(
        "Do the signals pick the same tokens? Jaccard overlap of the top sets, where the sets lie, which "
        "parts of speech they hold (spaCy tags, subword tokens take their word's tag)."
    )
    report.figure(out / "attention_vs_entropy" / "attention_vs_entropy.png", "overlap, content-word share and age")
    spearman = table[table.kind == "spearman"][["a", "b", "value_mean", "value_ci_low", "value_ci_high"]]
    report.table(
        spearman.rename(columns={"value_mean": "spearman", "value_ci_low": "ci_low", "value_ci_high": "ci_high"})
    )

    print(f"policy comparison at a {budget.share()} budget ...", file=sys.stderr)
    summary, _ = compare(tracer, traces, budget, out / "compare", evict_at, model=loaded.name)
    report.heading(f"3. Selections at a {budget.share()} budget")
    report.text(
        "Each selection keeps the sinks, the last 32 tokens and its best-ranked others up to the budget; the "
        "rest is evicted at t and its Forward Influence measured (near: d = 1-8, far: d >= 33)."
    )
    report.figure(out / "compare" / "compare.png", "Forward Influence of evicting the complement; overlap of kept sets")
    report.table(display_table(summary))

    first = traces[0]
    shown = heatmap.heat(
        tracer, Trace(first.id, first.token_ids[:HEATMAP_TOKENS]), "policy:infokv", budget, model=loaded.name
    )
    title = f"{loaded.name}: {first.id}, first {HEATMAP_TOKENS} tokens, InfoKV score, budget {budget}"
    page = heatmap.write(shown, title, out / "heatmap.html")
    report.heading("4. Token heatmap")
    report.page(
        page.read_text(),
        f"InfoKV's score per token (darker = kept first); struck through: evicted. "
        f"{int((~shown.kept).sum())} of {len(shown.kept)} tokens evicted.",
    )

    far = influence[influence.bucket == "33-128"].set_index("selection").kl_mean
    if len(far):
        order = ", ".join(f"{LABELS.get(s, s)} {v:.3g}" for s, v in far.sort_values(ascending=False).items())
        report.heading("Summary")
        report.text(f"Far KL (distances 33-128) of evicting each top-{fraction:.0%} set, highest first: {order}.")
        best = summary.set_index("selection")
        column = "fi_far_mean" if "fi_far_mean" in best else "fi_far"
        winner = best[column].idxmin()
        report.text(
            f"At a {budget.share()} budget the kept set with the lowest far influence is "
            f"{LABELS.get(winner, winner)} ({best[column].min():.3g} nats/token; "
            f"mean over selections {np.mean(best[column]):.3g})."
        )
    return report.write(out / "report.html")
