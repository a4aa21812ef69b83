"""Compression commands: generate with a compressed cache, list the policies."""

from __future__ import annotations

import argparse
import dataclasses

from forward_influence.errors import InputError
from kv_compression.budget import BUFFER

from . import options
from .options import add_model, positive_int

EXAMPLES = {
    "generate": "forward-influence generate --trace essay:gap --max-tokens 1024 --policy infokv --budget 0.25",
    "policies": "forward-influence policies",
}


def add(command) -> None:
    p = command("generate", "generate with a compressed KV cache; the last line reports the cache sizes")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (chat-formatted when the model has a template)")
    p.add_argument(
        "--trace",
        type=options.trace_spec,
        default=None,
        help="use a trace's tokens as the prompt instead (essay:NAME, a file, -)",
    )
    p.add_argument("--max-tokens", type=positive_int, default=None, help="keep the first N tokens of --trace")
    add_model(p)
    p.add_argument(
        "--policy",
        type=options.policy,
        required=True,
        help="compression policy: a CLI name from `policies`, optionally NAME:field=value:...",
    )
    p.add_argument(
        "--budget",
        type=options.budget,
        required=True,
        help="kept tokens per layer: a ratio of the prompt in (0, 1], a count, or prompt+RATIO",
    )
    p.add_argument(
        "--buffer",
        type=options.non_negative_int,
        default=BUFFER,
        help=f"new tokens between compressions, the compression interval (default {BUFFER})",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    p.add_argument(
        "--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy decoding"
    )
    p.add_argument("--seed", type=options.seed, default=0, help="sampling seed (default 0)")

    command("policies", "list the compression policies with their rules and fields")


def generate(args: argparse.Namespace) -> None:
    import torch

    from forward_influence.models import pad_token_id
    from forward_influence.traces import chat_ids, check_context, read_traces
    from kv_compression.names import parse
    from kv_compression.runtime import SAMPLING
    from kv_compression.runtime import generate as compressed_generate

    if (args.prompt is None) == (args.trace is None):
        raise InputError("give either a PROMPT or --trace FILE")
    policy = parse(args.policy, args.model)
    if not policy.online:
        raise InputError(f"--policy {policy.name} scores from a measured trace only; generate cannot use it")
    loaded = options.loaded_model(args)
    if args.trace is not None:
        traces = read_traces(args.trace, loaded.tokenizer, args.max_tokens)
        check_context(traces, loaded.model.config)
        ids = traces[0].token_ids
    else:
        ids, _ = chat_ids(loaded.tokenizer, args.prompt, "")
    options.check_new_tokens(len(ids), args.max_new_tokens, loaded.model)
    torch.manual_seed(args.seed)
    sampling = SAMPLING if args.sample else {}
    output, cache = compressed_generate(
        loaded.model,
        torch.tensor(ids),
        policy,
        args.budget,
        buffer=args.buffer,
        max_new_tokens=args.max_new_tokens,
        tokenizer=loaded.tokenizer,
        pad_token_id=pad_token_id(loaded.tokenizer),
        **sampling,
    )
    print(loaded.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))
    print("cache: " + " ".join(f"{k}={v}" for k, v in cache.sizes().items()))


def policies(args: argparse.Namespace) -> None:
    from kv_compression.names import CALIBRATED
    from kv_compression.policies import POLICIES

    kvpress = "kvpress:CLASS"
    width = max(map(len, [*POLICIES, CALIBRATED, kvpress]))
    for name, cls in POLICIES.items():
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        offline = "" if cls.online else " [offline only: measurement, never generate]"
        print(f"{name:<{width}} {summary}{offline}")
        print(f"{'':<{width}} fields: {fields or '(none)'}")
    print(f"{CALIBRATED:<{width}} InfoKV with the settings `forward-influence calibrate` chose for --model")
    print(
        f"{kvpress:<{width}} a kvpress ScorerPress's choice, e.g. kvpress:SnapKVPress:window_size=64 (needs the "
        "kvpress extra) [offline only]"
    )


COMMANDS = {"generate": generate, "policies": policies}
