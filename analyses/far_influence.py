"""Far-distance Forward Influence, the InfoKV paper's protocol: how long do evicted tokens matter?

The paper compresses the first 2048 tokens of a long text and follows the KL of later 128-token
buckets of distance; it reports that high-entropy tokens still matter about 14K tokens later while attention-chosen
tokens fade fast. Here, on every essay of both splits long enough for at least `min_suffix` tokens
after the prefix (no policy is tuned on these numbers), each cut at the model's context:

- the top `fraction` (10%) of the prefix ``0..t`` (t = 2047) is chosen by each selection: the paper's
  entropy (top-256 restricted entropy of the distribution that generated each token), SnapKV's
  window attention, H2O's cumulative attention, the published InfoKV's score (`selections.INFOKV`,
  averaged over layers and KV heads) and a seeded random draw, never among the first sinks;
- each set is evicted at t in every layer and head, and the whole rest of the essay is read against
  the clean run in one batched pass per essay (the suffix in pieces of `chunk` queries over the shared
  cached prefix, `forward_influence.influence.evict`);
- the KL(clean || evicted) of the next-token distributions is averaged in consecutive 128-token
  buckets of distance (`FAR_BUCKET`: 1-128, 129-256, ...), then across essays with 95% percentile-bootstrap intervals
  (``far_influence.csv``: ``selection, bucket_start, bucket_end, kl_mean, kl_ci_low, kl_ci_high,
  n_documents``; fewer essays reach the far buckets, and ``n_documents`` says how many);
- ``far_influence_paired.csv``: per bucket, the entropy set's KL minus each attention set's on the
  same essays (mean and interval), which answers where, if anywhere, entropy overtakes attention;
- ``far_influence.png``: KL per bucket against distance, log scale, one line per selection.

Each essay is cached under ``<out>/cache/<model>/far_influence/`` (resumable) with the seconds it took.

    python -m analyses.far_influence --model smollm2-135m-instruct --out runs/far/smollm2
    python -m analyses.far_influence --model gemma-3-270m --essays worked,popular --out runs/far/gemma
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt

from forward_influence import corpus
from forward_influence.defaults import SINKS
from forward_influence.errors import InputError
from forward_influence.eviction import EvictionSpec
from forward_influence.influence import clean_run, evict
from forward_influence.models import LoadedModel, load_model
from forward_influence.outputs import write_table
from forward_influence.selection import select_top
from forward_influence.signals import token_signals
from forward_influence.sources import DEFAULT_MODEL
from forward_influence.stats import group_ci
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace, read_traces
from kv_compression.names import parse

from .documents import add_shard_option, cache_folder, per_document, quick
from .plotting import distinct_palette, save_figure, theme
from .protocol import FAR_BUCKET, FAR_PREFIX, PAPER_TOP_K
from .selections import INFOKV, LABELS, policy_scores

FAR_SELECTIONS = ("entropy_generated", "attention_snapkv", "attention_h2o", "infokv", "random")
ATTENTION = ("attention_snapkv", "attention_h2o")


def long_essays(tokenizer, context: int, prefix: int, min_suffix: int) -> list[Trace]:
    """Every essay of both splits with at least ``prefix + min_suffix`` tokens, cut at `context`."""
    traces = []
    for name in corpus.essay_names("all"):
        ids = read_traces(f"essay:{name}", tokenizer)[0].token_ids[:context]
        if len(ids) >= prefix + min_suffix:
            traces.append(Trace(f"essay:{name}", ids))
    return traces


def selection_sets(tracer: Tracer, ids: Sequence[int], t: int, fraction: float, model: str, seed: int) -> dict:
    """The top `fraction` of the prefix ``0..t`` by each selection of `FAR_SELECTIONS`."""
    prefix = ids[: t + 1]
    signals = token_signals(tracer, prefix, top_k=PAPER_TOP_K)
    ranking = {name: signals.get(name) for name in FAR_SELECTIONS if name not in ("infokv", "random")}
    ranking["infokv"] = policy_scores(tracer, prefix, parse(INFOKV, model, quiet=True))
    ranking["random"] = None
    return {name: select_top(ranking[name], fraction, t, sinks=SINKS, seed=seed) for name in FAR_SELECTIONS}


def document_frame(
    tracer: Tracer, trace: Trace, fraction: float, t: int, model: str, seed: int, chunk: int
) -> pd.DataFrame:
    """Mean KL per 128-token bucket of distance for each selection on one essay (``seconds``: its cost)."""
    started = time.perf_counter()
    sets = selection_sets(tracer, trace.token_ids, t, fraction, model, seed)
    clean = clean_run(tracer, trace.token_ids, hidden=False)
    specs = [EvictionSpec(positions, t) for positions in sets.values()]
    kl = evict(tracer, clean, specs, len(trace) - t - 1, batch_size=len(specs), hidden=False, chunk=chunk).kl
    rows = []
    for index, selection in enumerate(sets):
        for start in range(0, kl.shape[1], FAR_BUCKET):
            values = kl[index, start : start + FAR_BUCKET]
            rows.append(
                dict(
                    document=trace.id,
                    selection=selection,
                    bucket_start=start + 1,
                    bucket_end=start + len(values),
                    kl=float(np.mean(values)),
                )
            )
    return pd.DataFrame(rows).assign(seconds=time.perf_counter() - started)


def summarize(per_document_frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, paired): mean KL per selection and bucket with intervals across essays, and the entropy
    set's KL minus each attention set's on the same essays."""
    full = per_document_frame[per_document_frame.bucket_end - per_document_frame.bucket_start == FAR_BUCKET - 1]
    table = group_ci(full, ["selection", "bucket_start", "bucket_end"], ["kl"]).rename(columns={"n": "n_documents"})
    table = table[["selection", "bucket_start", "bucket_end", "kl_mean", "kl_ci_low", "kl_ci_high", "n_documents"]]
    wide = full.pivot_table(index=["document", "bucket_start", "bucket_end"], columns="selection", values="kl")
    differences = [
        pd.DataFrame(
            {
                "against": other,
                "bucket_start": wide.index.get_level_values("bucket_start"),
                "bucket_end": wide.index.get_level_values("bucket_end"),
                "difference": (wide["entropy_generated"] - wide[other]).to_numpy(),
            }
        )
        for other in ATTENTION
        if other in wide
    ]
    paired = group_ci(
        pd.concat(differences, ignore_index=True), ["against", "bucket_start", "bucket_end"], ["difference"]
    ).rename(columns={"n": "n_documents"})
    return table, paired


