"""Compare selections side by side: what each keeps at a budget, and what evicting the rest costs.

For each trace, every selection (SnapKV and H2O attention, entropy with both alignments, evolution,
InfoKV) keeps a budget of the prefix ``0..t`` (a ratio or a count; sinks and the last window first, then its
best-ranked tokens; `analyses.selections.kept_sets`), and the complement is evicted at t. Per
selection:

- ``kept``: tokens kept; ``content_share``: share of content words among the kept tokens that are
  words (`analyses.pos`); ``mean_position``: mean relative position ``p / t`` of the kept tokens;
- ``fi_near``, ``fi_far``: Forward Influence of evicting the complement, mean KL over distances
  1..8 and 33.. (nats / token);
- ``jaccard_<other>``: overlap of the kept set with each other selection's.

With several traces the table is the mean over traces with 95% t-intervals (``*_ci_low``,
``*_ci_high``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import pyplot as plt
from tqdm.auto import tqdm

from forward_influence.eviction import EvictionSpec
from forward_influence.influence import clean_run, evict
from forward_influence.measure import eviction_time
from forward_influence.outputs import write_table
from forward_influence.scan import fi_summary
from forward_influence.stats import group_ci
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from kv_compression.budget import Budget

from . import pos
from .plotting import overlap_heatmap, save_figure, theme
from .selections import LABELS, jaccard, kept_sets, scores

COMPARED = ("attention_snapkv", "attention_h2o", "entropy_next", "entropy_generated", "evolution", "infokv")
COLUMNS = ("kept", "content_share", "mean_position", "fi_near", "fi_far")


def document_frame(
    tracer: Tracer,
    trace: Trace,
    budget: Budget,
    evict_at: int | None = None,
    selections: Sequence[str] = COMPARED,
    model: str | None = None,
) -> pd.DataFrame:
    """One row per selection for one trace (columns in the module docstring, plus ``document``)."""
    t = eviction_time(trace, evict_at)
    ids = trace.token_ids
    ranking = scores(tracer, ids[: t + 1], selections, model=model)
    kept = kept_sets(ranking, budget, t)
    classes = np.array([pos.word_class(tag) for tag in pos.token_pos(tracer.tokenizer, ids[: t + 1])])
    specs = [EvictionSpec(tuple(sorted(set(range(t + 1)) - set(kept[name]))), t) for name in selections]
    divergence = evict(tracer, clean_run(tracer, ids, hidden=False), specs, len(ids) - t - 1, hidden=False)
    fi = fi_summary(divergence.kl)
    rows = []
    for index, name in enumerate(selections):
        positions = np.array(kept[name])
        words = classes[positions][classes[positions] != "other"]
        row = dict(
            document=trace.id,
            selection=name,
            kept=len(positions),
            content_share=float((words == "content").mean()) if len(words) else np.nan,
            mean_position=float((positions / t).mean()),
            fi_near=fi.fi_near[index],
            fi_far=fi.fi_far[index],
        )
        row.update({f"jaccard_{other}": jaccard(kept[name], kept[other]) for other in selections})
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% CI across documents per selection (the per-document table when there is one)."""
    if frame.document.nunique() < 2:
        return frame.drop(columns="document")
    values = [c for c in frame.columns if c not in ("document", "selection")]
    return group_ci(frame, ["selection"], values).rename(columns={"n": "n_documents"})


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The printed table: one column per quantity (means when aggregated), selections by label."""
    shown = table.rename(columns=lambda c: c.removesuffix("_mean"))
    overlaps = [c for c in shown.columns if c.startswith("jaccard_") and not c.endswith(("_ci_low", "_ci_high"))]
    keep = ["selection", *COLUMNS, *overlaps]
    shown = shown[keep].rename(columns=lambda c: c.replace("jaccard_attention_", "J_").replace("jaccard_", "J_"))
    return shown.assign(selection=shown.selection.map(lambda s: LABELS.get(s, s)))


def plot(table: pd.DataFrame, title: str, path: Path) -> list[Path]:
    """Forward Influence near/far of evicting each complement (CIs when aggregated) and the overlaps."""
    theme()
    fig, axes = plt.subplots(1, 2, figsize=(15, 5), layout="constrained", gridspec_kw=dict(width_ratios=[1, 1.2]))
    names = list(table.selection)
    y = np.arange(len(names))
    for offset, (target, color) in zip(
        (-0.2, 0.2), (("fi_near", "0.55"), ("fi_far", sns.color_palette("colorblind")[0]))
    ):
        mean = table[f"{target}_mean"] if f"{target}_mean" in table else table[target]
        err = None
        if f"{target}_ci_low" in table:
            err = [(mean - table[f"{target}_ci_low"]).fillna(0), (table[f"{target}_ci_high"] - mean).fillna(0)]
        axes[0].barh(y + offset, mean, height=0.4, xerr=err, capsize=3, color=color, label=target)
    axes[0].set_yticks(y, [LABELS.get(n, n) for n in names])
    axes[0].invert_yaxis()
    axes[0].set_xscale("log")
    axes[0].set_xlabel("KL of evicting everything not kept (nats / token)")
    axes[0].set_title("Forward Influence: near (d = 1-8) and far (d >= 33)", fontsize=10)
    axes[0].legend(fontsize=8)
    matrix = np.array(
        [
            [table.iloc[i].get(f"jaccard_{b}_mean", table.iloc[i].get(f"jaccard_{b}")) for b in names]
            for i in range(len(names))
        ],
        dtype=float,
    )
    labels = [LABELS.get(n, n) for n in names]
    overlap_heatmap(axes[1], matrix, labels, "Jaccard overlap of the kept sets")
    axes[1].set_title("overlap of what each selection keeps", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def compare(
    tracer: Tracer,
    traces: Sequence[Trace],
    budget: Budget,
    out: Path | None = None,
    evict_at: int | None = None,
    model: str | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, per-document rows); with `out`, writes ``compare.csv``, ``compare_per_document.csv`` and
    ``compare.png/.svg`` there."""
    for trace in traces:  # bad input fails before any work
        t = eviction_time(trace, evict_at)
        budget.check_count(t + 1, f"the prefix 0..{t} of trace {trace.id!r}")
    frame = pd.concat(
        [
            document_frame(tracer, trace, budget, evict_at, model=model)
            for trace in tqdm(traces, desc="compare", unit="trace", disable=not progress)
        ],
        ignore_index=True,
    )
    table = summarize(frame)
    if out is not None:
        write_table(frame, out / "compare_per_document.csv")
        write_table(table, out / "compare.csv")
        what = traces[0].id if len(traces) == 1 else f"{len(traces)} traces, mean and 95% CI"
        plot(table, f"{tracer.name}: selections keeping {budget.share()} of the prefix, {what}", out / "compare")
    return table, frame
