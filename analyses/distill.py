"""The distilled policy: an online compressor fitted to the set optimum's choices.

Labels. On each calibration document (`PREFIX` + `CONTINUATION` tokens of the calibration essays, never
the evaluation ones) `optimal` searches, for each budget of `BUDGETS`, the kept set of every
full-attention layer and KV head that minimises the mean KL over the continuation
(`analyses.set_level.search_rows`; its exact fidelity rows come with it). The kept sets are cached per
document (``<work>/cache/<model>/distill/``, resumable; ``--shard I/N`` fills the cache for array jobs).

Features. Each (layer, KV head, cached token) entry of the prefix gets the online signals of
`kv_compression.policies.learned.FEATURES`, ranked among the head's entries (`ranked(features(...))`,
exactly what the policy computes at compression time), and its label: whether the optimum keeps it at
that budget. A budget's rows say what a set of that size keeps; the policy has one score for every
budget, so the budgets' rows are pooled.

Fit (`fit`). A logistic regression (scikit-learn) per band of layers (one band, three, or one per
layer), its penalty `C` and the band count chosen by leave-one-document-out agreement: on each held-out
document, budget, layer and head, the share of the optimum's kept entries that the fitted score's top
entries (as many as the optimum keeps) recover. The same agreement of the window and cumulative
attention alone (SnapKV's and H2O's signals) is reported beside it. The first tokens the optimum keeps
in every head of every calibration set become the policy's `sinks`. Everything goes to
``distilled/<model>.json`` (`kv_compression.tuned`).

Ablation (`ablation`, ``python -m analyses.distill``). Which signals carry the fit: the chosen bands and
penalty refitted leave-one-document-out without each signal, and without the four entropies together
(InfoKV's term), against the fit on all of them, paired per held-out document (`ablation.csv`,
`ablation_paired.csv`); the figure (`distilled.png`) draws the drop in agreement beside the fitted
weights. ``--shard I/N`` searches every N-th document's sets into the cache and writes nothing else,
so the labels' cost (the set search, about 15 CPU minutes a document) spreads over processes.

    forward-influence distill --model smollm2-135m-instruct --docs 16
    python -m analyses.distill --model smollm2-135m-instruct --docs 16 --work runs/distill --shard 0/2
    python -m analyses.distill --model smollm2-135m-instruct --docs 16 --work runs/distill \
        --out data/results/smollm2-135m-instruct/distilled
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import pyplot as plt
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from forward_influence.models import LoadedModel, load_model
from forward_influence.outputs import atomic_open, write_table
from forward_influence.sources import DEFAULT_MODEL
from forward_influence.stats import paired_interval
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from kv_compression.offline import observation
from kv_compression.policies import Distilled
from kv_compression.policies.learned import FEATURES, band, features, ranked
from kv_compression.tuned import read

from .documents import add_shard_option, cache_folder, essay_segments, per_document
from .plotting import save_figure, theme, weights_figure_height, weights_heatmap
from .protocol import CONTINUATION, PREFIX
from .set_level import search_rows, sets_file
from .tasks.fidelity import Fidelity

BUDGETS = ("0.1", "0.25", "0.5")
PENALTIES = (0.01, 0.1, 1.0)
SAMPLE = 20_000  # entries per document and budget that enter the fit (all of them score the held-out one)
BASELINES = ("attention_window", "attention_cumulative")
ENTROPIES = tuple(name for name in FEATURES if name.startswith("entropy_"))
ALL_SIGNALS = "none"  # the ablation's reference: nothing dropped


def calibration_documents(tokenizer, docs: int) -> list[Trace]:
    """The `docs` calibration documents: `PREFIX` tokens and the fidelity continuation after them."""
    return essay_segments(tokenizer, docs, PREFIX + CONTINUATION, split="calibration")


def labels(
    loaded: LoadedModel,
    documents: Sequence[Trace],
    work: Path,
    budgets: Sequence[str] = BUDGETS,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    task: Fidelity | None = None,
) -> tuple[pd.DataFrame, Path]:
    """`optimal`'s exact fidelity rows on each document and the folder of its kept sets (`sets_file`),
    searched once per document (cached)."""
    tracer, task = Tracer(loaded), task or Fidelity()
    folder = cache_folder(work, loaded.name) / "distill"
    rows = per_document(
        documents,
        lambda document: search_rows(tracer, document.id, document.token_ids, list(budgets), task, folder / "sets"),
        folder,
        dict(budgets=list(budgets), prefix=task.prefix, continuation=task.continuation),
        "optimal sets",
        progress,
        shard,
    )
    return rows, folder / "sets"


def entries(tracer: Tracer, document: Trace, sets: Path, budgets: Sequence[str], prefix: int = PREFIX) -> dict:
    """The ranked features ``[layers, kv_heads, tokens, features]`` of the document's prefix (float32)
    and, per budget, the optimum's kept masks ``[layers, kv_heads, tokens]`` of the same layers."""
    obs = observation(tracer, document.token_ids[:prefix], [Distilled()])
    table = torch.cat([ranked(features(obs, layer, Distilled.window)) for layer in obs.full_layers]).float()
    kept = {}
    for budget in budgets:
        stored = load_file(str(sets_file(sets, document.id, budget)))
        if stored["layers"].tolist() != obs.full_layers:
            raise ValueError(f"{document.id}@{budget}: the kept sets cover other layers than the observation")
        kept[budget] = stored["kept"].bool()
    return dict(features=table.numpy(), kept={b: m.numpy() for b, m in kept.items()})


