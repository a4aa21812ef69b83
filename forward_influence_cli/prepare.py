"""Preparation commands: list the essay corpus, generate reasoning traces, verify the tracer on a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import options, outputs
from .options import add_model, positive_int

EXAMPLES = {
    "essays": "forward-influence essays --split evaluation",
    "trace": "forward-influence trace problems.jsonl --limit 5 --out traces.jsonl",
    "verify": "forward-influence verify --model gemma-3-270m",
}


def add(command) -> None:
    p = command("essays", "list the corpus essays by name")
    p.add_argument("--split", choices=["all", "calibration", "evaluation"], default="all")

    p = command("trace", "generate reasoning traces for word problems (JSONL: prompt, completion, token_ids, ...)")
    p.add_argument("problems", type=Path, help="JSONL with 'id', 'question' and 'answer' per line")
    add_model(p)
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=256, help="tokens generated per problem (default 256)"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="first N problems only")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl file")

    p = command("verify", "check masked eviction == physical eviction on a model (exit 0 when within 1e-3)")
    add_model(p)
    p.add_argument(
        "--trace", type=options.trace_spec, default="essay:gap", help="trace to verify on (default essay:gap)"
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="tokens of the trace (default 64, or the sliding window + 64 on models that have one)",
    )


def essays(args: argparse.Namespace) -> None:
    from forward_influence import corpus

    for name in corpus.essay_names(args.split):
        print(name)


def trace(args: argparse.Namespace) -> None:
    from forward_influence.generate import generate_traces, read_problems
    from forward_influence.outputs import atomic_open

    outputs.check_file(args.out, (".jsonl",))
    problems = read_problems(args.problems)[: args.limit]
    loaded = options.loaded_model(args)
    options.check_new_tokens(0, args.max_new_tokens, loaded.model)
    with atomic_open(args.out) as f:
        for record in generate_traces(loaded, problems, max_new_tokens=args.max_new_tokens):
            f.write(json.dumps(record) + "\n")
    print(args.out)


def verify(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from forward_influence.tracer import Tracer
    from forward_influence.traces import read_traces
    from forward_influence.verify import TOLERANCE, TOLERANCES
    from forward_influence.verify import verify as check

    loaded = options.loaded_model(args)
    tracer = Tracer(loaded)
    windows = [w for w in tracer.layout.windows if w is not None]
    length = args.max_tokens or (max(windows) + 64 if windows else 64)
    trace = read_traces(args.trace, loaded.tokenizer, length)[0]
    table = check(tracer, torch.tensor(trace.token_ids))
    with pd.option_context("display.width", 200):
        print(table.to_string(index=False))
    worst = table.max_abs_diff.max()
    print(
        f"max |logit difference| {worst:.3g} ({'within' if table.ok.all() else 'OUTSIDE'} the "
        f"{TOLERANCES.get(tracer.dtype, TOLERANCE):g} tolerance)"
    )
    return 0 if bool(table.ok.all()) else 1


COMMANDS = {"essays": essays, "trace": trace, "verify": verify}
