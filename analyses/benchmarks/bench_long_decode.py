"""Long-decoding benchmark on the embedded model: teacher-forced replay in blocks against decoding one
token at a time, and what a compressed cache saves while decoding. All figures from one run (these
machines are noisy; compare ratios, not seconds).

    python analyses/benchmarks/bench_long_decode.py [--quick]

The last line is ``replay_speedup=X replay_max_logit_diff=E kv_bytes_ratio_2048=A kv_bytes_ratio_4096=B
decode_speed_ratio_2048=C decode_speed_ratio_4096=D``:

- X: feeding a 2048-token continuation (an essay's, after a 128-token prompt) to InfoKV's compressed
  cache at a 256-token budget with the paper's 1024-token compression interval, as `teacher_forced`
  does (blocks that end where a compression falls due), against the same tokens decoded one forward
  pass per token; E is the largest difference of their logits (the same evictions, checked).
  ``--quick`` replays 512 tokens with R-KV's 128-token interval.
- A, B: peak bytes of keys and values of InfoKV's cache (budget 512, interval 128) over the full
  cache's, after 2048 and 4096 greedy tokens; C, D: decoding speed (tokens/s over the 256 steps before
  each point) compressed over full. ``--quick`` stops at 1024 and 2048.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from forward_influence.logits import logits_of  # noqa: E402
from forward_influence.models import cache_argument, load_model  # noqa: E402
from kv_compression.budget import Budget  # noqa: E402
from kv_compression.policies import InfoKV  # noqa: E402
from kv_compression.runtime import CompressedCache, compressing, teacher_forced  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compression import essay_tokens  # noqa: E402

PROMPT = 128


def step_by_step(model, prompt: torch.Tensor, continuation: torch.Tensor, policy, budget: Budget, buffer: int):
    """Logits of each continuation token decoded one forward pass at a time, and the cache."""
    cache = CompressedCache(model, policy, budget, buffer=buffer)
    logits = []
    with compressing(model, cache), torch.no_grad():
        logits.append(model(prompt[None], **cache_argument(cache), logits_to_keep=1).logits[0, -1])
        for i in range(continuation.shape[0] - 1):
            position = torch.tensor([[prompt.shape[0] + i]])
            logits.append(
                model(continuation[None, i : i + 1], position_ids=position, **cache_argument(cache)).logits[0, -1]
            )
    return torch.stack(logits), cache


def decode(
    model, prompt: torch.Tensor, steps: int, checkpoints: tuple[int, ...], cache
) -> dict[int, tuple[float, int, int]]:
    """Greedy decoding with `cache` (a `CompressedCache` or a plain `DynamicCache`): at each checkpoint,
    the tokens/s of the last 256 steps, the cache's peak bytes so far and the full cache's bytes."""
    compressed = isinstance(cache, CompressedCache)
    context = compressing(model, cache) if compressed else torch.no_grad()
    out, peak, started = {}, 0, None
    with context, torch.no_grad():
        logits = model(prompt[None], **cache_argument(cache), logits_to_keep=1).logits
        for step in range(1, steps + 1):
            if any(step == c - 256 for c in checkpoints):
                started = time.perf_counter()
            token = logits[:, -1:].argmax(-1)
            position = torch.tensor([[prompt.shape[0] + step - 1]])
            logits = model(token, position_ids=position, **cache_argument(cache)).logits
            held = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
            peak = max(peak, held)
            if step in checkpoints:
                full = held if not compressed else cache.sizes()["full_bytes"]
                out[step] = (256 / (time.perf_counter() - started), peak, full)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 512-token replay, decoding to 2048 tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model().model
    tokens = essay_tokens(load_model().tokenizer, PROMPT + 2048)
    length = 512 if args.quick else 2048
    prompt, continuation = tokens[:PROMPT], tokens[PROMPT : PROMPT + length]

    policy, budget, interval = InfoKV(), Budget.parse("256"), 128 if args.quick else 1024
    start = time.perf_counter()
    states, blocks, _ = teacher_forced(model, prompt, continuation, policy, budget, interval)
    replay = time.perf_counter() - start
    start = time.perf_counter()
    logits, steps = step_by_step(model, prompt, continuation, policy, budget, interval)
    stepwise = time.perf_counter() - start
    same = [e.time for e in blocks.compressions] == [e.time for e in steps.compressions]
    difference = float((logits_of(model, states) - logits.float()).abs().max())
    print(
        f"replay of {length} tokens: blocks {replay:.1f} s, one token per pass {stepwise:.1f} s; "
        f"{len(blocks.compressions)} compressions at the same times: {same}",
        file=sys.stderr,
    )

    checkpoints = (1024, 2048) if args.quick else (2048, 4096)
    full = decode(model, prompt, checkpoints[-1], checkpoints, DynamicCache(config=model.config))
    small = decode(
        model, prompt, checkpoints[-1], checkpoints, CompressedCache(model, InfoKV(), Budget.parse("512"), buffer=128)
    )
    for point in checkpoints:
        print(
            f"after {point} tokens: {small[point][0]:.1f} tok/s compressed (peak {small[point][1] / 2**20:.1f} MiB) "
            f"vs {full[point][0]:.1f} tok/s full ({full[point][1] / 2**20:.1f} MiB)",
            file=sys.stderr,
        )
    ratios = " ".join(
        f"kv_bytes_ratio_{p}={small[p][1] / full[p][1]:.3f} decode_speed_ratio_{p}={small[p][0] / full[p][0]:.2f}"
        for p in checkpoints
    )
    print(f"replay_speedup={stepwise / replay:.1f} replay_max_logit_diff={difference:.1e} {ratios}")


if __name__ == "__main__":
    main()
