"""How well the gradient estimate of every token's influence matches the exact scan, and how much faster it is.

On each evaluation document (the fidelity task's: a 1024-token prefix and the tokens after it), every
prefix token's influence at the common eviction time t = 1023 is computed twice, in one run: exactly,
each token evicted alone and replayed (`forward_influence.scan.scan_at`, distances 1-64, as the
oracle and `analyses.learned` read it), and estimated from the gates' gradients
(`forward_influence.gradient`, one forward pass per distance bucket). Both are timed in CPU seconds.

- ``gradient_vs_exact_per_document.csv``: per document, the Spearman correlation of the estimate with
  the exact ``fi_near`` and ``fi_far``, the overlap of their top 10% (the share of the exact top 10%
  that the estimate also ranks in its top 10%), and both times. Most single tokens change the KL by
  less than float32 resolves: their exact KL is 0 or a few rounding steps of float32 (multiples of
  its epsilon, 1.2e-7), so their exact order is a tie. ``resolved_share_<bucket>`` gives the share of
  tokens whose exact KL is above `RESOLVED_KL` and ``spearman_resolved_<bucket>`` the correlation
  among those;
- ``gradient_vs_exact.csv``: the mean of each over documents with its 95% interval
  (`forward_influence.stats.mean_ci`), and
  ``speed_ratio``, the exact CPU time over the gradient's summed over documents;
- ``gradient_vs_exact.png``: the estimate against the exact ``fi_far`` of every token (rank space,
  a colour per document).

Per-document rows are cached under ``<out>/cache/<model>/gradient/``; ``--shard I/N`` as elsewhere.

    python -m analyses.gradient_influence --model smollm2-135m-instruct --docs 8 \\
        --out data/results/smollm2-135m-instruct/set-level
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import pyplot as plt
from scipy import stats

from forward_influence.defaults import GRADIENT_SAMPLES
from forward_influence.gradient import gradient_influence
from forward_influence.influence import clean_run
from forward_influence.models import LoadedModel, load_model
from forward_influence.outputs import write_table
from forward_influence.scan import fi_summary
from forward_influence.sources import DEFAULT_MODEL
from forward_influence.stats import group_ci
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace

from .documents import add_shard_option, cache_folder, per_document
from .learned import evaluation_documents, influence_scan
from .plotting import save_figure, theme
from .protocol import INFLUENCE_DISTANCE, PREFIX

BUCKETS = ("fi_near", "fi_far")
TOP_SHARE = 0.1  # the top tokens whose overlap is reported
# An exact KL of 100 float32 epsilons moves in rounding steps of about a percent of itself; below it
# the KL is a few steps, and tokens tie (the vertical stripes of the figure).
RESOLVED_KL = 100 * float(np.finfo(np.float32).eps)


def top_overlap(estimate: np.ndarray, exact: np.ndarray, share: float = TOP_SHARE) -> float:
    """The share of `exact`'s top `share` of tokens that `estimate` also ranks in its top `share`."""
    k = max(1, int(round(share * len(exact))))
    return len(set(np.argsort(-estimate)[:k]) & set(np.argsort(-exact)[:k])) / k


def document_tokens(tracer: Tracer, document: Trace, samples: int) -> pd.DataFrame:
    """Per prefix token: the exact and estimated ``fi_near`` / ``fi_far`` and the CPU seconds of each
    method (the same on every row)."""
    ids = list(document.token_ids[: PREFIX + INFLUENCE_DISTANCE])
    started = time.process_time()
    exact = fi_summary(influence_scan(tracer, ids, None).drop(columns="position").to_numpy())
    exact_seconds = time.process_time() - started
    started = time.process_time()
    clean = clean_run(tracer, ids, hidden=False)
    estimate = gradient_influence(tracer, clean, PREFIX - 1, INFLUENCE_DISTANCE, samples).per_token()
    gradient_seconds = time.process_time() - started
    return pd.DataFrame(
        {
            "document": document.id,
            "position": np.arange(PREFIX),
            **{f"exact_{b}": exact[b].to_numpy() for b in BUCKETS},
            **{f"gradient_{b}": estimate[b].to_numpy() for b in BUCKETS},
            "exact_seconds": exact_seconds,
            "gradient_seconds": gradient_seconds,
        }
    )


