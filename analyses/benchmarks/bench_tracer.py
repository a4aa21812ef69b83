"""Tracer benchmark on the embedded model: the scan's speed-up, its distance to the compute floor,
and the cost of a traced readout. All three ratios come from one run (these machines are noisy).

    python analyses/benchmarks/bench_tracer.py [--quick]

The last line is ``speedup_scan_vs_naive=X floor_ratio=Y nnsight_overhead=Z``:

- X: per-token scan (each token j in [512, 1024) evicted alone at t = j, distances 1..64) versus the
  naive recompute: one full forward with a 4D mask per token over the trace up to j + 64, logits for
  every position, KL against the clean run (computed once). The naive time is measured on a sample
  of tokens spread over the range and extrapolated to the whole range. ``--quick`` scans [512, 640).
- Y: one batched eviction pass of the scan (16 rows x 64 queries over the cached prefix, per-layer
  masks written through nnsight) versus a plain transformers forward of the same query tokens over
  the same cached keys, with transformers' own causal mask and no tracing (the compute floor).
- Z: every token signal of a 1024-token trace read in one traced pass (`token_signals`: hidden states
  of every layer, the SnapKV and H2O attention recomputed from the recorded queries and cached keys,
  top-k and full entropies) versus a plain eager forward that returns the same raw material (every
  attention matrix, every hidden state, the logits).

Y and Z are medians of paired ratios (the two sides run back to back, several pairs); X's scan and
naive sample run one after the other, once each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from forward_influence import corpus  # noqa: E402
from forward_influence.eviction import EvictionSpec, build_masks  # noqa: E402
from forward_influence.influence import clean_run  # noqa: E402
from forward_influence.models import attention_implementation, cache_argument, load_model  # noqa: E402
from forward_influence.scan import naive_token_kl, scan_divergence  # noqa: E402
from forward_influence.signals import token_signals  # noqa: E402
from forward_influence.tracer import Tracer, expand_cache  # noqa: E402
from forward_influence.traces import read_traces  # noqa: E402

LENGTH, START, DISTANCE, BATCH = 1024, 512, 64, 16


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def paired_ratio(first, second, pairs: int) -> tuple[float, float, float]:
    """Median of first/second time ratios over pairs run back to back, after one warm-up each.

    Each pair shares the machine's state of the moment, so the ratio is steadier than a ratio of two
    separately taken minima. Returns (ratio, median first time, median second time).
    """
    first(), second()
    a, b = [], []
    for _ in range(pairs):
        a.append(best_of(first, 1))
        b.append(best_of(second, 1))
    ratios = np.array(a) / np.array(b)
    return float(np.median(ratios)), float(np.median(a)), float(np.median(b))


def long_essay(tokenizer) -> list[int]:
    for name in corpus.essay_names("evaluation"):
        ids = read_traces(f"essay:{name}", tokenizer, LENGTH)[0].token_ids
        if len(ids) == LENGTH:
            print(f"trace: essay:{name}, {LENGTH} tokens", file=sys.stderr)
            return ids
    raise SystemExit("no evaluation essay has 1024 tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="scan 128 tokens and sample 3 naive tokens (~3 min)")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model()
    tracer = Tracer(loaded)
    model = loaded.model
    ids = long_essay(loaded.tokenizer)
    end = START + 128 if args.quick else LENGTH
    pairs = 3 if args.quick else 7

    # X: the scan (clean run included) versus the naive recompute, per token.
    scan_divergence(tracer, ids, START, START + BATCH, DISTANCE, BATCH)  # warm-up
    scan_time = best_of(lambda: scan_divergence(tracer, ids, START, end, DISTANCE, BATCH), 1)
    with torch.no_grad():
        clean_logits = model(torch.tensor([ids])).logits[0].float()
    sample = np.linspace(START, end - 1, 3 if args.quick else 8).astype(int)
    naive_per_token = np.mean(
        [best_of(lambda j=j: naive_token_kl(tracer, ids, int(j), DISTANCE, clean_logits), 1) for j in sample]
    )
    naive_time = naive_per_token * (end - START)
    speedup = naive_time / scan_time
    print(
        f"scan [{START}, {end}) D={DISTANCE}: {scan_time:.1f} s; naive: {naive_per_token:.2f} s/token x "
        f"{end - START} = {naive_time:.1f} s (from {len(sample)} sampled tokens)",
        file=sys.stderr,
    )

    # Y: one batched eviction pass versus a plain forward over the same queries and keys.
    clean = clean_run(tracer, ids[: START + BATCH + DISTANCE], hidden=False)
    times = torch.arange(START, START + BATCH)
    queries = times[:, None] + torch.arange(1, DISTANCE + 1)[None]
    n_cached = START + BATCH
    cached = torch.arange(n_cached).expand(BATCH, -1)
    keys = torch.cat([cached, queries], dim=1)
    valid = torch.cat([cached <= times[:, None], torch.ones_like(queries, dtype=torch.bool)], dim=1)
    specs = [EvictionSpec((int(j),), int(j)) for j in times]
    input_ids = clean.token_ids[queries]

    def traced_pass():
        masks = build_masks(tracer.layout, specs, queries, keys, valid, tracer.dtype)
        tracer.run(input_ids, position_ids=queries, masks=masks, cache=expand_cache(clean.cache, n_cached, BATCH))

    def plain_pass():
        with torch.no_grad():
            model.model(input_ids, position_ids=queries, **cache_argument(expand_cache(clean.cache, n_cached, BATCH)))

    floor_ratio, traced_time, plain_time = paired_ratio(traced_pass, plain_pass, pairs)
    print(
        f"eviction pass {traced_time:.2f} s vs plain forward {plain_time:.2f} s "
        f"({BATCH} rows x {DISTANCE} queries, {n_cached + DISTANCE} keys)",
        file=sys.stderr,
    )

    # Z: every token signal from one traced pass versus a plain eager forward returning the same raw material.
    full = torch.tensor([ids])

    def readout():
        token_signals(tracer, ids)

    def plain_eager():
        with attention_implementation(model, "eager"), torch.no_grad():
            model(full, output_attentions=True, output_hidden_states=True)

    overhead, readout_time, eager_time = paired_ratio(readout, plain_eager, pairs)
    print(
        f"traced readout {readout_time:.2f} s vs plain eager forward {eager_time:.2f} s ({LENGTH} tokens)",
        file=sys.stderr,
    )
    print(f"speedup_scan_vs_naive={speedup:.2f} floor_ratio={floor_ratio:.2f} nnsight_overhead={overhead:.2f}")


if __name__ == "__main__":
    main()
