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

    forward-influence distill --model smollm2-135m-instruct --docs 16
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from forward_influence.models import LoadedModel
from forward_influence.outputs import atomic_open
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from kv_compression.offline import observation
from kv_compression.policies import Distilled
from kv_compression.policies.learned import FEATURES, band, features, ranked

from .documents import cache_folder, essay_segments, per_document
from .protocol import CONTINUATION, PREFIX
from .set_level import search_rows, sets_file
from .tasks.fidelity import Fidelity

BUDGETS = ("0.1", "0.25", "0.5")
PENALTIES = (0.01, 0.1, 1.0)
SAMPLE = 20_000  # entries per document and budget that enter the fit (all of them score the held-out one)
BASELINES = ("attention_window", "attention_cumulative")


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
    searched, sets = labels(loaded, documents, work, progress=progress, task=task)
    tracer, prefix = Tracer(loaded), (task or Fidelity()).prefix
    data = [entries(tracer, d, sets, BUDGETS, prefix) for d in tqdm(documents, desc="features", disable=not progress)]
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
