"""Measurement commands: score, influence, scan."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from forward_influence.defaults import GRADIENT_SAMPLES, SCAN_METHODS, SINKS, TOP_K, WINDOW
from forward_influence.errors import InputError

from . import options, outputs
from .options import add_model, add_out, add_trace, fraction, non_negative_int, positive_int

if TYPE_CHECKING:
    import pandas as pd

EXAMPLES = {
    "score": "forward-influence score essay:gap --max-tokens 256 --out gap.csv",
    "influence": "forward-influence influence 'essay:g*' --select entropy,attention,h2o,random "
    "--fraction 0.1 --evict-at 512 --max-tokens 1024",
    "scan": "forward-influence scan essay:gap --start 256 --end 320 --max-distance 64",
}


@options.checked
def _edges(text: str) -> tuple[int, ...]:
    from forward_influence.stats import parse_edges

    return parse_edges(text)


def add(command) -> None:
    p = command("score", "per-token signals of a trace: entropies, attention, representation change")
    add_trace(p)
    add_model(p)
    p.add_argument("--top-k", type=positive_int, default=TOP_K, help=f"k of the top-k entropy (default {TOP_K})")
    p.add_argument(
        "--window",
        type=positive_int,
        default=WINDOW,
        help=f"queries of the SnapKV observation window (default {WINDOW})",
    )
    p.add_argument(
        "--policy",
        type=options.policy_list,
        default=None,
        help="also score with these compression policies (comma-separated CLI names, see `policies`): adds "
        "score_<policy> (mean over layers and KV heads; inf = always kept), keep_share_<policy> (share of "
        "layer x KV-head slots that keep the token) and kept_<policy> (1 when at least half keep it)",
    )
    p.add_argument(
        "--budget",
        type=options.offline_budget,
        default="0.25",
        help="budget of --policy: a ratio in (0, 1] or a token count (default 0.25)",
    )
    p.add_argument(
        "--head-floor",
        type=options.share,
        default=None,
        help="per-head allocation (AdaKV): each KV head keeps at least this share of the uniform "
        "per-head budget, the rest goes to the best scores across heads (default: uniform heads)",
    )
    add_out(p)

    p = command("influence", "Forward Influence by distance of signal-chosen sets evicted at time t")
    add_trace(p)
    add_model(p)
    p.add_argument(
        "--select",
        default="entropy,attention,h2o,random",
        help="comma-separated selections: entropy (=entropy_next), entropy_generated, entropy_full, "
        "attention (=attention_snapkv), h2o (=attention_h2o), evolution, random (default %(default)s)",
    )
    p.add_argument(
        "--fraction", type=fraction, default=0.1, help="share of the prefix 0..t evicted, in (0, 1) (default 0.1)"
    )
    p.add_argument(
        "--evict-at",
        type=int,
        default=None,
        help="eviction time t, a token position from --sinks on (default: middle of each trace)",
    )
    p.add_argument(
        "--max-distance",
        type=positive_int,
        default=None,
        help="measure distances 1..D after t (default: to the trace end)",
    )
    p.add_argument(
        "--layers", type=options.index_list, default=None, help="evict in these layers only, e.g. 0,1,2 (default all)"
    )
    p.add_argument("--heads", type=options.index_list, default=None, help="evict in these KV heads only (default all)")
    p.add_argument(
        "--sinks", type=non_negative_int, default=SINKS, help=f"first positions never evicted (default {SINKS})"
    )
    p.add_argument(
        "--buckets", type=_edges, default="1,9,33,129,513", help="distance bucket starts (default %(default)s)"
    )
    p.add_argument("--seed", type=options.seed, default=0, help="seed of the random selection (default 0)")
    p.add_argument("--per-distance", type=Path, default=None, help="also write the per-distance table to FILE")
    add_out(p)

    p = command("scan", "per-token Forward Influence: each token evicted alone at its own position")
    add_trace(p)
    add_model(p)
    p.add_argument("--start", type=non_negative_int, required=True, help="first scanned position")
    p.add_argument("--end", type=positive_int, required=True, help="scan positions [start, end)")
    p.add_argument("--max-distance", type=positive_int, default=64, help="distances 1..D per token (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="tokens per batched pass (default 16)")
    p.add_argument(
        "--method",
        choices=SCAN_METHODS,
        default="exact",
        help="exact: one replay per token (default); gradient: every token at once, estimated from the "
        "gradients of soft eviction gates at a common eviction time (see --time)",
    )
    p.add_argument(
        "--time",
        type=non_negative_int,
        default=None,
        help="evict every scanned token at this common eviction time instead of at its own position, "
        "distances counted from it (default: own positions for exact; for gradient the scan's last "
        "position, or earlier so that --max-distance positions follow it)",
    )
    p.add_argument(
        "--samples",
        type=positive_int,
        default=GRADIENT_SAMPLES,
        help=f"sampled continuations of the gradient estimate (default {GRADIENT_SAMPLES})",
    )
    add_out(p)


def _policy_columns(tracer, token_ids, policies, budget) -> pd.DataFrame:
    """score_/keep_share_/kept_ columns of each policy for one trace (see `score --help`)."""
    import pandas as pd

    from kv_compression.kept import token_view
    from kv_compression.offline import observation

    obs = observation(tracer, token_ids, policies)
    columns = {}
    for policy in policies:
        score, share = token_view(policy, obs, budget)
        columns[f"score_{policy.name}"] = score.cpu().numpy()
        columns[f"keep_share_{policy.name}"] = share.cpu().numpy()
        columns[f"kept_{policy.name}"] = (share >= 0.5).int().cpu().numpy()
    return pd.DataFrame(columns, index=range(len(token_ids)))


def score(args: argparse.Namespace) -> None:
    from dataclasses import replace

    import pandas as pd

    from forward_influence.signals import token_signals
    from kv_compression.names import parse

    outputs.check_file(args.out)
    if args.head_floor is not None and not args.policy:
        raise InputError("--head-floor applies to --policy, and no --policy is given")
    budget = replace(args.budget, head_floor=args.head_floor) if args.policy else None
    policies = [parse(spec, args.model) for spec in args.policy or []]
    tracer, traces = options.tracer_and_traces(args)
    if policies:
        options.check_budget_fits(budget, traces)
    frames = []
    for trace in traces:
        frame = token_signals(tracer, trace.token_ids, top_k=args.top_k, window=args.window).table(tracer.tokenizer)
        if policies:
            frame = pd.concat([frame, _policy_columns(tracer, trace.token_ids, policies, budget)], axis=1)
        if len(traces) > 1:
            frame.insert(0, "trace", trace.id)
        frames.append(frame)
    outputs.emit(pd.concat(frames, ignore_index=True), args)


def influence(args: argparse.Namespace) -> None:
    from forward_influence.measure import InfluenceSettings, influence_by_distance, summarize
    from forward_influence.outputs import write_table
    from forward_influence.selection import canonical

    selections = [canonical(name) for name in options.names(args.select)]
    if not selections:
        raise InputError("--select names no selection")
    options.once(selections, "--select: selection")
    outputs.check_file(args.out)
    outputs.check_file(args.per_distance, option="--per-distance")
    options.check_evict_at(args.evict_at, args.sinks)
    tracer, traces = options.tracer_and_traces(args, run="replay")
    for option, values, count in (
        ("--layers", args.layers, tracer.layout.num_layers),
        ("--heads", args.heads, tracer.layout.num_kv_heads),
    ):
        if values is not None and not all(0 <= v < count for v in values):
            raise InputError(
                f"{option} must lie in [0, {count - 1}] for {args.model}, got {','.join(map(str, values))}"
            )
    settings = InfluenceSettings(
        fraction=args.fraction,
        evict_at=args.evict_at,
        max_distance=args.max_distance,
        layers=args.layers,
        heads=args.heads,
        sinks=args.sinks,
        seed=args.seed,
    )
    per_distance = influence_by_distance(tracer, traces, selections, settings)
    if args.per_distance is not None:
        write_table(per_distance, args.per_distance)
    outputs.emit(summarize(per_distance, args.buckets), args)


def scan(args: argparse.Namespace) -> None:
    import sys

    import pandas as pd

    from forward_influence.scan import common_time
    from forward_influence.scan import scan as scan_trace

    if args.start >= args.end:
        raise InputError(f"--start {args.start} must be smaller than --end {args.end}")
    if args.time is not None and not args.start <= args.time:
        raise InputError(f"--time {args.time} comes before --start {args.start}: no scanned token is cached then")
    outputs.check_file(args.out)
    tracer, traces = options.tracer_and_traces(args, run="replay")
    frames = []
    for trace in traces:
        time = args.time
        if time is None and args.method == "gradient":
            time = common_time(len(trace.token_ids), args.end, args.max_distance)
            if time < args.start:
                raise InputError(
                    f"{trace.id}: no common eviction time in [--start, --end) leaves --max-distance "
                    f"{args.max_distance} positions of its {len(trace.token_ids)} tokens after it; lower "
                    "--max-distance or give --time"
                )
            print(f"{trace.id}: every scanned token evicted at the common time {time}", file=sys.stderr)
        if time is not None and time >= len(trace.token_ids) - 1:
            raise InputError(f"--time {time}: no position of {trace.id} ({len(trace.token_ids)} tokens) follows it")
        frame = scan_trace(
            tracer,
            trace.token_ids,
            args.start,
            args.end,
            args.max_distance,
            args.batch_size,
            progress=True,
            time=time,
            method=args.method,
            samples=args.samples,
        )
        if len(traces) > 1:
            frame.insert(0, "trace", trace.id)
        frames.append(frame)
    outputs.emit(pd.concat(frames, ignore_index=True), args)


COMMANDS = {"score": score, "influence": influence, "scan": scan}