def _banded(values: np.ndarray, bands: int) -> list[np.ndarray]:
    """Per band, the rows of its layers: ``[entries, features]``."""
    layers = values.shape[0]
    return [
        values[[layer for layer in range(layers) if band(layer, layers, bands) == b]].reshape(-1, values.shape[-1])
        for b in range(bands)
    ]


def agreement(scores: np.ndarray, kept: np.ndarray) -> float:
    """Mean over layers and heads of the share of the kept entries that the top-scoring ones (as many as
    are kept) recover; `scores` and `kept` are ``[layers, kv_heads, tokens]``."""
    shares = []
    for layer, head in itertools.product(range(kept.shape[0]), range(kept.shape[1])):
        k = int(kept[layer, head].sum())
        if 0 < k < kept.shape[2]:
            top = np.argpartition(-scores[layer, head], k - 1)[:k]
            shares.append(kept[layer, head, top].mean())
    return float(np.mean(shares))


def _train(data: Sequence[dict], bands: int, penalty: float, seed: int = 0) -> list[LogisticRegression]:
    """One logistic regression per band, on a sample of every document's and budget's entries."""
    rng = np.random.default_rng(seed)
    xs, ys = [[] for _ in range(bands)], [[] for _ in range(bands)]
    for item in data:
        for mask in item["kept"].values():
            for b, (x, y) in enumerate(zip(_banded(item["features"], bands), _banded(mask[..., None], bands))):
                pick = rng.choice(len(x), min(SAMPLE // bands, len(x)), replace=False)
                xs[b].append(x[pick])
                ys[b].append(y[pick, 0])
    return [
        LogisticRegression(C=penalty, max_iter=1000).fit(np.concatenate(x), np.concatenate(y)) for x, y in zip(xs, ys)
    ]


def _scores(models: Sequence[LogisticRegression], values: np.ndarray) -> np.ndarray:
    """The fitted log-odds of every entry, ``[layers, kv_heads, tokens]``."""
    layers = values.shape[0]
    out = np.empty(values.shape[:-1])
    for layer in range(layers):
        model = models[band(layer, layers, len(models))]
        out[layer] = model.decision_function(values[layer].reshape(-1, values.shape[-1])).reshape(values.shape[1:-1])
    return out


def cross_validate(data: Sequence[dict], names: Sequence[str], bands_options: Sequence[int]) -> pd.DataFrame:
    """Leave-one-document-out agreement with the optimum (`agreement`) of every (bands, penalty) and of
    the window and cumulative attention alone, per held-out document and budget."""
    rows = []
    for held in range(len(data)):
        train = [item for index, item in enumerate(data) if index != held]
        fitted = {
            (bands, penalty): _train(train, bands, penalty)
            for bands, penalty in itertools.product(bands_options, PENALTIES)
        }
        for budget, kept in data[held]["kept"].items():
            for (bands, penalty), models in fitted.items():
                score = agreement(_scores(models, data[held]["features"]), kept)
                rows.append(
                    dict(
                        document=names[held],
                        budget=budget,
                        model=f"bands={bands},C={penalty}",
                        bands=bands,
                        penalty=penalty,
                        agreement=score,
                    )
                )
            for name in BASELINES:
                score = agreement(data[held]["features"][..., FEATURES.index(name)], kept)
                rows.append(dict(document=names[held], budget=budget, model=name, agreement=score))
    return pd.DataFrame(rows)


def always_kept(data: Sequence[dict]) -> int:
    """How many first tokens the optimum keeps in every head of every layer, set and document."""
    first = min(
        int(np.argmin(np.all(mask, axis=(0, 1)))) if not mask.all() else mask.shape[2]
        for item in data
        for mask in item["kept"].values()
    )
    return first


def training_data(
    loaded: LoadedModel,
    documents: Sequence[Trace],
    work: Path,
    progress: bool = True,
    task: Fidelity | None = None,
) -> tuple[pd.DataFrame, list[dict]]:
    """The optimum's fidelity rows (`labels`) and each document's `entries`."""
    searched, sets = labels(loaded, documents, work, progress=progress, task=task)
    tracer, prefix = Tracer(loaded), (task or Fidelity()).prefix
    data = [entries(tracer, d, sets, BUDGETS, prefix) for d in tqdm(documents, desc="features", disable=not progress)]
    return searched, data


def fit(
    loaded: LoadedModel,
    docs: int,
    out: Path,
    work: Path,
    progress: bool = True,
    documents: Sequence[Trace] | None = None,
    task: Fidelity | None = None,
) -> dict:
    """Search the optimum's sets on `docs` calibration documents (or the given `documents`), fit the
    distilled policy to them, and write and return its JSON content (module docstring)."""
    documents = documents or calibration_documents(loaded.tokenizer, docs)
    searched, data = training_data(loaded, documents, work, progress, task)
    layers = data[0]["features"].shape[0]
    scores = cross_validate(data, [d.id for d in documents], sorted({1, min(3, layers), layers}))
    fitted = scores.dropna(subset=["bands"]).groupby(["bands", "penalty"]).agreement.mean()
    bands, penalty = fitted.idxmax()
    models = _train(data, int(bands), float(penalty))
    content = dict(
        model=loaded.name,
        features=list(FEATURES),
        layers=int(layers),
        bands=int(bands),
        penalty=float(penalty),
        weights=[float(w) for m in models for w in m.coef_[0]],
        intercepts=[float(m.intercept_[0]) for m in models],
        sinks=always_kept(data),
        target="kept by optimal (the set search's hard sets) at budgets " + ", ".join(BUDGETS),
        documents=[d.id for d in documents],
        optimal_kl={b: float(g.kl.mean()) for b, g in searched.groupby(searched.budget.astype(str))},
        cross_validation={model: float(group.agreement.mean()) for model, group in scores.groupby("model", sort=False)},
    )
    with atomic_open(out) as f:
        json.dump(content, f, indent=1)
    return content


def ablation(data: Sequence[dict], names: Sequence[str], bands: int, penalty: float) -> pd.DataFrame:
    """Leave-one-document-out agreement with the optimum (`agreement`) of the fit with `bands` and
    `penalty` on every signal (``dropped`` = `ALL_SIGNALS`), without each signal, and without the
    entropies together (``dropped`` = "every entropy"): a row per dropped set, held-out document and
    budget."""
    dropped_sets = {ALL_SIGNALS: (), **{name: (name,) for name in FEATURES}, "every entropy": ENTROPIES}
    rows = []
    for dropped, names_dropped in dropped_sets.items():
        keep = [index for index, name in enumerate(FEATURES) if name not in names_dropped]
        reduced = [dict(item, features=item["features"][..., keep]) for item in data]
        for held in range(len(reduced)):
            models = _train([item for index, item in enumerate(reduced) if index != held], bands, penalty)
            scores = _scores(models, reduced[held]["features"])
            for budget, kept in reduced[held]["kept"].items():
                agreed = agreement(scores, kept)
                rows.append(dict(dropped=dropped, document=names[held], budget=budget, agreement=agreed))
    return pd.DataFrame(rows)


def paired_drops(table: pd.DataFrame) -> pd.DataFrame:
    """Per dropped set: its mean agreement over documents (each document's mean over the budgets) and
    the drop from the fit on every signal, with the paired bootstrap interval over documents; largest
    drop first."""
    per_document = table.groupby(["dropped", "document"]).agreement.mean().unstack("document")
    reference = per_document.loc[ALL_SIGNALS].to_numpy()
    rows = []
    for dropped, values in per_document.iterrows():
        if dropped == ALL_SIGNALS:
            continue
        drops = reference - values.to_numpy()
        low, high = paired_interval([drops], np.mean)
        rows.append(
            dict(
                dropped=dropped,
                agreement=float(values.mean()),
                drop=float(drops.mean()),
                drop_ci_low=low,
                drop_ci_high=high,
                documents=len(drops),
            )
        )
    return pd.DataFrame(rows).sort_values("drop", ascending=False, ignore_index=True)


def plot_distilled(content: dict, drops: pd.DataFrame, path: Path) -> list[Path]:
    """The drop in held-out agreement without each signal (95% paired interval) above the fitted weights."""
    theme()
    height = weights_figure_height(content["bands"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 4 + height), height_ratios=(4, height), layout="constrained")
    top.errorbar(
        drops.dropped,
        drops["drop"],
        yerr=[drops["drop"] - drops.drop_ci_low, drops.drop_ci_high - drops["drop"]],
        fmt="o",
        capsize=3,
    )
    top.axhline(0, color="grey", lw=0.8)
    top.set_ylabel("agreement lost\n(share of the optimum's set)")
    top.tick_params(axis="x", rotation=40)
    cv = content["cross_validation"]
    chosen = f"bands={content['bands']},C={content['penalty']}"
    fig.suptitle(
        f"{content['model']}: the distilled policy on {len(content['documents'])} calibration documents, "
        f"held-out agreement with the optimum {cv[chosen]:.2f} (window attention {cv['attention_window']:.2f}, "
        f"cumulative {cv['attention_cumulative']:.2f}); refitted without each signal",
        fontsize=10,
    )
    weights_heatmap(bottom, content, "weight on the signal's rank")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--docs", type=int, default=16, help="calibration documents (default 16)")
    parser.add_argument(
        "--work", type=Path, default=Path("runs/distill"), help="the searches' cache (default runs/distill)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/distill"), help="folder of the tables and figure")
    add_shard_option(parser)
    args = parser.parse_args(argv)
    if args.docs < 2:
        parser.error(f"--docs: leaving one document out needs at least 2, not {args.docs}")
    found = None if args.shard is not None else read(args.model, "distilled")
    if args.shard is None and found is None:
        parser.exit(2, f"error: --model: no distilled weights for {args.model!r}; run `forward-influence distill`\n")
    loaded = load_model(args.model)
    documents = calibration_documents(loaded.tokenizer, args.docs)
    if args.shard is not None:
        labels(loaded, documents, args.work, shard=args.shard)
        print(cache_folder(args.work, loaded.name) / "distill")
        return
    content = found[0]
    if content["documents"] != [d.id for d in documents]:
        parser.exit(2, f"error: --docs: the weights were fitted on {len(content['documents'])} other documents\n")
    _, data = training_data(loaded, documents, args.work)
    table = ablation(data, [d.id for d in documents], content["bands"], content["penalty"])
    drops = paired_drops(table)
    write_table(table, args.out / "ablation.csv")
    write_table(drops, args.out / "ablation_paired.csv")
    plot_distilled(content, drops, args.out / "distilled")
    print(drops.to_string(index=False, float_format="{:.3f}".format))
    print(args.out / "ablation_paired.csv")


if __name__ == "__main__":
    main()
