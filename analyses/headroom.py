"""Headroom: how far each policy is from the best a per-token score could do, and how much tokens interact.

The oracle (`kv_compression.policies.Oracle`) keeps the tokens whose measured Forward Influence at
the compression time is largest: each prefix token of a fidelity document evicted alone at t = 1023,
mean KL over the next 64 positions (`analyses.learned.influence_scan`, cached per document, so the
scans behind the learned policy's evaluation serve here too). On the same documents and budgets as
``eval --task fidelity`` (`analyses.tasks.fidelity`):

- ``headroom.csv``: per policy and budget, its place between random (0) and the oracle (1) on the
  fidelity NLL increase, ``(random - policy) / (random - oracle)`` of the means over documents, with a
  95% percentile-bootstrap interval over documents, beside the oracle's own NLL increase;
- ``interaction.csv``: per budget, the KL of evicting the oracle's whole evicted set (mean over the 64
  positions after t) against the sum of its tokens' single-token KLs, and the ratio of their means
  over documents: a ratio of 1 would make per-token scores additive, so the oracle a bound for sets
  too; the measured ratio says how far they are from it;
- ``headroom.png``: the places with their intervals, one row per policy, a colour per budget.

The oracle's rows are cached per document under ``<out>/cache/<model>/headroom/``: a run over more
documents measures only the new ones.

    python -m analyses.headroom data/results/smollm2-135m-instruct/fidelity/results.csv --docs 16

(``--rows FILE`` rebuilds the tables from the `oracle.csv` of an earlier run, measuring nothing.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib import pyplot as plt

from forward_influence.eviction import EvictionSpec
from forward_influence.influence import clean_run, evict
from forward_influence.models import LoadedModel, load_model
from forward_influence.outputs import write_table
from forward_influence.sources import DEFAULT_MODEL
from forward_influence.stats import group_ci, paired_interval
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from kv_compression.budget import Budget
from kv_compression.kept import kept_indices
from kv_compression.offline import observation
from kv_compression.policies import Oracle

from . import cache
from .documents import cache_folder, per_document
from .learned import evaluation_documents, evaluation_scans, influence_scan
from .plotting import save_figure, theme
from .protocol import INFLUENCE_DISTANCE, PREFIX
from .tasks.fidelity import Fidelity, fidelity_rows

FLOOR, CEILING = "random", "oracle"
PLACE_LINEAR_WITHIN = 2  # the figure's place axis is linear in [-2, 2], logarithmic beyond: one far-off
# policy (Knorm's interval reaches -300 on Gemma, where the oracle is close to random) would flatten the rest


def oracle_rows(loaded: LoadedModel, docs: int, budgets: list[str], out: Path, progress: bool = True) -> pd.DataFrame:
    """Fidelity rows of the oracle and the interaction measurement, per document and budget; cached per
    document under ``<out>/cache/<model>/headroom/``, so a run over more documents resumes."""
    tracer, task = Tracer(loaded), Fidelity()
    scans = evaluation_scans(out, loaded.name)
    oracle = Oracle(distance=INFLUENCE_DISTANCE)

    def document_rows(document: Trace) -> pd.DataFrame:
        scan = influence_scan(tracer, document.token_ids, scans / cache.file_name(document.id))
        single = scan[[f"kl_{d}" for d in range(1, INFLUENCE_DISTANCE + 1)]].mean(axis=1).to_numpy()
        influence = torch.tensor(single, dtype=torch.float32, device=tracer.device)[None]
        fidelity = fidelity_rows(
            tracer,
            document.id.removeprefix("essay:"),  # the fidelity task's item id
            document.token_ids,
            {CEILING: oracle},
            budgets,
            task.prefix,
            task.continuation,
            task.far_from,
            influence=influence,
        )
        obs = observation(tracer, document.token_ids[:PREFIX], [oracle], influence=influence)
        clean = clean_run(tracer, document.token_ids[: PREFIX + INFLUENCE_DISTANCE], hidden=False)
        rows = []
        for row, budget in zip(fidelity, budgets):
            kept = next(k for k in kept_indices(oracle, obs, Budget.parse(budget)) if k is not None)
            evicted = sorted(set(range(PREFIX)) - set(kept[0, 0].tolist()))  # one set: the score is per token
            together = evict(
                tracer, clean, [EvictionSpec(tuple(evicted), PREFIX - 1)], INFLUENCE_DISTANCE, hidden=False
            ).kl[0]
            rows.append(
                dict(
                    row,
                    set_kl=float(np.nanmean(together)),
                    summed_single_kl=float(single[evicted].sum()),
                    evicted=len(evicted),
                )
            )
        return pd.DataFrame(rows)

    return per_document(
        evaluation_documents(loaded.tokenizer, docs),
        document_rows,
        cache_folder(out, loaded.name) / "headroom",
        dict(
            budgets=list(budgets), distance=INFLUENCE_DISTANCE, fidelity=[task.prefix, task.continuation, task.far_from]
        ),
        "headroom",
        progress,
    )


def headroom(
    results: pd.DataFrame,
    ceiling_rows: pd.DataFrame,
    ceiling: str = CEILING,
    metric: str = "nll_increase",
    beside: tuple[str, ...] = (),
    seed: int = 0,
) -> pd.DataFrame:
    """Per policy and budget: its place ``(random - policy) / (random - ceiling)`` of the mean `metric`
    over documents, with a percentile-bootstrap interval over the documents all three cover, beside the
    means of `metric` and of the `beside` metrics."""
    table = pd.concat([results[results.task == "fidelity"], ceiling_rows.assign(task="fidelity")], ignore_index=True)
    table = table.assign(budget=table.budget.astype(str))
    rows = []
    for budget, group in table.groupby("budget", sort=False):
        wide = group.pivot_table(index="item", columns="policy", values=metric).dropna()
        if FLOOR not in wide or ceiling not in wide:
            continue
        means = {
            name: group.pivot_table(index="item", columns="policy", values=name).loc[wide.index].mean()
            for name in beside
        }

        def place(policy: np.ndarray, floor: np.ndarray, top: np.ndarray) -> float:
            return float((floor.mean() - policy.mean()) / (floor.mean() - top.mean()))

        for policy in wide.columns:
            data = (wide[policy].to_numpy(), wide[FLOOR].to_numpy(), wide[ceiling].to_numpy())
            low, high = paired_interval(data, place, seed=seed)
            rows.append(
                dict(
                    budget=budget,
                    policy=policy,
                    n_documents=len(wide),
                    **{metric: wide[policy].mean()},
                    **{name: means[name][policy] for name in beside},
                    place=place(*data),
                    place_ci_low=low,
                    place_ci_high=high,
                )
            )
    return pd.DataFrame(rows).sort_values(["budget", "place"], ascending=[True, False])


def interaction(oracle: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per budget: the set's KL and the summed single-token KLs (mean and interval over documents), and
    ``ratio``, the first mean over the second with a paired percentile-bootstrap interval. A ratio of
    the means, not a mean of ratios: the least influential tokens' single KLs can sum to zero in a
    document, which has no ratio of its own."""
    table = group_ci(oracle, ["budget"], ["set_kl", "summed_single_kl"]).rename(columns={"n": "n_documents"})

    def ratio(together: np.ndarray, summed: np.ndarray) -> float:
        return float(together.mean() / summed.mean())

    ratios = []
    for _, group in oracle.groupby("budget", sort=False):
        data = (group.set_kl.to_numpy(), group.summed_single_kl.to_numpy())
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample whose sums are all zero has no ratio
            low, high = paired_interval(data, ratio, seed=seed)
        ratios.append(dict(ratio=ratio(*data), ratio_ci_low=low, ratio_ci_high=high))
    return pd.concat([table, pd.DataFrame(ratios)], axis="columns")


