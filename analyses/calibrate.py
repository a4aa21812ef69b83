"""Calibration: InfoKV's open choices chosen by Forward Influence on the calibration essays.

The paper leaves InfoKV's top-k, entropy alignment, evolution measure, normalisation and combination
weight open. `calibrate` scores a grid of them on the calibration essays only (never the evaluation
ones): each setting compresses a 1024-token prefix at each budget, and its evicted set is measured by
far-distance Forward Influence, the mean KL at distances >= 33 of the next 256 tokens
(``kl_far``; the fidelity NLL increase is recorded beside it as a check). The setting with the
lowest mean ``kl_far`` over budgets and essays wins and is written, with every measurement behind
it, to ``data/calibration/<model>.json``, which `kv_compression.policies.make("infokv", model)`
reads by default.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import pandas as pd
from tqdm.auto import tqdm

from forward_influence.models import LoadedModel
from forward_influence.outputs import atomic_open
from forward_influence.tracer import Tracer
from kv_compression.policies import InfoKV
from kv_compression.policies.calibration import calibration_path

from .tasks.fidelity import fidelity_rows, long_essays

GRID = dict(
    top_k=(5, 10, 20),
    alignment=("next", "generated"),
    evolution=("hidden", "none"),
    normalisation=("zscore", "rank"),
    weight=(0.25, 0.5, 1.0),
)


def settings_grid(grid: dict[str, Sequence] = GRID) -> dict[str, InfoKV]:
    """Every combination of `grid` as named InfoKV policies (name: ``k=10,alignment=next,...``)."""
    keys = list(grid)
    out = {}
    for values in itertools.product(*(grid[k] for k in keys)):
        fields = dict(zip(keys, values))
        out[",".join(f"{k}={v}" for k, v in fields.items())] = InfoKV(**fields)
    return out


def calibrate(
    loaded: LoadedModel,
    budgets: Sequence[str] = ("0.1", "0.25", "0.5"),
    docs: int = 4,
    grid: dict[str, Sequence] = GRID,
    prefix: int = 1024,
    continuation: int = 256,
    token_ids: dict[str, list[int]] | None = None,
    out: Path | None = None,
) -> dict:
    """Measure the grid, choose the setting, write the calibration file; returns its content.

    `token_ids` (document name -> tokens) replaces the calibration essays, for tests.
    """
    tracer = Tracer(loaded)
    policies = settings_grid(grid)
    if token_ids is None:
        token_ids = long_essays(loaded.tokenizer, "calibration", prefix + continuation, docs)
    rows = []
    for name, ids in tqdm(token_ids.items(), desc="calibration essays"):
        rows += fidelity_rows(tracer, name, ids, policies, budgets, prefix, continuation)
    frame = pd.DataFrame(rows)
    ranking = frame.groupby("policy", sort=False)[["kl_far", "nll_increase"]].mean().sort_values("kl_far")
    chosen = policies[ranking.index[0]]
    result = dict(
        model=loaded.name,
        objective="mean kl_far (KL at distances >= 33 of the next 256 tokens) over budgets and essays",
        budgets=list(budgets),
        documents=list(token_ids),
        settings=asdict(chosen),
        ranking=[dict(setting=s, kl_far=r.kl_far, nll_increase=r.nll_increase) for s, r in ranking.iterrows()],
        measurements=frame.to_dict(orient="records"),
    )
    path = out or calibration_path(loaded.name)
    with atomic_open(path) as f:
        json.dump(result, f, indent=1)
    return result


def option_effects(result: dict) -> pd.DataFrame:
    """How each open choice moves the objective: for every option and value, the mean ``kl_far`` and
    ``nll_increase`` over all measured settings that use that value (the grid's marginal means)."""
    ranking = pd.DataFrame(result["ranking"])
    options = ranking.setting.str.split(",").apply(lambda parts: dict(p.split("=", 1) for p in parts))
    values = pd.DataFrame(options.tolist())
    for column in values:  # numeric options sort as numbers
        numeric = pd.to_numeric(values[column], errors="coerce")
        if numeric.notna().all():
            values[column] = numeric
    grid = pd.concat([ranking, values], axis=1)
    rows = []
    for option in options.iloc[0]:
        means = grid.groupby(option, sort=True)[["kl_far", "nll_increase"]].mean().reset_index(names="value")
        rows.append(means.assign(option=option))
    return pd.concat(rows, ignore_index=True)[["option", "value", "kl_far", "nll_increase"]]


def main(argv: list[str] | None = None) -> None:
    """``python -m analyses.calibrate [MODEL]``: the chosen settings and each option's marginal effect."""
    import argparse

    from forward_influence.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description="show a calibration file: the chosen settings and option effects")
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    path = calibration_path(args.model)
    if not path.is_file():
        raise SystemExit(f"error: no calibration file {path}; run `forward-influence calibrate --model {args.model}`")
    result = json.loads(path.read_text())
    print(f"{path.name}: {result['settings']} on {len(result['documents'])} essays, budgets {result['budgets']}")
    print(option_effects(result).to_string(index=False, float_format="{:.4f}".format))


if __name__ == "__main__":
    main()
