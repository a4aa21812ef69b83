"""Validated argument types and the options several commands share.

Every value with a rule is an argparse type, so the rule lives in one place and a bad value fails at
parsing, before any model loads, with one line naming the option: budgets, positive counts,
fractions, policy names (with ``:field=value`` settings), devices. Output paths are checked by
`forward_influence_cli.outputs`. This module imports nothing heavy at the top: building the parser,
``--help`` and the checks that need no model stay well under a second; a check that needs torch
(a policy's fields, a CUDA device) imports it when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from forward_influence.defaults import SINKS
from forward_influence.errors import InputError
from forward_influence.sources import DEFAULT_MODEL, DTYPE_NAMES, check_device, check_source
from forward_influence.traces import check_spec
from kv_compression.budget import Budget


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error:`` line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def checked(convert: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a converter that raises `InputError`/`ValueError` with a readable message."""

    def parse_value(text: str) -> object:
        try:
            return convert(text)
        except ValueError as exc:  # InputError included: argparse names the flag before the message
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse_value.__name__ = convert.__name__
    return parse_value


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise ValueError(f"must be at least {least}, got {value}")
    return value


positive_int = checked(lambda text: _integer(text, 1))
non_negative_int = checked(lambda text: _integer(text, 0))
documents_to_leave_out = checked(lambda text: _integer(text, 2))  # a fit validated leaving one document out
MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take every seed up to here


@checked
def seed(text: str) -> int:
    value = _integer(text, 0)
    if value > MAX_SEED:
        raise ValueError(f"must be at most {MAX_SEED}, got {value}")
    return value