def plot_headroom(
    table: pd.DataFrame, title: str, path: Path, ceiling: str = "the oracle", metric: str = "the fidelity NLL increase"
) -> list[Path]:
    """The `headroom` table as a dot plot: each policy's place with its 95% interval, one row per policy
    (best first by the mean over budgets), a colour per budget; random and the ceiling mark 0 and 1. The
    axis is linear within `PLACE_LINEAR_WITHIN` of zero and logarithmic beyond."""
    theme()
    order = table.groupby("policy").place.mean().sort_values(ascending=False).index
    budgets = sorted(table.budget.unique(), key=float)
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.42 * len(order)), layout="constrained")
    offsets = (np.arange(len(budgets)) - (len(budgets) - 1) / 2) * 0.8 / max(len(budgets), 1)
    for budget, offset, colour in zip(budgets, offsets, sns.color_palette(n_colors=len(budgets))):
        rows = table[table.budget == budget].set_index("policy").reindex(order)
        errors = [rows.place - rows.place_ci_low, rows.place_ci_high - rows.place]
        y = np.arange(len(order)) + offset
        ax.errorbar(rows.place, y, xerr=errors, fmt="o", capsize=2, color=colour, label=f"budget {budget}")
    for anchor in (0, 1):
        ax.axvline(anchor, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("symlog", linthresh=PLACE_LINEAR_WITHIN)
    ax.set_yticks(np.arange(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel(f"place between random (0) and {ceiling} (1), on {metric}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def add_fidelity_options(parser: argparse.ArgumentParser, ceiling: str) -> None:
    """The options of an entry point that places a fidelity sweep's policies below a `ceiling`."""
    parser.add_argument("results", type=Path, help="the results.csv of `forward-influence eval --task fidelity`")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--docs", type=int, default=16, help=f"fidelity documents with {ceiling} (default 16)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: next to the results)")


def fidelity_results(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, pd.DataFrame]:
    """The output folder and the sweep's rows, once the options of `add_fidelity_options` are checked."""
    if not args.results.is_file():
        parser.error(f"results: no such file: {args.results}")
    if args.docs < 2:
        parser.error(f"--docs: the intervals over documents need at least 2, not {args.docs}")
    return args.out or args.results.parent, pd.read_csv(args.results, dtype={"budget": str})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fidelity_options(parser, "the oracle")
    parser.add_argument(
        "--rows",
        type=Path,
        default=None,
        help="the oracle.csv of an earlier run: rebuild its tables, measuring nothing",
    )
    args = parser.parse_args(argv)
    out, results = fidelity_results(parser, args)
    if args.rows is not None:
        if not args.rows.is_file():
            parser.error(f"--rows: no such file: {args.rows}")
        oracle = pd.read_csv(args.rows, dtype={"item": str, "budget": str})
    else:
        oracle = oracle_rows(load_model(args.model), args.docs, sorted(results.budget.unique()), out)
    table = headroom(results, oracle)
    write_table(oracle, out / "oracle.csv")
    write_table(table, out / "headroom.csv")
    write_table(interaction(oracle), out / "interaction.csv")
    plot_headroom(table, f"{args.model}: headroom on {oracle.item.nunique()} fidelity documents", out / "headroom")
    print(table.to_string(index=False, float_format="{:.3f}".format))
    print(out / "headroom.csv")


if __name__ == "__main__":
    main()
