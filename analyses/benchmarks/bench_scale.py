"""Scaling benchmark: what the toolkit's main jobs cost as the context grows, against plain transformers.

    python analyses/benchmarks/bench_scale.py [--model NAME | --config NAME] [--lengths 1024,2048,...]
        [--device cpu] [--dtype float32] [--quick] [--out DIR]

For each context length n, each job runs once on n random token ids (time and memory do not depend on
the tokens' values) beside its plain transformers baseline on the same tokens and device, measured
just before it; the ratios are the result (these machines are noisy, one run gives them together):

- ``readout``: the token signals `forward-influence score` reads (top-k and full entropies, window and
  cumulative attention, representation change), against one forward pass over the n tokens;
- ``eviction``: the far protocol's unit: 5 sets of 10% of the first quarter's tokens evicted at
  t = n/4 - 1 and the rest read in one batched pass over the cached prefix (1024 queries at a time),
  against one forward pass;
- ``scan_exact``: the exact per-token scan, `SCANNED` tokens before t each evicted alone and read over
  `DISTANCE` positions (the cost per token is the time over `SCANNED`), against one forward pass;
- ``scan_gradient``: the gradient estimate of every token before t (`forward_influence.gradient`,
  distance `DISTANCE`), against one forward pass;
- ``prefill_infokv``: a prefill that records, scores and evicts to 25% with the published InfoKV,
  against a plain prefill into a `DynamicCache`;
- ``decode``: `NEW_TOKENS` greedy tokens after the n-token prompt with InfoKV at a 25% budget
  (compression interval 128), against the same with the full cache.

The jobs that share the forward pass as their baseline share its one measurement at each length.

`--config NAME` builds the model from a configuration in ``configs/`` (or a JSON path) with random
weights (`forward_influence.models.random_model`): the paper's model sizes measured on any machine with
the memory, nothing downloaded. Memory is the peak over the memory in use before the job: on CUDA the
allocator's peak; on a CPU the peak resident memory (the script re-runs itself with glibc returning
every large block to the system, so resident memory follows live memory).

Writes ``scale.csv`` (a row per length and job: seconds and peak MB of the job and its baseline, and
their ratios), ``growth.csv`` (per job, the exponent k of a fit ``seconds ~ n^k`` over the lengths, for
the job and its baseline, and of the peak memory, with the two-term fit ``seconds = a n + b n^2``
checked on the longest length from the others) and ``scale.png``. A run resumes: ``scale.csv`` is
written after each job, and the jobs already in it at a length are kept (each row's job and baseline
were measured together) and not measured again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from analyses.plotting import save_figure, theme  # noqa: E402
from forward_influence.defaults import GRADIENT_SAMPLES  # noqa: E402
from forward_influence.eviction import EvictionSpec  # noqa: E402
from forward_influence.gradient import gradient_influence  # noqa: E402
from forward_influence.influence import clean_run, evict  # noqa: E402
from forward_influence.memory import Peak, device_memory, estimate  # noqa: E402
from forward_influence.models import LoadedModel, cache_argument, load_model, random_model  # noqa: E402
from forward_influence.scan import scan_at  # noqa: E402
from forward_influence.signals import token_signals  # noqa: E402
from forward_influence.sources import DEFAULT_MODEL  # noqa: E402
from forward_influence.tracer import Tracer  # noqa: E402
from kv_compression.budget import Budget  # noqa: E402
from kv_compression.policies import InfoKV  # noqa: E402
from kv_compression.runtime import CompressedCache, compressing, generate  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
SETS, SET_SHARE, QUERY_CHUNK = 5, 0.1, 1024
SCANNED, DISTANCE = 16, 64
NEW_TOKENS, BUDGET, BUFFER = 512, "0.25", 128
# The warm-up's context: the lazy initialisation a first call pays for does not grow with the length,
# and warming at the first measured length would double a resumed run that starts at the longest one.
WARM_TOKENS = 128
JOBS = ("readout", "eviction", "scan_exact", "scan_gradient", "prefill_infokv", "decode")
PREFIXED = {"eviction", "scan_exact", "scan_gradient"}  # the jobs that start from a cached prefix
# What each job holds at its peak, in the terms of `forward_influence.memory.estimate`.
RUNS = {
    "readout": dict(run="readout", attention=True),
    "eviction": dict(run="replay", batch_size=SETS, chunk=QUERY_CHUNK),
    "scan_exact": dict(run="replay", batch_size=16, chunk=DISTANCE),
    "scan_gradient": dict(run="replay", batch_size=GRADIENT_SAMPLES, chunk=DISTANCE),
    "prefill_infokv": dict(run="readout", attention=False),
    "decode": dict(run="readout", attention=False),
}
MALLOC = "MALLOC_MMAP_THRESHOLD_"


class Meter:
    """Time and peak memory of one call on a device (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def _resident(self, field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return float(line.split()[1]) * 1024
        raise RuntimeError(field)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        """``(seconds, peak MB over the memory in use before)`` of ``fn()``."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the resident peak to the current size
            before = self._resident("VmRSS")
        started = time.perf_counter()
        fn()  # the weights are frozen: only what a job asks gradients of builds a graph
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() if self.cuda else self._resident("VmHWM")
        return seconds, max(peak - before, 0.0) / 2**20


def jobs(
    loaded: LoadedModel, n: int, quick: bool, names: Collection[str] = JOBS
) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """The jobs `names` of the module docstring at length `n`, each with its baseline, in `JOBS` order:
    ``{name: (job, baseline)}``. The cached prefix the eviction jobs start from (a clean run over the n
    tokens, as long as a forward pass) is built only when one of them is asked for."""
    model, tracer = loaded.model, Tracer(loaded)
    device = model.device
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n))
    t = n // 4 - 1
    new_tokens = 16 if quick else NEW_TOKENS
    generator = np.random.default_rng(0)
    sets = [
        EvictionSpec(tuple(sorted(generator.choice(np.arange(4, t + 1), int(SET_SHARE * (t + 1)), replace=False))), t)
        for _ in range(SETS)
    ]

    def forward() -> None:
        model(ids[None].to(device), **cache_argument(DynamicCache()), logits_to_keep=1)

    def prefill_infokv() -> None:
        cache = CompressedCache(model, InfoKV(), Budget.parse(BUDGET))
        with compressing(model, cache):
            model(ids[None].to(device), **cache_argument(cache), logits_to_keep=1)
            cache.maybe_compress()

    def decode(policy: InfoKV | None) -> Callable[[], None]:
        def run() -> None:
            if policy is None:
                model.generate(
                    ids[None].to(device), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                )
            else:
                generate(
                    model,
                    ids,
                    policy,
                    Budget.parse(BUDGET),
                    buffer=BUFFER,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                )

        return run

    clean = None
    if PREFIXED & set(names):
        with torch.no_grad():
            clean = clean_run(tracer, ids, hidden=False)
    scanned = range(t - SCANNED, t)
    every = {
        "readout": (lambda: token_signals(tracer, ids), forward),
        "eviction": (
            lambda: evict(tracer, clean, sets, n - t - 1, batch_size=SETS, hidden=False, chunk=QUERY_CHUNK),
            forward,
        ),
        "scan_exact": (lambda: scan_at(tracer, clean, t, scanned, DISTANCE), forward),
        "scan_gradient": (lambda: gradient_influence(tracer, clean, t, DISTANCE), forward),
        "prefill_infokv": (prefill_infokv, forward),
        "decode": (decode(InfoKV()), decode(None)),
    }
    return {name: every[name] for name in JOBS if name in names}


def measure(
    loaded: LoadedModel,
    lengths: list[int],
    device: str,
    dtype: str,
    quick: bool,
    done: pd.DataFrame | None = None,
    save: Callable[[pd.DataFrame], None] = lambda table: None,
) -> pd.DataFrame:
    """One row per length and job (see the module docstring), with ``estimated_mb``, the memory
    guard's estimate of the job's peak beyond the weights (recomputed for the rows of `done`: it
    follows the configuration, not the run); a job whose estimate exceeds the device's memory is not
    run (its row says so in ``skipped``). Every job runs once untimed before its first
    measurement, on a `WARM_TOKENS`-token context (the first call of a path pays for lazy
    initialisation). The rows of `done` (an earlier run's, each job measured beside its own baseline)
    are kept and their jobs not measured again at their length; `save` receives the table after each
    job, so a run stopped midway resumes from there."""
    meter, memory, config = Meter(device), device_memory(device), loaded.model.config

    def peak(n: int, name: str) -> Peak:
        return estimate(config, n, dtype=dtype, **RUNS[name])

    rows = [] if done is None else done.to_dict("records")
    for row in rows:
        row["estimated_mb"] = peak_mb(peak(row["tokens"], row["job"]))
    measured = {(row["tokens"], row["job"]) for row in rows}
    todo = [(n, name) for n in lengths for name in JOBS if (n, name) not in measured]
    if todo:
        warm = set()  # a baseline shared by several jobs (the plain forward) is warmed once, like each job
        for name, (job, baseline) in jobs(loaded, WARM_TOKENS, True, {name for _, name in todo}).items():
            for key, fn in ((baseline.__qualname__, baseline), (name, job)):
                if key not in warm:
                    fn()
                    warm.add(key)
    with tqdm(total=len(todo), desc="scale", unit="job") as bar:
        for n in sorted({n for n, _ in todo}):
            baselines = {}  # jobs with the same baseline (the plain forward) share its measurement at a length
            remaining = [name for name in JOBS if (n, name) not in measured]
            for name, (job, baseline) in jobs(loaded, n, quick, remaining).items():
                needed = peak(n, name)
                row = dict(model=loaded.name, device=device, dtype=dtype, tokens=n, job=name)
                row["estimated_mb"] = peak_mb(needed)
                if memory is not None and needed.total > memory:
                    rows.append(dict(row, skipped=f"the estimate, {needed.total / 2**30:.0f} GiB, does not fit"))
                else:
                    if baseline not in baselines:
                        baselines[baseline] = meter(baseline)
                    base_seconds, base_mb = baselines[baseline]
                    seconds, mb = meter(job)
                    rows.append(
                        dict(
                            row,
                            seconds=seconds,
                            peak_mb=mb,
                            baseline_seconds=base_seconds,
                            baseline_peak_mb=base_mb,
                            time_ratio=seconds / base_seconds,
                            memory_ratio=mb / base_mb if base_mb > 0 else np.nan,
                            skipped="",
                        )
                    )
                save(ordered(rows))
                bar.update()
    return ordered(rows)


def peak_mb(peak: Peak) -> float:
    """The estimated peak beyond the weights, in MB (the measured peaks' unit: the weights are loaded
    before a job starts)."""
    return (peak.total - peak.weights) / 2**20


def ordered(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table by length, then in `JOBS` order (a resumed length's jobs arrive last)."""
    table = pd.DataFrame(rows)
    return table.iloc[np.lexsort((table.job.map(JOBS.index), table.tokens))].reset_index(drop=True)


def exponent(n: np.ndarray, values: np.ndarray) -> float:
    """k of ``values ~ n^k``: the least-squares slope in log-log."""
    keep = values > 0
    return float(np.polyfit(np.log(n[keep]), np.log(values[keep]), 1)[0]) if keep.sum() >= 2 else np.nan


def two_term(n: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` of ``seconds = a n + b n^2`` (non-negative least squares)."""
    from scipy.optimize import nnls

    coefficients, _ = nnls(np.stack([n, n**2], axis=1).astype(float), seconds.astype(float))
    return float(coefficients[0]), float(coefficients[1])


def growth(table: pd.DataFrame) -> pd.DataFrame:
    """Per job: the growth exponents of its time, its baseline's and its peak memory, and the two-term
    fit on every length but the longest with its relative error there (NaN with fewer than 3 lengths)."""
    rows = []
    for job, group in table[table.skipped.fillna("") == ""].groupby("job", sort=False):
        group = group.sort_values("tokens")
        n, seconds = group.tokens.to_numpy(), group.seconds.to_numpy()
        error, share = np.nan, np.nan
        if len(group) >= 3:
            a, b = two_term(n[:-1], seconds[:-1])
            error = float((a * n[-1] + b * n[-1] ** 2) / seconds[-1] - 1)
        a, b = two_term(n, seconds)
        if a + b > 0:
            share = float(b * n[-1] ** 2 / (a * n[-1] + b * n[-1] ** 2))
        rows.append(
            dict(
                job=job,
                lengths=len(group),
                time_exponent=exponent(n, seconds),
                baseline_time_exponent=exponent(n, group.baseline_seconds.to_numpy()),
                memory_exponent=exponent(n, group.peak_mb.to_numpy()),
                quadratic_share_at_longest=share,
                longest_predicted_error=error,
            )
        )
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path) -> list[Path]:
    """Time and peak memory ratios against the length, one line per job (log x)."""
    import seaborn as sns
    from matplotlib.ticker import FuncFormatter, NullFormatter

    theme()
    long = table.melt(
        id_vars=["tokens", "job"], value_vars=["time_ratio", "memory_ratio"], var_name="ratio", value_name="value"
    )
    grid = sns.relplot(
        long,
        x="tokens",
        y="value",
        hue="job",
        col="ratio",
        kind="line",
        marker="o",
        height=3.2,
        aspect=1.2,
        facet_kws=dict(sharey=False),
    )
    grid.set(xscale="log", yscale="log")
    grid.set_axis_labels("context length (tokens)", "job / plain transformers")
    lengths = sorted(table.tokens.unique())
    for ax in grid.axes.flat:  # the measured lengths and plain ratios, not a log axis's powers of ten
        ax.set_xticks(lengths, [f"{n / 1024:g}k" if n >= 1024 else str(n) for n in lengths])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(NullFormatter())
    first = table.iloc[0]
    grid.figure.suptitle(
        f"{first['model']} on {first['device']} ({first['dtype']}): cost against the plain forward", fontsize=10
    )
    grid.figure.subplots_adjust(top=0.85)
    return save_figure(grid.figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help=f"an embedded model or any model id (default {DEFAULT_MODEL})")
    source.add_argument("--config", default=None, help="a configuration in configs/ (e.g. llama-3.1-8b) or a JSON path")
    parser.add_argument("--lengths", default=None, help="comma-separated context lengths (default 1024,2048,4096,8192)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--quick", action="store_true", help="lengths 256,512 and 16 decoded tokens")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/scale/<model>)")
    args = parser.parse_args(argv)
    try:
        lengths = [int(x) for x in (args.lengths or ("256,512" if args.quick else "1024,2048,4096,8192")).split(",")]
    except ValueError:
        parser.error(f"--lengths: comma-separated integers, got {args.lengths!r}")
    if any(n < 64 for n in lengths):
        parser.error("--lengths: every length must be at least 64 tokens")
    config = None
    if args.config is not None:
        config = Path(args.config) if args.config.endswith(".json") else CONFIGS / f"{args.config}.json"
        if not config.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
            parser.error(f"--config: no configuration {args.config!r}; choose from {known} or give a JSON path")
    if config is not None:
        loaded = random_model(config, args.dtype, args.device)
    else:
        loaded = load_model(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device)
    out = args.out or Path("runs/scale") / loaded.name
    out.mkdir(parents=True, exist_ok=True)
    done = pd.read_csv(out / "scale.csv") if (out / "scale.csv").is_file() else None

    def save(rows: pd.DataFrame) -> None:
        rows.to_csv(out / "scale.csv", index=False)

    table = measure(loaded, sorted(lengths), args.device, args.dtype, args.quick, done, save)
    save(table)  # the resumed rows' estimates, recomputed, even when nothing was left to measure
    fits = growth(table)
    fits.to_csv(out / "growth.csv", index=False)
    plot(table, out / "scale")
    print(table[["tokens", "job", "seconds", "time_ratio", "peak_mb", "memory_ratio"]].to_string(index=False))
    print(fits.to_string(index=False, float_format="{:.2f}".format))
    print(out / "scale.csv")


if __name__ == "__main__":
    if "cuda" not in " ".join(sys.argv) and os.environ.get(MALLOC) is None:
        os.environ[MALLOC] = "65536"  # glibc reads it at start: run again so that freed blocks leave the process
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