def _number_in(text: str, inside: Callable[[float], bool], interval: str, prefix: str = "") -> float:
    """`text` as a number for which `inside` holds (false for nan), else a `ValueError` naming `interval`."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{prefix}must lie in {interval}, got {text!r}") from None
    if not inside(value):
        raise ValueError(f"{prefix}must lie in {interval}, got {text}")
    return value


fraction = checked(lambda text: _number_in(text, lambda v: 0 < v < 1, "(0, 1)", "fraction "))
share = checked(lambda text: _number_in(text, lambda v: 0 <= v <= 1, "[0, 1]"))  # nan and inf refused


budget = checked(Budget.parse)


@checked
def offline_budget(text: str) -> Budget:
    """A budget for a command that compresses a trace once and generates nothing."""
    parsed = Budget.parse(text)
    parsed.check_offline()
    return parsed


def check_budget_fits(parsed: Budget, traces) -> None:
    """Refuse, once the traces are read and before any forward pass, a token count larger than a trace."""
    for trace in traces:
        parsed.check_count(len(trace), f"trace {trace.id!r}")


def names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def once(values: list, what: str, canonical=str) -> list:
    """`values` if no two are the same `what` (compared by `canonical`); a repeat would count its items
    twice and narrow every interval."""
    seen = set()
    for value in values:
        key = canonical(value)
        if key in seen:
            raise InputError(f"{what} {value!r} is named twice")
        seen.add(key)
    return values


def _budget_list(text: str) -> list[str]:
    values = names(text)
    if not values:
        raise ValueError("no budget given")
    for value in values:
        Budget.parse(value)
    return once(values, "budget", lambda value: str(Budget.parse(value)))


budget_list = checked(_budget_list)


@checked
def offline_budget_list(text: str) -> list[str]:
    """`budget_list` for a command that generates nothing (no ``prompt+RATIO``)."""
    values = _budget_list(text)
    for value in values:
        Budget.parse(value).check_offline()
    return values


@checked
def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in names(text))
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError("expected at least one integer")
    return values


@checked
def index_list(text: str) -> tuple[int, ...]:
    """Comma-separated layer or head indices: non-negative integers (their upper bound needs the model)."""
    values = int_list(text)
    negative = [v for v in values if v < 0]
    if negative:
        raise ValueError(f"must be non-negative, got {negative[0]}")
    return values


def _check_policy(spec: str) -> str:
    from kv_compression.names import PER_MODEL, parse, policy_names

    name = spec.split(":")[0].strip()
    if name not in policy_names():
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(policy_names())}")
    if name not in PER_MODEL:  # those need the model's file: built after parsing
        parse(spec, quiet=True)
    return spec.strip()


policy = checked(_check_policy)


@checked
def policy_list(text: str) -> list[str]:
    from kv_compression.names import policy_names

    specs = names(text)
    unknown = [s.split(":")[0] for s in specs if s.split(":")[0].strip() not in policy_names()]
    if unknown or not specs:
        raise ValueError(f"unknown policy {', '.join(unknown) or '(none)'}; choose from {', '.join(policy_names())}")
    return once([_check_policy(spec) for spec in specs], "policy")


@checked
def shard(text: str) -> tuple[int, int]:
    from analyses.documents import parse_shard

    return parse_shard(text)


@checked
def model_source(text: str) -> str:
    check_source(text)
    return text


@checked
def device(text: str) -> str:
    check_device(text)
    return text


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=model_source,
        default=DEFAULT_MODEL,
        help=f"model name, .gguf path, folder or hub id (default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--dtype", default="float32", choices=list(DTYPE_NAMES), help="weights and activations (default float32)"
    )
    p.add_argument("--device", default="cpu", type=device, help="torch device: cpu, cuda, cuda:N, mps (default cpu)")


@checked
def trace_spec(text: str) -> str:
    """A trace the tokenizer would accept, checked at parsing, before anything loads (`check_spec`)."""
    check_spec(text)
    return text


def add_trace(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "trace",
        type=trace_spec,
        help="essay:NAME (patterns allowed, e.g. 'essay:*'), a .txt or .jsonl file, or - for stdin",
    )
    p.add_argument(
        "--max-tokens", type=positive_int, default=None, help="keep the first N tokens of each trace (default: all)"
    )


def add_out(p: argparse.ArgumentParser, formats: bool = True) -> None:
    p.add_argument("--out", type=Path, default=None, help="write to FILE (.csv, .jsonl or .parquet) instead of stdout")
    if formats:
        p.add_argument(
            "--format", choices=["table", "csv", "jsonl"], default="table", help="stdout format (default table)"
        )


def check_evict_at(evict_at: int | None, sinks: int = SINKS) -> None:
    """The part of the eviction-time rule that needs no trace (`forward_influence.measure.check_time`)."""
    from forward_influence.measure import check_time

    if evict_at is not None:
        check_time(evict_at, sinks)


def check_new_tokens(prompt: int, new_tokens: int, model) -> None:
    """Refuse a generation that would run past the model's context."""
    context = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if context is not None and prompt + new_tokens > context:
        raise InputError(
            f"--max-new-tokens {new_tokens}: the prompt ({prompt} tokens) plus the new tokens exceed the "
            f"model's context of {context}; pass --max-new-tokens {max(context - prompt, 1)} or fewer"
        )


def loaded_model(args: argparse.Namespace):
    from forward_influence.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def tracer_and_traces(args: argparse.Namespace, run: str = "readout"):
    """The tracer of ``--model`` and the traces of the positional trace, checked before the model's
    weights load against its context and against the memory the `run` needs on ``--device``
    (`forward_influence.memory`; a ``replay`` of evictions, ``--batch-size`` rows at a time, each
    running the ``--max-distance`` positions it reads in one pass, or a signal ``readout``)."""
    from forward_influence.memory import check_fits
    from forward_influence.models import load_parts
    from forward_influence.tracer import Tracer
    from forward_influence.traces import check_context, check_text, read_stdin, read_traces

    stdin_text = None
    if args.trace == "-":  # read and checked before the model loads: stdin can be read only once
        stdin_text = read_stdin()
        check_text(stdin_text, "stdin")
    tokenizer, config = load_parts(args.model)
    traces = read_traces(args.trace, tokenizer, args.max_tokens, stdin_text=stdin_text)
    check_context(traces, config)
    batched = hasattr(args, "batch_size")
    check_fits(
        config,
        max(len(trace) for trace in traces),
        run,
        args.device,
        args.dtype,
        batch_size=args.batch_size if batched else 1,
        chunk=getattr(args, "max_distance", None),
        options=("batch_size", "max_tokens") if batched else ("max_tokens",),
    )
    return Tracer(loaded_model(args)), traces
