"""The ``forward-influence`` command line.

Commands: ``essays``, ``score``, ``influence``, ``scan``, ``compare``, ``heatmap``, ``verify``,
``trace``, ``generate``, ``policies``, ``eval``, ``calibrate`` and ``demo``.
Results go to stdout (a table) or ``--out FILE`` (format by extension: .csv, .jsonl, .parquet);
progress and messages go to stderr; a command that writes files prints the main file's path last.
Bad input gives one ``error:`` line on stderr and exit code 2; a failure of the run exit code 1
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from pathlib import Path
from typing import Sequence

import pandas as pd

from .errors import InputError
from .models import DEFAULT_MODEL

EXAMPLES = {
    "essays": "forward-influence essays --split evaluation",
    "score": "forward-influence score essay:gap --max-tokens 256 --out gap.csv",
    "influence": "forward-influence influence 'essay:g*' --select entropy,attention,h2o,random "
    "--fraction 0.1 --evict-at 512 --max-tokens 1024",
    "scan": "forward-influence scan essay:gap --start 256 --end 320 --max-distance 64",
    "verify": "forward-influence verify --model gemma-3-270m",
    "trace": "forward-influence trace data/problems.jsonl --limit 5 --out traces.jsonl",
    "demo": "forward-influence demo --docs 4 --out demo-run",
    "generate": "forward-influence generate --trace essay:gap --max-tokens 1024 --policy infokv --budget 0.25",
    "policies": "forward-influence policies",
    "eval": "forward-influence eval --task fidelity --policies infokv,snapkv,h2o,random --budgets 0.1,0.25,0.5 --docs 5",
    "calibrate": "forward-influence calibrate --docs 4",
    "compare": "forward-influence compare 'essay:*' --max-tokens 512 --budget 0.25 --out compare-run",
    "heatmap": "forward-influence heatmap essay:gap --max-tokens 300 --signal policy:infokv --out gap.html",
}


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error:`` line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"fraction must lie in (0, 1), got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, .gguf path, folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _add_trace(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="essay:NAME (patterns allowed, e.g. 'essay:*'), a .txt or .jsonl file, or - for stdin")
    p.add_argument("--max-tokens", type=int, default=None, help="keep the first N tokens of each trace (default: all)")


def _add_out(p: argparse.ArgumentParser, formats: bool = True) -> None:
    p.add_argument("--out", type=Path, default=None, help="write to FILE (.csv, .jsonl or .parquet) instead of stdout")
    if formats:
        p.add_argument("--format", choices=["table", "csv", "jsonl"], default="table", help="stdout format (default table)")


def build_parser() -> Parser:
    parser = Parser(prog="forward-influence", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=f"example: {EXAMPLES[name]}")

    p = command("essays", "list the corpus essays by name")
    p.add_argument("--split", choices=["all", "calibration", "evaluation"], default="all")

    p = command("score", "per-token signals of a trace: entropies, attention, representation change")
    _add_trace(p)
    _add_model(p)
    p.add_argument("--top-k", type=int, default=10, help="k of the top-k entropy (default 10)")
    p.add_argument("--window", type=int, default=32, help="queries of the SnapKV observation window (default 32)")
    p.add_argument("--policy", default=None,
                   help="also score with these compression policies (comma-separated CLI names, see `policies`): adds "
                   "score_<policy> (mean over layers and KV heads; inf = always kept), keep_share_<policy> (share of "
                   "layer x KV-head slots that keep the token) and kept_<policy> (1 when at least half keep it)")
    p.add_argument("--budget", default="0.25", help="budget of --policy: a ratio in (0, 1] or a token count (default 0.25)")
    p.add_argument("--head-floor", type=float, default=None,
                   help="per-head allocation (AdaKV): each KV head keeps at least this share of the uniform "
                   "per-head budget, the rest goes to the best scores across heads (default: uniform heads)")
    _add_out(p)

    p = command("influence", "Forward Influence by distance of signal-chosen sets evicted at time t")
    _add_trace(p)
    _add_model(p)
    p.add_argument("--select", default="entropy,attention,h2o,random",
                   help="comma-separated selections: entropy (=entropy_next), entropy_generated, entropy_full, "
                   "attention (=attention_snapkv), h2o (=attention_h2o), evolution, random (default %(default)s)")
    p.add_argument("--fraction", type=_fraction, default=0.1, help="share of the prefix 0..t evicted, in (0, 1) (default 0.1)")
    p.add_argument("--evict-at", type=int, default=None, help="eviction time t, a token position (default: middle of each trace)")
    p.add_argument("--max-distance", type=int, default=None, help="measure distances 1..D after t (default: to the trace end)")
    p.add_argument("--layers", type=_int_list, default=None, help="evict in these layers only, e.g. 0,1,2 (default all)")
    p.add_argument("--heads", type=_int_list, default=None, help="evict in these KV heads only (default all)")
    p.add_argument("--sinks", type=int, default=4, help="first positions never evicted (default 4)")
    p.add_argument("--buckets", default="1,9,33,129,513", help="distance bucket starts (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random selection (default 0)")
    p.add_argument("--per-distance", type=Path, default=None, help="also write the per-distance table to FILE")
    _add_out(p)

    p = command("scan", "per-token Forward Influence: each token evicted alone at its own position")
    _add_trace(p)
    _add_model(p)
    p.add_argument("--start", type=int, required=True, help="first scanned position")
    p.add_argument("--end", type=int, required=True, help="scan positions [start, end)")
    p.add_argument("--max-distance", type=int, default=64, help="distances 1..D per token (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="tokens per batched pass (default 16)")
    _add_out(p)

    p = command("compare", "attention, entropy, evolution and InfoKV selections side by side at a budget")
    _add_trace(p)
    _add_model(p)
    p.add_argument("--budget", type=_fraction, default=0.25, help="share of the prefix each selection keeps (default 0.25)")
    p.add_argument("--evict-at", type=int, default=None, help="eviction time t (default: middle of each trace)")
    p.add_argument("--out", type=Path, default=None, help="also write compare.csv, compare_per_document.csv and "
                   "compare.png/.svg to this folder")

    p = command("heatmap", "the trace's text with every token shaded by a signal (HTML with hover values, or PNG)")
    _add_trace(p)
    _add_model(p)
    p.add_argument("--signal", default="entropy", help="entropy, attention, evolution, fi or policy:NAME (default entropy)")
    p.add_argument("--budget", default="0.25", help="budget of a policy:NAME signal, whose evicted tokens are marked")
    p.add_argument("--out", type=Path, required=True, help="FILE.html or FILE.png")

    p = command("verify", "check masked eviction == physical eviction on a model (exit 0 when within 1e-3)")
    _add_model(p)
    p.add_argument("--trace", dest="trace", default="essay:gap", help="trace to verify on (default essay:gap)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens of the trace (default 64, or the sliding window + 64 on models that have one)")

    p = command("trace", "generate reasoning traces for word problems (JSONL: prompt, completion, token_ids, ...)")
    p.add_argument("problems", type=Path, help="JSONL with 'id', 'question' and 'answer' per line")
    _add_model(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per problem (default 256)")
    p.add_argument("--limit", type=int, default=None, help="first N problems only")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl file")

    p = command("generate", "generate with a compressed KV cache; the last line reports the cache sizes")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (chat-formatted when the model has a template)")
    p.add_argument("--trace", default=None, help="use a trace's tokens as the prompt instead (essay:NAME, a file, -)")
    p.add_argument("--max-tokens", type=int, default=None, help="keep the first N tokens of --trace")
    _add_model(p)
    p.add_argument("--policy", required=True, help="compression policy, a CLI name from `policies`")
    p.add_argument("--budget", required=True, help="kept tokens per layer: a ratio of the prompt in (0, 1] or a count")
    p.add_argument("--buffer", type=int, default=128, help="new tokens allowed beyond the budget before re-compressing (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    p = command("policies", "list the compression policies with their rules and fields")

    p = command("eval", "sweep policies x budgets over evaluation tasks (resumable); writes results, summary, figures")
    p.add_argument("--task", default="fidelity", help="comma-separated tasks (default fidelity)")
    p.add_argument("--policies", default="infokv,snapkv,h2o,tova,streaming,knorm,rkv,random",
                   help="comma-separated policy CLI names (default %(default)s)")
    p.add_argument("--budgets", default="0.1,0.25,0.5", help="comma-separated budgets (default %(default)s)")
    p.add_argument("--docs", type=int, default=5, help="items per task (default 5)")
    _add_model(p)
    p.add_argument("--seed", type=int, default=0, help="seed (default 0); the same seed gives identical CSVs")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder (default runs/eval)")

    p = command("calibrate", "choose InfoKV's settings by far-distance Forward Influence on the calibration essays")
    _add_model(p)
    p.add_argument("--docs", type=int, default=4, help="calibration essays (default 4)")
    p.add_argument("--budgets", default="0.1,0.25,0.5", help="budgets averaged over (default %(default)s)")

    p = command("demo", "the main job: influence by distance, attention vs entropy, selections at a budget, a "
                "heatmap, in one HTML report")
    _add_model(p)
    p.add_argument("--docs", type=int, default=4, help="evaluation essays (default 4)")
    p.add_argument("--max-tokens", type=int, default=768, help="tokens per essay (default 768)")
    p.add_argument("--fraction", type=_fraction, default=0.1, help="share of the prefix evicted (default 0.1)")
    p.add_argument("--evict-at", type=int, default=384, help="eviction time t (default 384)")
    p.add_argument("--budget", type=_fraction, default=0.25, help="budget of the selection comparison (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random selection (default 0)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default demo-<date-time>)")
    return parser


def _check_trace_spec(spec: str) -> None:
    """Fail fast, before the model loads, on a trace file that does not exist."""
    if spec != "-" and not spec.startswith("essay:") and not Path(spec).is_file():
        raise InputError(f"no such trace file: {spec}")


def _emit(frame: pd.DataFrame, args: argparse.Namespace) -> None:
    from .outputs import write_table

    if args.out is not None:
        print(write_table(frame, args.out))
    elif getattr(args, "format", "table") == "csv":
        frame.to_csv(sys.stdout, index=False)
    elif args.format == "jsonl":
        frame.to_json(sys.stdout, orient="records", lines=True, force_ascii=False)
    else:
        with pd.option_context("display.max_rows", None, "display.width", 200, "display.float_format", "{:.4g}".format):
            print(frame.to_string(index=False))


def _tracer_and_traces(args: argparse.Namespace):
    from .models import load_model
    from .tracer import Tracer
    from .traces import read_traces

    _check_trace_spec(args.trace)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    return Tracer(loaded), read_traces(args.trace, loaded.tokenizer, args.max_tokens)


def cmd_essays(args: argparse.Namespace) -> None:
    from . import corpus

    for name in corpus.essay_names(args.split):
        print(name)


def cmd_score(args: argparse.Namespace) -> None:
    from .signals import token_signals

    if args.top_k < 1 or args.window < 1:
        raise InputError("--top-k and --window must be at least 1")
    policies = _policies(args.policy, args.model) if args.policy else []
    budget = _budget(args.budget, args.head_floor) if policies else None
    tracer, traces = _tracer_and_traces(args)
    frames = []
    for trace in traces:
        frame = token_signals(tracer, trace.token_ids, top_k=args.top_k, window=args.window).table(tracer.tokenizer)
        if policies:
            frame = pd.concat([frame, _policy_columns(tracer, trace.token_ids, policies, budget)], axis=1)
        if len(traces) > 1:
            frame.insert(0, "trace", trace.id)
        frames.append(frame)
    _emit(pd.concat(frames, ignore_index=True), args)


def _names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _policies(text: str, model: str | None = None) -> list:
    """Policies by CLI name; InfoKV takes `model`'s calibrated settings when a calibration file exists."""
    from kv_compression.policies.calibration import make, policy_names

    names = _names(text)
    unknown = [n for n in names if n not in policy_names()]
    if unknown or not names:
        raise InputError(f"unknown policy {', '.join(unknown) or text!r}; choose from {', '.join(policy_names())}")
    return [make(n, model) for n in names]


