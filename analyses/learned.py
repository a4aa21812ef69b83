"""The learned policy: a transparent score fitted to measured Forward Influence, and how well it ranks.

Data. On each document (a `PREFIX`-token segment of the calibration essays for training, of the
evaluation essays for evaluation) every token of the prefix is evicted alone at the compression time
t = PREFIX - 1 and its far Forward Influence measured: ``fi_far``, the mean KL over distances 33-64
(`forward_influence.scan.scan_at`; cached per document under ``<out>/cache/<model>/scans/``, so a run
resumes). The online signals of every token, layer and KV head come from one offline observation
(`kv_compression.policies.learned.token_features`), ranked among each layer's tokens.

Training (`train`, ``forward-influence learn``): ridge regressions (scikit-learn) of each token's rank
of ``fi_far`` within its document on its signals' ranks averaged over the KV heads and over the
layers of a band, one sample per token, the newest `WINDOW` tokens left out (the policy keeps them).
The number of bands (one for all full-attention layers, three, or one per layer) and the ridge
penalty are chosen by leave-one-document-out Spearman correlation of the score with ``fi_far``,
reported beside the window and cumulative attention's on the same held-out documents. The weights,
the choice and every cross-validated number go to ``learned/<model>.json``.

Evaluation (`ranking`): the same Spearman correlation on evaluation documents for the learned policy,
H2O, SnapKV, InfoKV (published and calibrated) and Expected Attention, per document and paired
against the learned one; `plot_weights` draws which signals matter in which band of layers. The
evaluation scans are the costly part (about 10 CPU minutes a document on SmolLM2, 20 on Gemma):
``--shard I/N`` measures every N-th from the I-th into the cache (`fill_scans`) and writes no table,
and `analyses.headroom` reads the same scans.

    forward-influence learn --model smollm2-135m-instruct --docs 8
    python -m analyses.learned --model smollm2-135m-instruct --docs 16 --out data/results/smollm2-135m-instruct/learned
    python -m analyses.learned --model gemma-3-270m --docs 16 --out runs/learned/gemma --shard 0/2
    python -m analyses.learned --model gemma-3-270m --weights-only --out data/results/gemma-3-270m/learned
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from scipy import stats
from sklearn.linear_model import Ridge
from tqdm.auto import tqdm

from forward_influence.defaults import FAR_FROM, WINDOW
from forward_influence.influence import clean_run
from forward_influence.models import LoadedModel, load_model
from forward_influence.outputs import atomic_open, write_table
from forward_influence.scan import fi_summary, scan_at
from forward_influence.sources import DEFAULT_MODEL
from forward_influence.stats import group_ci
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from kv_compression.kept import layer_scores, mean_token_scores
from kv_compression.names import parse
from kv_compression.offline import observation
from kv_compression.policies import Learned
from kv_compression.policies.learned import FEATURES, band, token_features
from kv_compression.tuned import read

from . import cache
from .documents import add_shard_option, cache_folder, essay_segments, shard_of
from .plotting import save_figure, theme, weights_figure_height, weights_heatmap
from .protocol import CONTINUATION, INFLUENCE_DISTANCE, PREFIX

ALPHAS = (1.0, 10.0, 100.0, 1000.0)
RANKED = ("learned", "h2o", "snapkv", "infokv", "infokv-calibrated", "expected-attention")


def influence_scan(
    tracer: Tracer, ids: Sequence[int], folder: Path | None, prefix: int = PREFIX, distance: int = INFLUENCE_DISTANCE
) -> pd.DataFrame:
    """KL ``kl_1 .. kl_D`` of each prefix token evicted alone at t = prefix - 1, one row per position."""
    ids = list(ids[: prefix + distance])
    key = dict(model=tracer.name, time=prefix - 1, distance=distance, tokens=ids)

    def compute() -> pd.DataFrame:
        kl = scan_at(tracer, clean_run(tracer, ids, hidden=False), prefix - 1, range(prefix), distance).kl
        frame = pd.DataFrame(kl.astype(np.float64), columns=[f"kl_{d}" for d in range(1, distance + 1)])
        frame.insert(0, "position", np.arange(prefix))
        return frame

    return cache.cached(folder, key, compute)


def far_influence(scan: pd.DataFrame) -> np.ndarray:
    """``fi_far`` of each position of an `influence_scan` (`forward_influence.scan.fi_summary`)."""
    return fi_summary(scan[[c for c in scan.columns if c.startswith("kl_")]].to_numpy())["fi_far"].to_numpy()


def document_rows(
    tracer: Tracer, trace: Trace, folder: Path | None, prefix: int = PREFIX, distance: int = INFLUENCE_DISTANCE
) -> pd.DataFrame:
    """One row per token of one document: its head-averaged ranked signals in every full-attention
    layer (columns ``<signal>@<i>`` for the i-th such layer), its ``fi_far`` and its rank in the
    document (``target``, in [0, 1]); the newest WINDOW tokens are left out (the policy keeps them)."""
    path = None if folder is None else folder / cache.file_name(trace.id)
    target = far_influence(influence_scan(tracer, trace.token_ids, path, prefix, distance))
    obs = observation(tracer, trace.token_ids[:prefix], [Learned()])
    features = token_features(obs)[0]  # [full layers, tokens, signals]
    layers, tokens, _ = features.shape
    columns = [f"{name}@{layer}" for layer in range(layers) for name in FEATURES]
    rows = pd.DataFrame(features.permute(1, 0, 2).reshape(tokens, -1).cpu().numpy(), columns=columns)
    kept = prefix - WINDOW
    rank = stats.rankdata(target[:kept]) - 1
    rows = rows.iloc[:kept].assign(position=np.arange(kept), fi_far=target[:kept], target=rank / (kept - 1))
    return rows.assign(document=trace.id)


def design(rows: pd.DataFrame, bands: int) -> np.ndarray:
    """The features of `bands` bands of layers: each signal's mean over the band's layers, ``[rows,
    bands * signals]`` (band-major, as the policy's weights)."""
    layers = sum(c.startswith(f"{FEATURES[0]}@") for c in rows.columns)
    blocks = []
    for b in range(bands):
        members = [layer for layer in range(layers) if band(layer, layers, bands) == b]
        blocks.append(
            np.stack(
                [rows[[f"{name}@{layer}" for layer in members]].mean(axis=1).to_numpy() for name in FEATURES], axis=1
            )
        )
    return np.concatenate(blocks, axis=1)


def cross_validate(rows: pd.DataFrame, bands_options: Sequence[int]) -> pd.DataFrame:
    """Leave-one-document-out Spearman with ``fi_far`` of every (bands, alpha) and of the attention
    signals alone (their all-layer rank averages)."""
    results = []
    for held in rows.document.unique():
        train, test = rows[rows.document != held], rows[rows.document == held]
        for bands, alpha in itertools.product(bands_options, ALPHAS):
            model = Ridge(alpha=alpha).fit(design(train, bands), train.target)
            rho = stats.spearmanr(model.predict(design(test, bands)), test.fi_far).statistic
            results.append(
                dict(document=held, model=f"bands={bands},alpha={alpha}", bands=bands, alpha=alpha, spearman=float(rho))
            )
        for name in ("attention_cumulative", "attention_window"):
            score = design(test, 1)[:, FEATURES.index(name)]
            results.append(
                dict(document=held, model=name, spearman=float(stats.spearmanr(score, test.fi_far).statistic))
            )
    return pd.DataFrame(results)


def train(
    loaded: LoadedModel,
    docs: int,
    out: Path,
    cache_root: Path | None = None,
    progress: bool = True,
    documents: Sequence[Trace] | None = None,
    prefix: int = PREFIX,
    distance: int = INFLUENCE_DISTANCE,
) -> dict:
    """Fit the learned policy on `docs` calibration documents (or the given `documents`); write and
    return its JSON content."""
    tracer = Tracer(loaded)
    folder = None if cache_root is None else cache_folder(cache_root, loaded.name) / "scans" / "calibration"
    documents = documents or essay_segments(loaded.tokenizer, docs, prefix + distance, split="calibration")
    rows = pd.concat(
        [
            document_rows(tracer, d, folder, prefix, distance)
            for d in tqdm(documents, desc="learn", disable=not progress)
        ],
        ignore_index=True,
    )
    layers = sum(c.startswith(f"{FEATURES[0]}@") for c in rows.columns)
    scores = cross_validate(rows, sorted({1, min(3, layers), layers}))
    means = scores.groupby("model", sort=False).spearman.mean()
    fitted = scores.dropna(subset=["bands"]).groupby(["bands", "alpha"]).spearman.mean()
    bands, alpha = fitted.idxmax()
    model = Ridge(alpha=alpha).fit(design(rows, int(bands)), rows.target)
    content = dict(
        model=loaded.name,
        features=list(FEATURES),
        layers=int(layers),
        bands=int(bands),
        alpha=float(alpha),
        weights=[float(w) for w in model.coef_],
        intercept=float(model.intercept_),
        target=f"rank of fi_far (mean KL over distances {FAR_FROM}-{distance}, each token evicted alone at "
        f"t = {prefix - 1}) within its document",
        documents=[d.id for d in documents],
        cross_validation={name: float(value) for name, value in means.items()},
    )
    with atomic_open(out) as f:
        json.dump(content, f, indent=1)
    return content


def evaluation_scans(out: Path, model: str) -> Path:
    """Where the evaluation documents' scans are cached (`analyses.headroom` reads the same ones)."""
    return cache_folder(out, model) / "scans" / "evaluation"


def evaluation_documents(tokenizer, docs: int) -> list[Trace]:
    """The `docs` evaluation documents: `PREFIX` tokens and the fidelity task's continuation after them, so
    the scans are those of the fidelity task's items (`analyses.headroom` reads both)."""
    return essay_segments(tokenizer, docs, PREFIX + CONTINUATION)


def fill_scans(
    loaded: LoadedModel,
    documents: Sequence[Trace],
    out: Path,
    shard: tuple[int, int],
    progress: bool = True,
    prefix: int = PREFIX,
    distance: int = INFLUENCE_DISTANCE,
) -> Path:
    """Measure the scans of shard ``(i, n)`` of `documents` into the cache and write no table (array
    jobs: a run without a shard then reads them all); the cache folder."""
    tracer, folder = Tracer(loaded), evaluation_scans(out, loaded.name)
    for trace in tqdm(shard_of(documents, shard), desc="scans", unit="doc", disable=not progress):
        influence_scan(tracer, trace.token_ids, folder / cache.file_name(trace.id), prefix, distance)
    return folder


def ranking(
    loaded: LoadedModel,
    documents: Sequence[Trace],
    out: Path,
    policies: Sequence[str] = RANKED,
    progress: bool = True,
    prefix: int = PREFIX,
    distance: int = INFLUENCE_DISTANCE,
) -> dict[str, pd.DataFrame]:
    """Spearman of each policy's token score with ``fi_far`` on `documents` (the first `prefix`
    tokens scored at t = prefix - 1), per document, summarised, and paired against the learned policy
    (``learned_spearman*.csv``)."""
    tracer = Tracer(loaded)
    built = {name: parse(name, loaded.name, quiet=True) for name in policies}
    folder = evaluation_scans(out, loaded.name)
    rows = []
    for trace in tqdm(documents, desc="ranking", unit="doc", disable=not progress):
        scan = influence_scan(tracer, trace.token_ids, folder / cache.file_name(trace.id), prefix, distance)
        target = far_influence(scan)
        obs = observation(tracer, trace.token_ids[:prefix], list(built.values()))
        for name, policy in built.items():
            token = mean_token_scores(layer_scores(policy, obs)).cpu().numpy()
            keep = np.isfinite(token) & np.isfinite(target)
            rows.append(
                dict(
                    document=trace.id, policy=name, spearman=float(stats.spearmanr(token[keep], target[keep]).statistic)
                )
            )
    frame = pd.DataFrame(rows)
    summary = group_ci(frame, ["policy"], ["spearman"]).rename(columns={"n": "n_documents"})
    wide = frame.pivot(index="document", columns="policy", values="spearman")
    paired = group_ci(
        pd.concat(
            [
                pd.DataFrame({"against": other, "difference": wide["learned"] - wide[other]})
                for other in wide
                if other != "learned"
            ]
        ),
        ["against"],
        ["difference"],
    ).rename(columns={"n": "n_documents"})
    for name, table in (
        ("learned_spearman_per_document", frame),
        ("learned_spearman", summary),
        ("learned_spearman_paired", paired),
    ):
        write_table(table, out / f"{name}.csv")
    return dict(per_document=frame, summary=summary, paired=paired)


def plot_weights(content: dict, path: Path) -> list[Path]:
    """The learned weights as a heatmap: one row per band of layers, one column per signal."""
    theme()
    fig, ax = plt.subplots(figsize=(13, weights_figure_height(content["bands"])), layout="constrained")
    weights_heatmap(ax, content, "weight on the signal's rank")
    cv = content["cross_validation"]
    chosen = f"bands={content['bands']},alpha={content['alpha']}"
    ax.set_title(
        f"{content['model']}: learned weights ({len(content['documents'])} calibration documents); "
        f"held-out Spearman with fi_far {cv[chosen]:.2f} (window attention {cv['attention_window']:.2f}, "
        f"cumulative {cv['attention_cumulative']:.2f})",
        fontsize=10,
    )
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--docs", type=int, default=16, help="evaluation documents (default 16)")
    parser.add_argument("--out", type=Path, default=Path("runs/learned"))
    parser.add_argument(
        "--weights-only", action="store_true", help="draw the model's learned weights and stop (no scans, no model)"
    )
    add_shard_option(parser)
    args = parser.parse_args(argv)
    if args.weights_only:
        found = read(args.model, "learned")
        if found is None:
            parser.exit(2, f"error: --model: no learned weights for {args.model!r}; run `forward-influence learn`\n")
        for path in plot_weights(found[0], args.out / "learned_weights"):
            print(path)
        return
    loaded = load_model(args.model)
    documents = evaluation_documents(loaded.tokenizer, args.docs)
    if args.shard is not None:
        print(fill_scans(loaded, documents, args.out, args.shard))
        return
    tables = ranking(loaded, documents, args.out)
    found = read(loaded.name, "learned")
    if found is not None:
        plot_weights(found[0], args.out / "learned_weights")
    print(tables["summary"].to_string(index=False, float_format="{:.3f}".format))
    print(tables["paired"].to_string(index=False, float_format="{:.3f}".format))
    print(args.out / "learned_spearman.csv")


if __name__ == "__main__":
    main()
