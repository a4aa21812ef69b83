"""Calibration: InfoKV's open choices chosen by Forward Influence on the calibration essays.

The published InfoKV fixes k = 256, alpha = 0.9, tau = 1, the generated alignment, the distance to
the final layer and the softmax mix (`kv_compression.policies.InfoKV`); what the paper does not pin
down (A's normalisation) and what it chose by its own measurements are fields. `calibrate` scores a
grid around the published point on the calibration essays only (never the evaluation ones): the full
grid of k in {10, 64, 256}, alpha in {0.8, 0.9, 0.95} and tau in {0.5, 1, 2} with the published
choices; for each alpha, the other combinations (zscore, rank), the next-token alignment and the other
evolution measures (across layers, none) at the published k and tau, one option changed at a time;
and alpha = 1 (pure attention, the same for every other choice): 43 settings. Each
setting compresses a 1024-token prefix at each budget, and its evicted set is measured by
far-distance Forward Influence, the mean KL at distances >= 33 of the next 256 tokens (``kl_far``;
the fidelity NLL increase is recorded beside it as a check). The setting with the lowest mean
``kl_far`` over budgets and essays wins and is written, with every measurement behind it, to the
calibration file that ``infokv-calibrated`` reads (`kv_compression.tuned`).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from forward_influence.models import LoadedModel
from forward_influence.outputs import atomic_open
from forward_influence.sources import DEFAULT_MODEL
from forward_influence.tracer import Tracer
from kv_compression.budget import Budget
from kv_compression.policies import InfoKV
from kv_compression.tuned import file_name, read, user_folder

from .documents import essay_segments
from .protocol import CONTINUATION, PREFIX
from .tasks.fidelity import fidelity_rows

TOP_K_GRID, ALPHA_GRID, TAU_GRID = (10, 64, 256), (0.8, 0.9, 0.95), (0.5, 1.0, 2.0)
COMBINATIONS = ("softmax", "zscore", "rank")
ALTERNATIVES = dict(alignment=("next",), evolution=("across_layers", "none"))


def _named(fields: dict) -> tuple[str, InfoKV]:
    policy = InfoKV(**fields)
    return ",".join(
        f"{k}={getattr(policy, k)}" for k in ("top_k", "alpha", "tau", "combination", "alignment", "evolution")
    ), policy


def settings_grid() -> dict[str, InfoKV]:
    """The grid of the module docstring as named InfoKV policies (name: ``top_k=256,alpha=0.9,...``)."""
    settings = [dict(alpha=1.0)] + [
        dict(top_k=k, alpha=a, tau=t) for k, a, t in itertools.product(TOP_K_GRID, ALPHA_GRID, TAU_GRID)
    ]
    settings += [dict(alpha=a, combination=c) for c in COMBINATIONS[1:] for a in ALPHA_GRID]
    settings += [
        dict(alpha=a, **{option: value})
        for option, values in ALTERNATIVES.items()
        for value in values
        for a in ALPHA_GRID
    ]
    grid = dict(_named(fields) for fields in settings)
    assert grid[_named({})[0]] == InfoKV()  # the published point is in the grid
    return grid


def check_budgets(budgets: Sequence[str], prefix: int = PREFIX) -> None:
    """Refuse (`InputError`) a budget that cannot compress the `prefix`: needs no model, so a command
    checks it before loading one."""
    for budget in map(Budget.parse, budgets):
        budget.check_offline()
        budget.check_count(prefix, "the compressed prefix")


def calibrate(
    loaded: LoadedModel,
    budgets: Sequence[str] = ("0.1", "0.25", "0.5"),
    docs: int = 4,
    grid: dict[str, InfoKV] | None = None,
    prefix: int = PREFIX,
    continuation: int = CONTINUATION,
    token_ids: dict[str, list[int]] | None = None,
    out: Path | None = None,
) -> dict:
    """Measure the grid, choose the setting, write the calibration file; returns its content.

    `token_ids` (document name -> tokens) replaces the calibration essays, for tests.
    """
    check_budgets(budgets, prefix)
    tracer = Tracer(loaded)
    policies = settings_grid() if grid is None else grid
    if token_ids is None:
        segments = essay_segments(loaded.tokenizer, docs, prefix + continuation, split="calibration")
        token_ids = {trace.id.removeprefix("essay:"): trace.token_ids for trace in segments}
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
    path = out or user_folder() / file_name(loaded.name)
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
    parser = argparse.ArgumentParser(description="show a calibration file: the chosen settings and option effects")
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    found = read(args.model)
    if found is None:
        raise SystemExit(
            f"error: no calibration for {args.model}; run `forward-influence calibrate --model {args.model}`"
        )
    result, source = found
    print(f"{source}: {result['settings']} on {len(result['documents'])} essays, budgets {result['budgets']}")
    print(option_effects(result).to_string(index=False, float_format="{:.4f}".format))


if __name__ == "__main__":
    main()