def _budget(text: str, head_floor: float | None = None):
    from kv_compression.budget import Budget

    return Budget.parse(text, head_floor)


def _policy_columns(tracer, token_ids, policies, budget) -> pd.DataFrame:
    """score_/keep_share_/kept_ columns of each policy for one trace (see `score --help`)."""
    from kv_compression.budget import token_view
    from kv_compression.offline import observations

    columns = {}
    n = len(token_ids)
    for policy, obs in zip(policies, observations(tracer, token_ids, policies)):
        score, share = token_view(policy, obs, budget)
        columns[f"score_{policy.name}"] = score.cpu().numpy()
        columns[f"keep_share_{policy.name}"] = share.cpu().numpy()
        columns[f"kept_{policy.name}"] = (share >= 0.5).int().cpu().numpy()
    return pd.DataFrame(columns, index=range(n))


def cmd_influence(args: argparse.Namespace) -> None:
    from .measure import InfluenceSettings, influence_by_distance, summarize
    from .outputs import write_table
    from .selection import canonical
    from .stats import parse_edges

    selections = [canonical(s.strip()) for s in args.select.split(",") if s.strip()]
    if not selections:
        raise InputError("--select names no selection")
    try:
        edges = parse_edges(args.buckets)
    except ValueError as exc:
        raise InputError(f"--buckets: {exc}") from None
    if args.max_distance is not None and args.max_distance < 1:
        raise InputError("--max-distance must be at least 1")
    tracer, traces = _tracer_and_traces(args)
    settings = InfluenceSettings(
        fraction=args.fraction, evict_at=args.evict_at, max_distance=args.max_distance,
        layers=args.layers, heads=args.heads, sinks=args.sinks, seed=args.seed,
    )
    per_distance = influence_by_distance(tracer, traces, selections, settings)
    if args.per_distance is not None:
        write_table(per_distance, args.per_distance)
    _emit(summarize(per_distance, edges), args)


