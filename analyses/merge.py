"""Merge evaluation sweeps: new policies measured later, beside a committed sweep of the same items.

A sweep (`analyses.evaluate`) caches per item and computes only what is missing, but only in the folder
that holds its cache; a committed results folder holds tables, not caches. To add a policy to a
committed comparison, sweep it alone over the same task, items and budgets, then merge the two
``results.csv`` files: the summary (`analyses.evaluate.summarize`) and the figures are rebuilt from the
merged per-item rows, so every policy's numbers come from the same items.

    python -m analyses.merge data/results/<model>/fidelity runs/eval/<model>/fidelity --out data/results/<model>/fidelity

A (task, item, policy, budget) row in two sweeps is an error: each number comes from one run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from forward_influence.errors import InputError
from forward_influence.outputs import write_table
from forward_influence.sources import DEFAULT_MODEL

from .evaluate import report_task
from .tasks import registry

KEYS = ["task", "item", "policy", "budget"]


def merge(folders: Sequence[Path], out: Path, model: str = DEFAULT_MODEL, seed: int = 0) -> Path:
    """Merge the ``results.csv`` of `folders` into `out` (results, summary and a figure per task);
    returns the path of ``summary.csv``. `model` names the model in the figures' titles."""
    frames = []
    for folder in folders:
        path = Path(folder) / "results.csv"
        if not path.is_file():
            raise InputError(f"{path}: no results.csv (a sweep's output folder holds one)")
        frames.append(pd.read_csv(path))
    results = pd.concat(frames, ignore_index=True)
    twice = results[results.duplicated(subset=KEYS, keep=False)]
    if len(twice):
        row = twice.iloc[0]
        raise InputError(
            f"{row.task} item {row['item']!r}, policy {row.policy!r} at budget {row.budget} is in more than one "
            "sweep; merge sweeps of different policies or budgets"
        )
    known = registry()
    summaries = []
    for name, rows in results.groupby("task", sort=False):
        if name not in known:
            raise InputError(f"unknown task {name!r} in the results; choose from {', '.join(known)}")
        summaries.append(report_task(rows.dropna(axis="columns", how="all"), known[name], model, out, seed))
    write_table(results, out / "results.csv")
    return write_table(pd.concat(summaries, ignore_index=True), out / "summary.csv")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="sweep output folders (each with results.csv)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged tables and figures")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model's name, for the figures' titles")
    args = parser.parse_args(argv)
    print(merge(args.folders, args.out, args.model))


if __name__ == "__main__":
    main()
