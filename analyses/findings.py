"""Findings: the published and calibrated InfoKV, the learned and the distilled policy against the best baseline.

Reads the per-item ``results.csv`` of `forward-influence eval` runs. For each task, budget and
compression interval it takes the task's main metric (fidelity: NLL increase, lower is better;
needle: exact match; reasoning: agreement with the full-cache completion before the first
divergence, higher is better; long-decode: teacher-forced KL(full || compressed), lower is better),
finds the best baseline by its mean (any of `BASELINES` that was run: the attention policies,
StreamingLLM, Knorm), and reports each of `OURS` with its mean and 95% interval across items
(`forward_influence.stats.mean_ci`) and its paired difference from that baseline (same items; the
Student-t interval of the mean difference, `student_t_ci`). Fidelity is also compared on the mean
KL(full || compressed) (`BESIDE`), the quantity the set optimum minimises and the distilled policy is
fitted towards. Long decoding is also compared bucket by bucket of generated positions
(``kl_0_511``, ``kl_512_1023``, ...: `BY_POSITION`), so a reader sees from which generated length on
the policies separate. Each metric has its own best baseline. The table is written as
``findings.csv`` and printed as Markdown.

    python -m analyses.findings data/results/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from forward_influence.outputs import write_table
from forward_influence.stats import mean_ci, student_t_ci

MAIN_METRIC = {
    "fidelity": ("nll_increase", "lower"),
    "needle": ("correct", "higher"),
    "reasoning": ("prefix_agreement", "higher"),
    "long-decode": ("kl", "lower"),
}
BASELINES = (
    "snapkv",
    "h2o",
    "tova",
    "pyramidkv",
    "rkv",
    "expected-attention",
    "rpc",
    "streaming",
    "knorm",
    "kvzip",
    "keydiff",
    "criticalkv",
)
OURS = ("infokv", "infokv-calibrated", "learned", "distilled")
BESIDE = {"fidelity": ("kl",)}  # compared after the main metric, in the same direction
BY_POSITION = {"long-decode": re.compile(r"kl_(\d+)_\d+")}  # the main metric per bucket of generated positions


def compared_metrics(task: str, group: pd.DataFrame) -> list[str]:
    """The task's main metric, the metrics `BESIDE` it, then its per-position metrics (`BY_POSITION`), each
    only where `group` holds it, in that order."""
    pattern = BY_POSITION.get(task)
    beside = [c for c in BESIDE.get(task, ()) if c in group and group[c].notna().any()]
    buckets = [] if pattern is None else [c for c in group if pattern.fullmatch(c) and group[c].notna().any()]
    return [MAIN_METRIC[task][0], *beside, *sorted(buckets, key=lambda c: int(pattern.fullmatch(c)[1]))]


def against_best_baseline(group: pd.DataFrame, metric: str, better: str) -> list[dict]:
    """Each of `OURS` in `group` (one task, budget and buffer) against the best baseline on `metric`."""
    by_policy = {p: g.set_index("item")[metric] for p, g in group.groupby("policy")}
    baselines = {p: v.mean() for p, v in by_policy.items() if p in BASELINES}
    if not baselines:
        return []
    best = (min if better == "lower" else max)(baselines, key=baselines.get)
    rows = []
    for policy in (p for p in OURS if p in by_policy):
        ours, theirs = by_policy[policy], by_policy[best]
        mean, low, high = mean_ci(ours)
        _, best_low, best_high = mean_ci(theirs)
        difference = student_t_ci((ours - theirs.reindex(ours.index)).to_numpy())
        rows.append(
            dict(
                metric=metric,
                better=better,
                policy=policy,
                n_items=len(ours),
                policy_mean=mean,
                policy_ci_low=low,
                policy_ci_high=high,
                baseline=best,
                baseline_mean=baselines[best],
                baseline_ci_low=best_low,
                baseline_ci_high=best_high,
                difference_mean=difference[0],
                difference_ci_low=difference[1],
                difference_ci_high=difference[2],
            )
        )
    return rows


def findings(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, budget, buffer, compared metric, policy of `OURS`); see the module docstring."""
    rows = []
    results = results.assign(buffer=results["buffer"] if "buffer" in results else pd.NA)
    for (task, budget, buffer), group in results.groupby(["task", "budget", "buffer"], sort=False, dropna=False):
        if task not in MAIN_METRIC:
            continue
        for metric in compared_metrics(task, group):
            rows += [
                dict(task=task, budget=budget, buffer=buffer, **row)
                for row in against_best_baseline(group, metric, MAIN_METRIC[task][1])
            ]
    return pd.DataFrame(rows).dropna(axis="columns", how="all")


def markdown(table: pd.DataFrame) -> str:
    """The findings as a Markdown table (difference = policy - baseline; its sign says who wins)."""

    def ci(row, prefix):
        return f"{row[f'{prefix}_mean']:.3f} [{row[f'{prefix}_ci_low']:.3f}, {row[f'{prefix}_ci_high']:.3f}]"

    lines = [
        "| task (metric, better) | budget | policy | mean [95% CI] | best baseline | policy - baseline (paired) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for _, row in table.iterrows():
        lines.append(
            f"| {row.task} ({row.metric}, {row.better}) | {row.budget} | {row.policy} | {ci(row, 'policy')} | "
            f"{row.baseline} {ci(row, 'baseline')} | {ci(row, 'difference')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder holding <task>/results.csv or results.csv files")
    args = parser.parse_args(argv)
    files = sorted(args.folder.glob("**/results.csv"))
    if not files:
        raise SystemExit(f"error: no results.csv under {args.folder}")
    table = findings(pd.concat([pd.read_csv(f, dtype={"budget": str}) for f in files], ignore_index=True))
    if table.empty:
        raise SystemExit(f"error: no rows of {', '.join(OURS)} and a baseline in {args.folder}")
    write_table(table, args.folder / "findings.csv")
    print(markdown(table))
    print(args.folder / "findings.csv")


if __name__ == "__main__":
    main()
