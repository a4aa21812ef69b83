"""Set-level Forward Influence: how far every policy is from the best eviction set it could have kept.

On the fidelity task's documents and budgets (`analyses.tasks.fidelity`: a 1024-token prefix
compressed at t = 1023, the next 256 tokens teacher-forced), the `optimal` policy searches, per
document and budget, the kept set of every full-attention layer and KV head that minimises the mean
KL over the continuation (`forward_influence.set_optimum`, from the uniform, H2O and Expected
Attention starts). Its row is the fidelity task's exact measurement of that hard set, as for every
other policy; the search's own numbers (relaxed loss, each start's exact KL, CPU seconds) sit beside it.

- ``optimal.csv``: the optimal rows per document and budget, with ``relaxed_kl``, ``start``
  (the best start), ``kl_<start>`` (each start's exact KL after its search), ``start_kl_<start>``
  (the exact KL of the start's own hard set, before the search) and ``cpu_seconds``;
- ``headroom.csv``: per policy and budget, its place between random (0) and `optimal` (1) on the mean
  KL (the quantity the search minimises), with a 95% percentile-bootstrap interval over documents,
  and the NLL increase beside it; ``headroom_nll.csv``, the same places on the NLL increase;
  ``ranking.csv``, how far the two rankings agree (Spearman per budget, the policies that move most);
- ``headroom.png``: the places with their intervals;
- ``paired.csv``: per budget and policy, the mean of ``optimal - policy`` on the KL over documents
  with its 95% Student-t interval;
- ``sets.csv`` + ``sets.png``: what the optimal sets keep beside H2O's, InfoKV's and, for a model with
  its weights file, the distilled policy's (`describe_sets`: overlap, position, and the kept share by
  decile of entropy and of attention);
- ``interaction.csv``: per budget, the KL of `optimal`'s whole evicted set against the sum of its
  entries' single influences (each token evicted from one layer and KV head alone), and the ratio of
  their means (`analyses.headroom.interaction`). The single influences are the Fisher estimates of
  `forward_influence.gradient` over the same 256 positions (``summed_single_kl``): measuring each of
  the ~80 000 entries a per-head set evicts by a replay is out of reach, so this ratio is an estimate,
  where the oracle's is exact.

The optimal rows are cached per document under ``<out>/cache/<model>/set-level/``, and the kept sets
of each document and budget under its ``sets/`` (`sets_file`); ``--shard I/N``
fills the cache with every N-th document from the I-th and writes no table.

    python -m analyses.set_level data/results/smollm2-135m-instruct/fidelity/results.csv --docs 16 \\
        --out data/results/smollm2-135m-instruct/set-level
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from safetensors.torch import load_file, save_file
from scipy import stats

from forward_influence.gradient import fisher_influence
from forward_influence.influence import clean_run
from forward_influence.models import LoadedModel, load_model
from forward_influence.outputs import atomic_path, write_table
from forward_influence.signals import token_signals
from forward_influence.stats import student_t_ci
from forward_influence.tracer import Tracer
from kv_compression import tuned
from kv_compression.budget import Budget
from kv_compression.kept import kept_masks
from kv_compression.offline import observation
from kv_compression.policies import H2O, InfoKV, Optimal, Policy

from . import cache
from .documents import add_shard_option, cache_folder, per_document
from .headroom import add_fidelity_options, fidelity_results, headroom, interaction, plot_headroom
from .learned import evaluation_documents
from .plotting import save_figure, theme
from .tasks.fidelity import Fidelity, fidelity_rows

CEILING = Optimal.name


def sets_file(folder: Path, item: str, budget: str) -> Path:
    """Where `search_rows` keeps one document's optimal sets at one budget."""
    return folder / cache.file_name(f"{item}@{budget}").replace(".parquet", ".safetensors")


