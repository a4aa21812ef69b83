"""Policy sweeps over evaluation tasks: resumable, with per-item results, summaries and figures.

`evaluate` runs every (policy, budget) on every item of a task and caches each item's rows under
``<out>/cache/<model>/<task>/`` (`analyses.cache`), so an interrupted sweep resumes where it stopped
and a wider sweep computes only what is missing (a policy's rows are reused only for the same
settings). It writes ``results.csv`` (one row per task, item, policy and budget), ``summary.csv``
(mean and 95% interval across items per task, policy and budget; `forward_influence.stats`) and a
figure per task (each metric against the budget, one line per policy, or the task's own `plot`).
Policies are named as on the command line (``NAME`` or ``NAME:field=value:...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import seaborn as sns
import torch
from matplotlib import pyplot as plt
from tqdm.auto import tqdm

from forward_influence.errors import InputError
from forward_influence.models import LoadedModel
from forward_influence.outputs import write_table
from forward_influence.stats import group_ci
from forward_influence.tracer import Tracer
from kv_compression.budget import Budget
from kv_compression.names import parse

from . import cache
from .documents import cache_folder, shard_of
from .plotting import distinct_palette, save_figure, theme
from .tasks import Task, check_budgets, registry

SIZES = ("prompt_tokens", "generated_tokens")  # tokens per item, for a reader of the summary


def run_task(
    task: Task,
    loaded: LoadedModel,
    policies: Sequence[str],
    budgets: Sequence[str],
    n_items: int,
    out: Path,
    seed: int = 0,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Per-item rows of one task, from the cache where present (see the module docstring); with a
    `shard` ``(i, n)`` only the items whose index is i modulo n."""
    tracer = Tracer(loaded)
    folder = cache_folder(out, loaded.name) / task.name
    built = {p: parse(p, loaded.name) for p in policies}
    settings = {p: repr(policy) for p, policy in built.items()}
    frames = []
    items = shard_of(task.items(loaded.tokenizer, n_items), shard)
    check_budgets(task, items, budgets, loaded.name)
    for item in tqdm(items, desc=task.name, unit="item", disable=not progress):
        path = folder / cache.file_name(item.id)
        key = dict(task=task.cache_key(), item=item.id, tokens=item.token_ids)
        stored = cache.read(path, key, columns=("policy", "budget", "settings"))
        done = (
            {}
            if stored is None
            else {
                (r["policy"], r["budget"]): r
                for r in stored.to_dict("records")
                if r["settings"] == settings.get(r["policy"])
            }
        )
        missing = [p for p in policies if any((p, b) not in done for b in budgets)]
        if missing:
            torch.manual_seed(seed)
            fresh = task.run(tracer, item, {p: built[p] for p in missing}, budgets)
            done.update({(row["policy"], row["budget"]): dict(row, settings=settings[row["policy"]]) for row in fresh})
            cache.write(path, key, pd.DataFrame(list(done.values())))
        frames.append(pd.DataFrame([done[(p, b)] for p in policies for b in budgets]).drop(columns="settings"))
    results = pd.concat(frames, ignore_index=True)
    results.insert(0, "task", task.name)
    return results


def summarize(results: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Mean and 95% interval across items per (task, policy, budget, and buffer when the rows have
    one), with the item sizes (`SIZES`, where a task records them) and the reference columns (any
    numeric column named ``*_full``) averaged."""
    keys = ["task", "policy", "budget", *(["buffer"] if "buffer" in results else [])]
    averaged = [c for c in SIZES if c in results] + [c for c in results.columns if c.endswith("_full")]
    table = group_ci(results, keys, metrics).rename(columns={"n": "n_items"})
    means = results.groupby(keys, sort=False)[averaged].mean().reset_index()
    return table.merge(means, on=keys)[[*keys, "n_items", *averaged, *table.columns[len(keys) + 1 :]]]


def plot_task(results: pd.DataFrame, task: Task, title: str, path: Path, seed: int = 0) -> None:
    """Each metric against the budget, one line per policy, 95% bootstrap bands across items."""
    theme()
    metrics = list(task.metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    numeric = pd.to_numeric(results.budget, errors="coerce")
    data = results.assign(budget_value=numeric if numeric.notna().all() else results.budget.astype(str))
    palette = distinct_palette(results.policy)
    for ax, metric in zip(axes[0], metrics):
        sns.lineplot(
            data=data,
            x="budget_value",
            y=metric,
            hue="policy",
            hue_order=list(palette),
            palette=palette,
            marker="o",
            errorbar=("ci", 95),
            seed=seed,
            ax=ax,
            legend=ax is axes[0][-1],
        )
        ratios = numeric.notna().all() and (numeric <= 1).all()
        ax.set_xlabel("budget (kept share of the prompt)" if ratios else "budget")
        ax.set_ylabel(task.labels.get(metric, metric))
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), title="policy")  # keep the curves clear
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def report_task(results: pd.DataFrame, task: Task, model: str, out: Path, seed: int = 0) -> pd.DataFrame:
    """The summary of one task's per-item `results` (`summarize`), with its figure written to `out`
    (the task's own `plot`, else `plot_task`)."""
    title = f"{model}: {task.name}, {results['item'].nunique()} items; mean and 95% CI across items"
    if task.plot(results, title, out / task.name) is None:
        plot_task(results, task, title, out / task.name, seed)
    return summarize(results, task.metrics)


def evaluate(
    loaded: LoadedModel,
    tasks: Sequence[str | Task],
    policies: Sequence[str],
    budgets: Sequence[str],
    n_items: int,
    out: Path,
    seed: int = 0,
    buffer: int | None = None,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Run the sweep over tasks (registered names or task objects); returns the path of ``summary.csv``.
    `buffer` sets the compression interval of the tasks that decode (those with a ``buffer`` field).
    A `shard` ``(i, n)`` computes only every n-th item from the i-th into the per-item cache and writes no
    table (it returns the cache folder): n array jobs fill the cache, and a run without a shard then
    merges them into one summary, computing nothing again.
    An unknown task or policy or a bad budget is an `InputError` before any work."""
    known = registry()
    unknown = [t for t in tasks if isinstance(t, str) and t not in known]
    if unknown or not tasks:
        raise InputError(f"unknown task {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
    for policy in policies:
        parse(policy, loaded.name, quiet=True)
    for budget in budgets:
        Budget.parse(budget)
    frames, summaries = [], []
    for task in tasks:
        task = known[task] if isinstance(task, str) else task
        if buffer is not None:
            task = task.with_buffer(buffer)
        results = run_task(task, loaded, policies, budgets, n_items, out, seed, shard=shard)
        if shard is not None:
            continue
        frames.append(results)
        summaries.append(report_task(results, task, loaded.name, out, seed))
    if shard is not None:
        return cache_folder(out, loaded.name)
    write_table(pd.concat(frames, ignore_index=True), out / "results.csv")
    return write_table(pd.concat(summaries, ignore_index=True), out / "summary.csv")
