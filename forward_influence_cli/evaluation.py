"""Evaluation commands: sweep policies and budgets over tasks, calibrate InfoKV, fit the learned and distilled policies."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options, outputs
from .options import add_model, documents_to_leave_out, positive_int

EXAMPLES = {
    "learn": "forward-influence learn --model smollm2-135m-instruct --docs 8",
    "distill": "forward-influence distill --model smollm2-135m-instruct --docs 16",
    "eval": "forward-influence eval --task fidelity --policies infokv,snapkv,h2o,random --budgets 0.1,0.25,0.5 --docs 5",
    "calibrate": "forward-influence calibrate --docs 4",
}
DEFAULT_POLICIES = "infokv,snapkv,h2o,tova,streaming,knorm,rkv,random"


@options.checked
def _tasks(text: str) -> list[str]:
    from analyses.tasks import registry

    tasks, known = options.names(text), registry()
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise ValueError(f"unknown task {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
    return tasks


def add(command) -> None:
    p = command("eval", "sweep policies x budgets over evaluation tasks (resumable); writes results, summary, figures")
    p.add_argument("--task", type=_tasks, default="fidelity", help="comma-separated tasks (default fidelity)")
    p.add_argument(
        "--policies",
        type=options.policy_list,
        default=DEFAULT_POLICIES,
        help="comma-separated policies, NAME or NAME:field=value:... (default %(default)s)",
    )
    p.add_argument(
        "--budgets",
        type=options.budget_list,
        default="0.1,0.25,0.5",
        help="comma-separated budgets: ratios, counts or prompt+RATIO (default %(default)s)",
    )
    p.add_argument("--docs", type=positive_int, default=5, help="items per task (default 5)")
    add_model(p)
    p.add_argument(
        "--buffer",
        type=options.non_negative_int,
        default=None,
        help="compression interval (new tokens between compressions) of the decoding tasks "
        "(default: each task's own; long-decode 128)",
    )
    p.add_argument("--seed", type=options.seed, default=0, help="seed (default 0); the same seed gives identical CSVs")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder (default runs/eval)")
    p.add_argument(
        "--shard",
        type=options.shard,
        default=None,
        help="I/N: compute only items I, I+N, ... into the cache and write no table (array jobs of a cluster "
        "scheduler; a run without --shard then merges them)",
    )

    p = command("calibrate", "choose InfoKV's settings by far-distance Forward Influence on the calibration essays")
    add_model(p)
    p.add_argument("--docs", type=positive_int, default=4, help="calibration essays (default 4)")
    p.add_argument(
        "--budgets",
        type=options.offline_budget_list,
        default="0.1,0.25,0.5",
        help="budgets averaged over (default %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the calibration file (default: the per-user data folder, where infokv-calibrated looks first)",
    )

    for name, docs, tokens, what in (
        ("distill", 16, 1280, "the distilled policy to the set optimum's choices"),
        ("learn", 8, 1088, "the learned policy to measured Forward Influence"),
    ):
        p = command(name, f"fit {what} on the calibration essays (resumable)")
        add_model(p)
        p.add_argument(
            "--docs",
            type=documents_to_leave_out,
            default=docs,
            help=f"calibration documents of {tokens} tokens (default {docs})",
        )
        policy = "distilled" if name == "distill" else "learned"
        p.add_argument(
            "--out",
            type=Path,
            default=None,
            help=f"folder of the weights file (default: the per-user data folder, where `{policy}` looks first)",
        )
        p.add_argument(
            "--work",
            type=Path,
            default=Path(f"runs/{name}"),
            help=f"folder of the per-document measurements, so a run resumes (default runs/{name})",
        )


def _fitted(args: argparse.Namespace, kind: str, fit, summary) -> None:
    """Fit the per-model file of `kind` with ``fit(model, docs, path, work)``, say `summary(content)` on
    stderr and print where the file went."""
    from kv_compression.tuned import file_name, user_folder

    folder = args.out or user_folder(kind)
    outputs.check_folder(folder)
    outputs.check_folder(args.work, "--work")
    loaded = options.loaded_model(args)
    content = fit(loaded, args.docs, folder / file_name(loaded.name), args.work)
    print(summary(content), file=sys.stderr)
    print(folder / file_name(loaded.name))


def distill(args: argparse.Namespace) -> None:
    from analyses.distill import fit

    _fitted(
        args,
        "distilled",
        fit,
        lambda c: (
            f"bands={c['bands']} C={c['penalty']} sinks={c['sinks']}: held-out agreement with the optimum "
            f"{c['cross_validation']}"
        ),
    )


def learn(args: argparse.Namespace) -> None:
    from analyses.learned import train

    _fitted(
        args,
        "learned",
        train,
        lambda c: f"bands={c['bands']} alpha={c['alpha']}: held-out Spearman {c['cross_validation']}",
    )


def evaluate(args: argparse.Namespace) -> None:
    from analyses.evaluate import evaluate as sweep

    outputs.check_folder(args.out)
    loaded = options.loaded_model(args)
    print(
        sweep(loaded, args.task, args.policies, args.budgets, args.docs, args.out, args.seed, args.buffer, args.shard)
    )


def calibrate(args: argparse.Namespace) -> None:
    from analyses.calibrate import calibrate as measure
    from analyses.calibrate import check_budgets
    from kv_compression.tuned import file_name, user_folder

    folder = args.out or user_folder()
    outputs.check_folder(folder)
    check_budgets(args.budgets)
    loaded = options.loaded_model(args)
    result = measure(loaded, args.budgets, args.docs, out=folder / file_name(loaded.name))
    print(f"chosen: {result['settings']}", file=sys.stderr)
    print(folder / file_name(loaded.name))


COMMANDS = {"eval": evaluate, "calibrate": calibrate, "learn": learn, "distill": distill}
