"""Compression benchmark on the embedded model: what scoring and eviction cost, and what they save.
All six figures come from one run (these machines are noisy; compare ratios, not seconds).

    python analyses/benchmarks/bench_compression.py [--quick]

The last line is ``infokv_prefill_overhead=X snapkv_prefill_overhead=Y kvzip_prefill_overhead=V
cache_bytes_ratio=Z decode_speed_ratio=W peak_entropy_mem_mb=M``:

- X, Y, V: prefill of a 2048-token prompt with InfoKV (resp. SnapKV, KVzip) recording, scoring and
  evicting to a 25% budget, over a plain prefill of the same prompt into a `DynamicCache` (both
  compute the last position's logits only). Medians of paired ratios. KVzip's includes its
  reconstruction pass (the context fed again over the cache).
- Z: bytes of keys and values after InfoKV's prefill eviction at budget 0.25, over the bytes the
  cache would hold without eviction.
- W: decoding speed (tokens/s over 64 greedy tokens) after a 4096-token prompt with InfoKV at a 25%
  cache, over the same with the full cache. ``--quick`` uses 2048 tokens and 32 new tokens.
- M: extra peak memory (MB of resident memory) of computing the top-k entropy of every position of
  an 8192-token prompt from its final hidden states, the prefill's only vocabulary-sized work. It is
  bounded by the chunk: a few ``chunk x vocab`` float32 temporaries (256 x 49152 x 4 B = 48 MB each),
  against 1.5 GB for the whole ``[tokens, vocab]`` logits at once. It is measured in a child process
  whose allocator returns every large block to the system (``MALLOC_MMAP_THRESHOLD_``), so resident
  memory follows live memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from forward_influence import corpus  # noqa: E402
from forward_influence.logits import DEFAULT_CHUNK, topk_entropy  # noqa: E402
from forward_influence.models import cache_argument, load_model  # noqa: E402
from forward_influence.traces import read_traces  # noqa: E402
from kv_compression.budget import Budget  # noqa: E402
from kv_compression.policies import InfoKV, KVzip, SnapKV  # noqa: E402
from kv_compression.runtime import CompressedCache, compressing  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tracer import paired_ratio  # noqa: E402


def essay_tokens(tokenizer, n: int) -> torch.Tensor:
    """The first `n` tokens of the evaluation essays, concatenated in order."""
    ids: list[int] = []
    for name in corpus.essay_names("evaluation"):
        ids += read_traces(f"essay:{name}", tokenizer)[0].token_ids
        if len(ids) >= n:
            return torch.tensor(ids[:n])
    raise SystemExit(f"the evaluation essays hold fewer than {n} tokens")


def peak_rss_mb(fn) -> float:
    """Extra resident memory at the peak of `fn()` over the memory in use before it (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size

    def field(name: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name):
                return float(line.split()[1]) / 1024
        raise RuntimeError(name)

    before = field("VmRSS")
    fn()
    return field("VmHWM") - before


def entropy_memory() -> None:
    """Child process: print the extra peak MB of the chunked top-k entropy, then of whole logits."""
    model = load_model().model
    final = torch.randn(8192, model.config.hidden_size)
    with torch.no_grad():
        topk_entropy(model, final[:DEFAULT_CHUNK])
        chunked = peak_rss_mb(lambda: topk_entropy(model, final))
        whole = peak_rss_mb(lambda: model.get_output_embeddings()(final))
    print(f"{chunked:.0f} {whole:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pairs, a 2048-token decode context (~3 min)")
    parser.add_argument("--entropy-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.entropy_memory:
        return entropy_memory()
    torch.manual_seed(0)
    loaded = load_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    budget = Budget.parse("0.25")
    pairs = 2 if args.quick else 4
    prompt = essay_tokens(tokenizer, 2048)[None]

    def plain_prefill():
        with torch.no_grad():
            model(prompt, **cache_argument(DynamicCache(config=model.config)), logits_to_keep=1)

    def compressed_prefill(policy):
        cache = CompressedCache(model, policy, budget, tokenizer=tokenizer)
        with compressing(model, cache), torch.no_grad():
            model(prompt, **cache_argument(cache), logits_to_keep=1)
            cache.maybe_compress()
        return cache

    infokv_overhead, infokv_time, plain_time = paired_ratio(lambda: compressed_prefill(InfoKV()), plain_prefill, pairs)
    snapkv_overhead, snapkv_time, _ = paired_ratio(lambda: compressed_prefill(SnapKV()), plain_prefill, pairs)
    kvzip_overhead, kvzip_time, _ = paired_ratio(lambda: compressed_prefill(KVzip()), plain_prefill, pairs)
    print(
        f"prefill of 2048 tokens: plain {plain_time:.2f} s, InfoKV {infokv_time:.2f} s, SnapKV {snapkv_time:.2f} s, "
        f"KVzip {kvzip_time:.2f} s",
        file=sys.stderr,
    )

    sizes = compressed_prefill(InfoKV()).sizes()
    bytes_ratio = sizes["kept_bytes"] / sizes["full_bytes"]
    print(f"cache after InfoKV at 0.25: {sizes}", file=sys.stderr)

    context, new = (2048, 32) if args.quick else (4096, 64)
    long_prompt = essay_tokens(tokenizer, context)

    def decode_rate(policy_budget) -> float:
        """Tokens/s of the decoding steps alone (prefill and its eviction timed apart)."""
        if policy_budget is None:
            cache, hooks = DynamicCache(config=model.config), contextlib.nullcontext()
        else:
            cache = CompressedCache(model, InfoKV(), policy_budget)
            hooks = compressing(model, cache)
        with torch.no_grad(), hooks:
            logits = model(long_prompt[None], **cache_argument(cache), logits_to_keep=1).logits
            token = logits[:, -1:].argmax(-1)
            if policy_budget is not None:
                cache.maybe_compress()
            start = time.perf_counter()
            for step in range(new):
                position = torch.tensor([[context + step]])
                logits = model(token, position_ids=position, **cache_argument(cache)).logits
                token = logits[:, -1:].argmax(-1)
            return new / (time.perf_counter() - start)

    rates = [(decode_rate(budget), decode_rate(None)) for _ in range(2 if args.quick else 3)]
    speed_ratio = float(np.median([a / b for a, b in rates]))
    print(
        f"decoding after {context} tokens: {np.median([a for a, _ in rates]):.1f} tok/s with a 25% cache, "
        f"{np.median([b for _, b in rates]):.1f} tok/s with the full cache",
        file=sys.stderr,
    )

    child = subprocess.run(
        [sys.executable, __file__, "--entropy-memory"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    peak, whole = (float(x) for x in child.stdout.split()[-2:])
    print(
        f"top-k entropy of 8192 positions: +{peak:.0f} MB peak (chunk {DEFAULT_CHUNK} x vocab "
        f"{model.config.vocab_size} float32 = {DEFAULT_CHUNK * model.config.vocab_size * 4 / 2**20:.0f} MB per "
        f"temporary); whole logits at once: +{whole:.0f} MB",
        file=sys.stderr,
    )
    print(
        f"infokv_prefill_overhead={infokv_overhead:.2f} snapkv_prefill_overhead={snapkv_overhead:.2f} "
        f"kvzip_prefill_overhead={kvzip_overhead:.2f} cache_bytes_ratio={bytes_ratio:.3f} decode_speed_ratio={speed_ratio:.2f} peak_entropy_mem_mb={peak:.0f}"
    )


if __name__ == "__main__":
    main()