def cmd_scan(args: argparse.Namespace) -> None:
    from .scan import scan

    tracer, traces = _tracer_and_traces(args)
    frames = []
    for trace in traces:
        frame = scan(tracer, trace.token_ids, args.start, args.end, args.max_distance, args.batch_size, progress=True)
        if len(traces) > 1:
            frame.insert(0, "trace", trace.id)
        frames.append(frame)
    _emit(pd.concat(frames, ignore_index=True), args)


def cmd_compare(args: argparse.Namespace) -> None:
    from analyses.compare import compare, display_table

    tracer, traces = _tracer_and_traces(args)
    table, _ = compare(tracer, traces, args.budget, args.out, args.evict_at, model=args.model)
    with pd.option_context("display.max_rows", None, "display.width", 250, "display.float_format", "{:.3g}".format):
        print(display_table(table).to_string(index=False))
    if args.out is not None:
        print(args.out / "compare.csv")


def cmd_heatmap(args: argparse.Namespace) -> None:
    from analyses import heatmap

    heatmap.check_signal(args.signal)
    if args.out.suffix not in (".html", ".png"):
        raise InputError(f"--out must end in .html or .png, got {args.out.name!r}")
    if args.signal.startswith("policy:"):
        _budget(args.budget)
    tracer, traces = _tracer_and_traces(args)
    if len(traces) != 1:
        raise InputError(f"heatmap shows one trace; {args.trace!r} names {len(traces)}")
    shown = heatmap.heat(tracer, traces[0], args.signal, args.budget, model=args.model)
    title = f"{args.model}: {traces[0].id}, {len(traces[0])} tokens, shaded by {args.signal}"
    print(heatmap.write(shown, title, args.out))


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from .models import load_model
    from .tracer import Tracer
    from .traces import read_traces
    from .verify import TOLERANCE, verify

    _check_trace_spec(args.trace)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    tracer = Tracer(loaded)
    windows = [w for w in tracer.layout.windows if w is not None]
    length = args.max_tokens or (max(windows) + 64 if windows else 64)
    trace = read_traces(args.trace, loaded.tokenizer, length)[0]
    table = verify(tracer, torch.tensor(trace.token_ids))
    with pd.option_context("display.width", 200):
        print(table.to_string(index=False))
    worst = table.max_abs_diff.max()
    print(f"max |logit difference| {worst:.3g} ({'within' if worst < TOLERANCE else 'OUTSIDE'} the {TOLERANCE:g} tolerance)")
    return 0 if bool(table.ok.all()) else 1