def per_document_comparison(tokens: pd.DataFrame) -> pd.DataFrame:
    """One row per document: Spearman and top-10% overlap per bucket, and the two times."""
    rows = []
    for document, group in tokens.groupby("document", sort=False):
        row = dict(document=document)
        for bucket in BUCKETS:
            exact, estimate = group[f"exact_{bucket}"].to_numpy(), group[f"gradient_{bucket}"].to_numpy()
            row[f"spearman_{bucket}"] = stats.spearmanr(estimate, exact).statistic
            row[f"top10_overlap_{bucket}"] = top_overlap(estimate, exact)
            resolved = exact > RESOLVED_KL
            row[f"resolved_share_{bucket}"] = resolved.mean()
            row[f"spearman_resolved_{bucket}"] = stats.spearmanr(estimate[resolved], exact[resolved]).statistic
        row.update(exact_seconds=group.exact_seconds.iloc[0], gradient_seconds=group.gradient_seconds.iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def summary(per_document: pd.DataFrame) -> pd.DataFrame:
    """Means over documents with 95% intervals, and the speed ratio of the summed CPU times."""
    metrics = [c for c in per_document.columns if c.startswith(("spearman_", "top10_overlap_", "resolved_share_"))]
    table = group_ci(per_document.assign(all="all"), ["all"], metrics).drop(columns="all")
    table = table.rename(columns={"n": "n_documents"})
    return table.assign(speed_ratio=per_document.exact_seconds.sum() / per_document.gradient_seconds.sum())


def plot(tokens: pd.DataFrame, title: str, path: Path) -> list[Path]:
    """The estimate against the exact ``fi_far`` of every token, as ranks within its document."""
    theme()
    ranks = tokens.assign(
        exact=tokens.groupby("document").exact_fi_far.rank(pct=True),
        estimate=tokens.groupby("document").gradient_fi_far.rank(pct=True),
    )
    fig, ax = plt.subplots(figsize=(5.5, 5), layout="constrained")
    sns.scatterplot(ranks, x="exact", y="estimate", hue="document", s=6, alpha=0.4, linewidth=0, ax=ax, legend=False)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("exact fi_far (rank within its document)")
    ax.set_ylabel("gradient estimate (rank within its document)")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def compare(
    loaded: LoadedModel,
    docs: int,
    out: Path,
    samples: int = GRADIENT_SAMPLES,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Every token's exact and estimated influence on the `docs` evaluation documents (cached per
    document)."""
    tracer = Tracer(loaded)
    return per_document(
        evaluation_documents(loaded.tokenizer, docs),
        lambda document: document_tokens(tracer, document, samples),
        cache_folder(out, loaded.name) / "gradient",
        dict(time=PREFIX - 1, distance=INFLUENCE_DISTANCE, samples=samples),
        "gradient vs exact",
        progress,
        shard,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--docs", type=int, default=8, help="evaluation documents (default 8)")
    parser.add_argument("--samples", type=int, default=GRADIENT_SAMPLES, help="sampled continuations per bucket")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_shard_option(parser)
    args = parser.parse_args(argv)
    if args.docs < 2:
        parser.error(f"--docs: the intervals over documents need at least 2, not {args.docs}")
    if args.samples < 1:
        parser.error(f"--samples must be at least 1, not {args.samples}")
    tokens = compare(load_model(args.model), args.docs, args.out, args.samples, args.shard)
    if args.shard is not None:
        print(cache_folder(args.out, args.model) / "gradient")
        return
    per_doc = per_document_comparison(tokens)
    table = summary(per_doc)
    write_table(per_doc, args.out / "gradient_vs_exact_per_document.csv")
    write_table(table, args.out / "gradient_vs_exact.csv")
    plot(tokens, f"{args.model}: gradient estimate vs exact, {len(per_doc)} documents", args.out / "gradient_vs_exact")
    print(table.T.to_string(header=False, float_format="{:.3f}".format))
    print(args.out / "gradient_vs_exact.csv")


if __name__ == "__main__":
    main()