def plot(table: pd.DataFrame, title: str, path: Path) -> list[Path]:
    """KL per bucket against distance (log y), one line per selection with its 95% band."""
    theme()
    fig, ax = plt.subplots(figsize=(11, 5), layout="constrained")
    palette = distinct_palette(table.selection).values()
    for color, (selection, rows) in zip(palette, table.groupby("selection", sort=False)):
        x = (rows.bucket_start + rows.bucket_end) / 2
        ax.plot(x, rows.kl_mean, color=color, label=LABELS.get(selection, selection), linewidth=1.6)
        ax.fill_between(x, rows.kl_ci_low, rows.kl_ci_high, color=color, alpha=0.15, linewidth=0)
    ax.set_yscale("log")
    ax.set_xlabel("distance after the eviction time t (tokens; 128-token buckets)")
    ax.set_ylabel("KL(clean || evicted) (nats / token)")
    ax.legend(title="evicted top 10% of the prefix by", fontsize=8)
    twin = ax.twinx()
    counts = table.groupby("bucket_start").n_documents.max()
    twin.step(counts.index, counts.to_numpy(), where="post", color="0.6", linewidth=0.8)
    twin.set_ylabel("essays reaching the bucket", color="0.5")
    twin.grid(False)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def run(
    model: str | LoadedModel,
    out: Path,
    fraction: float = 0.1,
    prefix: int = FAR_PREFIX,
    min_suffix: int = 2048,
    chunk: int = 1024,
    seed: int = 0,
    traces: Sequence[Trace] | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    essays: Sequence[str] | None = None,
) -> dict[str, pd.DataFrame] | Path:
    """Measure every long essay, or the named `essays` among them (cached), and write the tables and
    the figure to `out`."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    tracer = Tracer(loaded)
    context = loaded.model.config.get_text_config(decoder=True).max_position_embeddings
    traces = traces or long_essays(loaded.tokenizer, context, prefix, min_suffix)
    if essays:
        known = {trace.id.removeprefix("essay:"): trace for trace in traces}
        unknown = [name for name in essays if name not in known]
        if unknown:
            raise InputError(
                f"--essays: {', '.join(unknown)} not among the essays with {prefix + min_suffix}+ tokens "
                f"({', '.join(known)})"
            )
        traces = [known[name] for name in essays]
    t = prefix - 1
    key = dict(
        selections=list(FAR_SELECTIONS), fraction=fraction, t=t, seed=seed, infokv=repr(parse(INFOKV, quiet=True))
    )
    folder = cache_folder(out, loaded.name) / "far_influence"
    frame = per_document(
        traces,
        lambda trace: document_frame(tracer, trace, fraction, t, loaded.name, seed, chunk),
        folder,
        key,
        "far influence",
        progress,
        shard,
    )
    if shard is not None:  # the shard contract (`documents.shard_of`)
        return folder
    table, paired = summarize(frame)
    write_table(frame, out / "far_influence_per_document.csv")
    write_table(table, out / "far_influence.csv")
    write_table(paired, out / "far_influence_paired.csv")
    hours = frame.groupby("document").seconds.first().sum() / 3600
    plot(
        table,
        f"{loaded.name}: the top {fraction:.0%} of the first {prefix} tokens evicted at t = {t}; "
        f"{len(traces)} essays, mean KL per 128-token bucket of distance, 95% CI across essays ({hours:.1f} CPU hours)",
        out / "far_influence",
    )
    return dict(far_influence=table, far_influence_paired=paired, far_influence_per_document=frame)


def main(argv: list[str] | None = None) -> None:
    small = quick()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--prefix", type=int, default=256 if small else FAR_PREFIX, help="tokens compressed (default 2048)"
    )
    parser.add_argument(
        "--min-suffix",
        type=int,
        default=256 if small else 2048,
        help="tokens an essay needs after the prefix (default 2048)",
    )
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the prefix evicted (default 0.1)")
    parser.add_argument("--chunk", type=int, default=1024, help="query positions per pass (memory; default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/far_influence"))
    parser.add_argument(
        "--essays",
        type=lambda text: [name for name in text.split(",") if name],
        default=None,
        help="comma-separated essay names: measure only these (default: every essay long enough)",
    )
    add_shard_option(parser)
    args = parser.parse_args(argv)
    try:
        tables = run(
            args.model,
            args.out,
            args.fraction,
            args.prefix,
            args.min_suffix,
            args.chunk,
            args.seed,
            shard=args.shard,
            essays=args.essays,
        )
    except InputError as error:
        parser.error(str(error))
    if args.shard is not None:
        print(tables)
        return
    print(tables["far_influence_paired"].to_string(index=False, float_format="{:.3g}".format))
    print(args.out / "far_influence.csv")


if __name__ == "__main__":
    main()
