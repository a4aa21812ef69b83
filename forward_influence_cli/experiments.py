"""Experiment commands: compare selections, draw a token heatmap, run the demo report."""

from __future__ import annotations

import argparse
import datetime
import shutil
from pathlib import Path

from forward_influence.errors import InputError

from . import options, outputs
from .options import add_model, add_trace, fraction, positive_int

EXAMPLES = {
    "compare": "forward-influence compare 'essay:*' --max-tokens 512 --budget 0.25 --out compare-run",
    "heatmap": "forward-influence heatmap essay:gap --max-tokens 300 --signal policy:infokv --out gap.html",
    "demo": "forward-influence demo --docs 4 --out demo-run",
}


def add(command) -> None:
    p = command("compare", "attention, entropy, evolution and InfoKV selections side by side at a budget")
    add_trace(p)
    add_model(p)
    p.add_argument(
        "--budget",
        type=options.offline_budget,
        default="0.25",
        help="what each selection keeps of the prefix: a ratio in (0, 1] or a token count (default 0.25)",
    )
    p.add_argument("--evict-at", type=int, default=None, help="eviction time t (default: middle of each trace)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="also write compare.csv, compare_per_document.csv and compare.png/.svg to this folder",
    )

    p = command("heatmap", "the trace's text with every token shaded by a signal (HTML with hover values, or PNG)")
    add_trace(p)
    add_model(p)
    p.add_argument(
        "--signal", default="entropy", help="entropy, attention, evolution, fi or policy:NAME (default entropy)"
    )
    p.add_argument(
        "--budget",
        type=options.offline_budget,
        default="0.25",
        help="budget of a policy:NAME signal, whose evicted tokens are marked",
    )
    p.add_argument("--out", type=Path, required=True, help="FILE.html or FILE.png")

    p = command(
        "demo",
        "the main job: influence by distance, attention vs entropy, selections at a budget, a "
        "heatmap, in one HTML report",
    )
    add_model(p)
    p.add_argument("--docs", type=positive_int, default=4, help="evaluation essays (default 4)")
    p.add_argument("--max-tokens", type=positive_int, default=768, help="tokens per essay (default 768)")
    p.add_argument("--fraction", type=fraction, default=0.1, help="share of the prefix evicted (default 0.1)")
    p.add_argument("--evict-at", type=int, default=384, help="eviction time t (default 384)")
    p.add_argument(
        "--budget",
        type=options.offline_budget,
        default="0.25",
        help="budget of the selection comparison (default 0.25)",
    )
    p.add_argument("--seed", type=options.seed, default=0, help="seed of the random selection (default 0)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default demo-<date-time>)")


def compare(args: argparse.Namespace) -> None:
    import pandas as pd

    from analyses.compare import compare as run_compare
    from analyses.compare import display_table

    outputs.check_folder(args.out)
    options.check_evict_at(args.evict_at)
    tracer, traces = options.tracer_and_traces(args, run="replay")
    table, _ = run_compare(tracer, traces, args.budget, args.out, args.evict_at, model=args.model)
    with pd.option_context("display.max_rows", None, "display.width", 250, "display.float_format", "{:.3g}".format):
        print(display_table(table).to_string(index=False))
    if args.out is not None:
        print(args.out / "compare.csv")


def heatmap(args: argparse.Namespace) -> None:
    from analyses import heatmap as shade

    shade.check_signal(args.signal)
    outputs.check_file(args.out, (".html", ".png"))
    tracer, traces = options.tracer_and_traces(args)
    if len(traces) != 1:
        raise InputError(f"heatmap shows one trace; {args.trace!r} names {len(traces)}")
    if args.signal.startswith("policy:"):
        options.check_budget_fits(args.budget, traces)
    shown = shade.heat(tracer, traces[0], args.signal, args.budget, model=args.model)
    title = f"{args.model}: {traces[0].id}, {len(traces[0])} tokens, shaded by {args.signal}"
    print(shade.write(shown, title, args.out))


def demo(args: argparse.Namespace) -> None:
    from analyses.demo import run_demo
    from forward_influence.defaults import SINKS
    from forward_influence.measure import eviction_time
    from forward_influence.traces import Trace

    eviction_time(Trace("demo essays", [0] * args.max_tokens), args.evict_at, SINKS)
    args.budget.check_count(args.max_tokens, "--max-tokens")
    out = args.out or Path(f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    outputs.check_folder(out)
    fresh = not out.exists()
    try:
        report = run_demo(
            args.model,
            out,
            docs=args.docs,
            max_tokens=args.max_tokens,
            fraction=args.fraction,
            evict_at=args.evict_at,
            budget=args.budget,
            seed=args.seed,
        )
    except Exception:
        if fresh:  # a failed demo leaves no half-made report folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(report)


COMMANDS = {"compare": compare, "heatmap": heatmap, "demo": demo}