def cmd_trace(args: argparse.Namespace) -> None:
    from .generate import generate_traces, read_problems
    from .models import load_model
    from .outputs import atomic_open

    problems = read_problems(args.problems)[: args.limit]
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    with atomic_open(args.out) as f:
        for record in generate_traces(loaded, problems, max_new_tokens=args.max_new_tokens):
            f.write(json.dumps(record) + "\n")
    print(args.out)


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from kv_compression.runtime import generate

    if (args.prompt is None) == (args.trace is None):
        raise InputError("give either a PROMPT or --trace FILE")
    policy = _policies(args.policy, args.model)[0]
    budget = _budget(args.budget)
    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    if args.trace is not None:
        tracer, traces = _tracer_and_traces(args)
        tokenizer, model, ids = tracer.tokenizer, tracer.model, traces[0].token_ids
    else:
        from .models import load_model
        from .traces import _chat_ids

        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        tokenizer, model = loaded.tokenizer, loaded.model
        ids, _ = _chat_ids(tokenizer, args.prompt, "")
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.9) if args.sample else {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output, cache = generate(model, torch.tensor(ids), policy, budget, buffer=args.buffer,
                             max_new_tokens=args.max_new_tokens, pad_token_id=pad, **sampling)
    print(tokenizer.decode(output[0, len(ids):], skip_special_tokens=True))
    sizes = cache.sizes()
    print("cache: " + " ".join(f"{k}={v}" for k, v in sizes.items()))


def cmd_policies(args: argparse.Namespace) -> None:
    import dataclasses

    from kv_compression.policies import POLICIES

    for name, cls in POLICIES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        print(f"{name:<10} {doc}")
        print(f"{'':<10} fields: {fields or '(none)'}")
    print(f"{'infokv-default':<10} InfoKV with the paper-style defaults above, ignoring any calibration file")


def cmd_eval(args: argparse.Namespace) -> None:
    from analyses.evaluate import evaluate

    from .models import load_model

    from analyses.evaluate import check_sweep

    tasks, policies, budgets = _names(args.task), _names(args.policies), _names(args.budgets)
    if args.docs < 1:
        raise InputError("--docs must be at least 1")
    check_sweep(tasks, policies, budgets)  # before the model loads
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    print(evaluate(loaded, tasks, policies, budgets, args.docs, args.out, args.seed))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from analyses.calibrate import calibrate
    from kv_compression.policies.calibration import calibration_path

    from .models import load_model

    budgets = _names(args.budgets)
    for budget in budgets:
        _budget(budget)
    if args.docs < 1:
        raise InputError("--docs must be at least 1")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    result = calibrate(loaded, budgets, args.docs)
    print(f"chosen: {result['settings']}", file=sys.stderr)
    print(calibration_path(loaded.name))


def cmd_demo(args: argparse.Namespace) -> None:
    from analyses.demo import run_demo

    if args.docs < 1:
        raise InputError("--docs must be at least 1")
    if not 0 < args.evict_at < args.max_tokens - 1:
        raise InputError(f"--evict-at must lie in (0, {args.max_tokens - 1}) for --max-tokens {args.max_tokens}")
    out = args.out or Path(f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    print(run_demo(args.model, out, docs=args.docs, max_tokens=args.max_tokens, fraction=args.fraction,
                   evict_at=args.evict_at, budget=args.budget, seed=args.seed))


COMMANDS = {
    "essays": cmd_essays, "score": cmd_score, "influence": cmd_influence, "scan": cmd_scan,
    "compare": cmd_compare, "heatmap": cmd_heatmap,
    "verify": cmd_verify, "trace": cmd_trace, "generate": cmd_generate, "policies": cmd_policies,
    "eval": cmd_eval, "calibrate": cmd_calibrate, "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args) or 0
    except InputError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure of the run, not of the input
        if debug:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