def search_rows(
    tracer: Tracer, item: str, token_ids: list[int], budgets: list[str], task: Fidelity, sets: Path | None = None
) -> pd.DataFrame:
    """The fidelity rows of `optimal` on one document, searched for each budget, with the search's
    diagnostics and the interaction measurement (module docstring). With `sets`, each budget's kept
    sets go there too (`sets_file`: ``kept``, uint8 ``[searched layers, kv_heads, tokens]``, and
    ``layers``), so what the optimum keeps can be described without searching again."""
    ids = list(token_ids[: task.prefix + task.continuation])
    clean = clean_run(tracer, ids, hidden=False)
    generator = torch.Generator(device=tracer.device).manual_seed(0)
    single, _ = fisher_influence(tracer, clean, task.prefix - 1, 1, len(ids) - task.prefix, generator=generator)
    rows = []
    for budget in budgets:
        policy = Optimal(budget=float(budget), distance=task.continuation)
        started = time.process_time()
        obs = observation(tracer, ids[: task.prefix], [policy], future=ids[task.prefix :])
        (row,) = fidelity_rows(
            tracer, item, ids, {CEILING: policy}, [budget], task.prefix, task.continuation, task.far_from, obs=obs
        )
        optimum = obs.set_optimum[policy.search()]
        kept = kept_masks(policy, obs, Budget.parse(budget))
        summed = sum(float(single[layer][~mask[0]].sum()) for layer, mask in enumerate(kept) if mask is not None)
        if sets is not None:
            searched = torch.stack([kept[layer][0] for layer in optimum.layers]).to(torch.uint8).cpu()
            with atomic_path(sets_file(sets, item, budget)) as path:
                save_file({"kept": searched, "layers": torch.tensor(optimum.layers)}, str(path))
        rows.append(
            dict(
                row,
                set_kl=row["kl"],
                summed_single_kl=summed,
                relaxed_kl=optimum.relaxed_kl[optimum.best],
                start=optimum.starts[optimum.best],
                **{f"kl_{start}": kl for start, kl in zip(optimum.starts, optimum.exact_kl)},
                **{f"start_kl_{start}": kl for start, kl in zip(optimum.starts, optimum.start_kl)},
                cpu_seconds=time.process_time() - started,
            )
        )
    return pd.DataFrame(rows)


def optimal_rows(
    loaded: LoadedModel,
    docs: int,
    budgets: list[str],
    out: Path,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """`search_rows` on each of the `docs` fidelity documents; cached per document."""
    tracer, task = Tracer(loaded), Fidelity()
    folder = cache_folder(out, loaded.name) / "set-level"
    return per_document(
        evaluation_documents(loaded.tokenizer, docs),
        lambda document: search_rows(
            tracer, document.id.removeprefix("essay:"), document.token_ids, budgets, task, folder / "sets"
        ),
        folder,
        dict(budgets=list(budgets), search=repr(Optimal().search()), fidelity=[task.prefix, task.continuation]),
        "set search",
        progress,
        shard,
    )


def ranking_agreement(on_kl: pd.DataFrame, on_nll: pd.DataFrame) -> pd.DataFrame:
    """Per budget, the Spearman correlation between the policies' places on the KL and on the NLL
    increase (`headroom` tables), with the policies whose rank differs most between the two."""
    rows = []
    for budget, kl in on_kl.groupby("budget"):
        places = (
            kl.set_index("policy")
            .place.to_frame("kl")
            .join(on_nll[on_nll.budget == budget].set_index("policy").place.rename("nll"))
        )
        ranks = places.rank(ascending=False)
        moved = (ranks.kl - ranks.nll).abs().sort_values(ascending=False)
        rows.append(
            dict(
                budget=budget,
                policies=len(places),
                spearman=stats.spearmanr(places.kl, places.nll).statistic,
                most_moved=", ".join(f"{p} ({ranks.kl[p]:.0f} -> {ranks.nll[p]:.0f})" for p in moved.index[:2]),
            )
        )
    return pd.DataFrame(rows)


def paired(results: pd.DataFrame, optimal: pd.DataFrame, metric: str = "kl") -> pd.DataFrame:
    """Per budget and policy: the mean over documents of ``optimal - policy`` on `metric`, with its 95%
    Student-t interval (below zero: the optimum is better beyond chance)."""
    table = pd.concat([results[results.task == "fidelity"], optimal.assign(task="fidelity")], ignore_index=True)
    rows = []
    for budget, group in table.assign(budget=table.budget.astype(str)).groupby("budget", sort=False):
        wide = group.pivot_table(index="item", columns="policy", values=metric).dropna()
        for policy in wide.columns.drop(CEILING, errors="ignore"):
            mean, low, high = student_t_ci(wide[CEILING] - wide[policy])
            rows.append(
                dict(budget=budget, policy=policy, n_documents=len(wide), difference=mean, ci_low=low, ci_high=high)
            )
    return pd.DataFrame(rows).sort_values(["budget", "difference"])


def compared(model: str) -> dict[str, Policy]:
    """The policies whose sets the optimum's are described beside: H2O, the published InfoKV, and the
    distilled policy where `model` has its weights file (`kv_compression.tuned.read`)."""
    policies = {"h2o": H2O(), "infokv": InfoKV()}
    if tuned.read(model, "distilled") is not None:
        policies["distilled"] = tuned.distilled(model)[0]
    return policies


DECILE_SIGNALS = ("entropy_next", "attention_snapkv")


def describe_sets(loaded: LoadedModel, docs: int, budgets: list[str], out: Path) -> pd.DataFrame:
    """What the optimal sets keep, beside the `compared` policies', on the documents whose sets `optimal_rows`
    kept: one row per document, budget and policy with ``jaccard`` (of the kept (layer, KV head, token)
    slots with the optimum's, over the searched layers), ``position`` (mean position of the kept slots,
    a share of the prefix) and ``<signal>_d<k>`` (the share of kept slots among the tokens of the k-th
    decile of the signal, k = 1..10, for the top-k entropy of the next token and the SnapKV attention
    a token receives from the prefix's last window)."""
    tracer, task, policies = Tracer(loaded), Fidelity(), compared(loaded.name)
    folder = cache_folder(out, loaded.name) / "set-level" / "sets"
    rows = []
    for document in evaluation_documents(loaded.tokenizer, docs):
        item = document.id.removeprefix("essay:")
        if not all(sets_file(folder, item, budget).is_file() for budget in budgets):
            continue
        ids = document.token_ids[: task.prefix]
        obs = observation(tracer, ids, list(policies.values()))
        signals = token_signals(tracer, ids)
        deciles = {
            name: np.minimum((stats.rankdata(signals.get(name)) - 1) * 10 // len(ids), 9).astype(int)
            for name in DECILE_SIGNALS
        }
        for budget in budgets:
            stored = load_file(str(sets_file(folder, item, budget)))
            layers = stored["layers"].tolist()
            kept = {CEILING: stored["kept"].bool()}
            for name, policy in policies.items():
                masks = kept_masks(policy, obs, Budget.parse(budget))
                kept[name] = torch.stack([masks[layer][0] for layer in layers]).cpu()
            for name, mask in kept.items():
                row = dict(document=document.id, budget=budget, policy=name)
                row["jaccard"] = float((mask & kept[CEILING]).sum() / (mask | kept[CEILING]).sum())
                row["position"] = float(mask.nonzero()[:, -1].float().mean() / len(ids))
                share = mask.float().mean(dim=(0, 1)).numpy()  # per token: kept share of its slots
                for signal, decile in deciles.items():
                    for k in range(10):  # ties can leave a decile empty: NaN, not a warning
                        members = share[decile == k]
                        row[f"{signal}_d{k + 1}"] = float(members.mean()) if members.size else np.nan
                rows.append(row)
    return pd.DataFrame(rows)


def plot_sets(described: pd.DataFrame, title: str, path: Path) -> list[Path]:
    """The kept share by decile of each signal (columns), per budget (rows), a line per policy."""
    theme()
    long = described.melt(
        id_vars=["document", "budget", "policy"],
        value_vars=[c for c in described.columns if c.startswith(DECILE_SIGNALS)],
    )
    long["signal"] = long.variable.str.rsplit("_d", n=1).str[0]
    long["decile"] = long.variable.str.rsplit("_d", n=1).str[1].astype(int)
    grid = sns.relplot(
        long,
        x="decile",
        y="value",
        hue="policy",
        row="budget",
        col="signal",
        kind="line",
        marker="o",
        errorbar=("ci", 95),
        height=2.6,
        aspect=1.4,
        facet_kws=dict(sharey="row"),
    )
    grid.set_titles("budget {row_name}: {col_name}")
    grid.set_axis_labels("decile of the signal (1 = lowest)", "kept share of its slots")
    grid.figure.suptitle(title, fontsize=10)
    grid.figure.subplots_adjust(top=0.9)
    return save_figure(grid.figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fidelity_options(parser, "the set search")
    add_shard_option(parser)
    args = parser.parse_args(argv)
    out, results = fidelity_results(parser, args)
    loaded, budgets = load_model(args.model), sorted(results.budget.unique())
    optimal = optimal_rows(loaded, args.docs, budgets, out, args.shard)
    if args.shard is not None:
        print(cache_folder(out, args.model) / "set-level")
        return
    write_table(optimal, out / "optimal.csv")
    table = headroom(results, optimal, CEILING, "kl", beside=("nll_increase",))
    write_table(table, out / "headroom.csv")
    on_nll = headroom(results, optimal, CEILING, "nll_increase", beside=("kl",))
    write_table(on_nll, out / "headroom_nll.csv")
    write_table(ranking_agreement(table, on_nll), out / "ranking.csv")
    write_table(interaction(optimal), out / "interaction.csv")
    write_table(paired(results, optimal), out / "paired.csv")
    described = describe_sets(loaded, args.docs, budgets, out)
    if len(described):
        write_table(described, out / "sets.csv")
        plot_sets(
            described, f"{args.model}: what each policy keeps, {described.document.nunique()} documents", out / "sets"
        )
    title = f"{args.model}: headroom on {optimal.item.nunique()} fidelity documents"
    plot_headroom(table, title, out / "headroom", ceiling="optimal", metric="the mean KL(full || compressed)")
    print(table.to_string(index=False, float_format="{:.3f}".format))
    print(out / "headroom.csv")


if __name__ == "__main__":
    main()
