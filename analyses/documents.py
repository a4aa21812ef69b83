"""The documents an analysis runs on, and a per-document cache that makes long runs resumable.

`evaluation_traces` reads the evaluation essays (never the calibration ones), cut to `max_tokens`.
`per_document` computes one table per document and keeps it as a pickle under the cache folder,
keyed by the settings and the tokens that produced it: an interrupted run resumes where it
stopped, a run with other settings or another cut of the document recomputes, and a rerun reads
back the same numbers bit for bit (so its CSVs are identical). `cache_folder` is where a model's
results go under an output folder.

Quick mode (environment variable ``FI_QUICK=1``) is for the notebooks under ``make test``: the
analyses shrink their documents and sets through `quick`.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from forward_influence import corpus
from forward_influence.errors import InputError
from forward_influence.outputs import atomic_open
from forward_influence.traces import Trace, read_traces


def quick() -> bool:
    """True when ``FI_QUICK=1``: analyses run on a few short documents."""
    return os.environ.get("FI_QUICK", "") not in ("", "0")


def evaluation_traces(tokenizer, docs: int, max_tokens: int) -> list[Trace]:
    """`docs` documents of exactly `max_tokens` tokens cut from the evaluation essays.

    Every essay long enough gives its first segment, then the longer essays their second, and so on
    (round robin in name order), so the documents spread over as many essays as they can (15 of the
    25 evaluation essays reach 1024 tokens of SmolLM2's tokenizer). A later segment
    starts with the essay's BOS token when the tokenizer adds one, so every document begins as a
    text does. Fewer than `docs` documents is an `InputError`.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    texts = {}  # per essay: the BOS token (or nothing) and the text tokens after it
    for name in corpus.essay_names("evaluation"):
        ids = read_traces(f"essay:{name}", tokenizer)[0].token_ids
        texts[name] = (ids[:1], ids[1:]) if bos is not None and ids[:1] == [bos] else ([], ids)
    traces, segment = [], 0
    while len(traces) < docs:
        round_ = []
        for name, (lead, text) in texts.items():
            size = max_tokens - len(lead)
            body = text[segment * size : (segment + 1) * size]
            if len(body) == size:
                round_.append(Trace(f"essay:{name}" + (f"#{segment + 1}" if segment else ""), lead + body))
        if not round_:
            raise InputError(f"the evaluation essays hold only {len(traces)} documents of {max_tokens} tokens, "
                             f"not {docs}")
        traces += round_[: docs - len(traces)]
        segment += 1
    return traces


def cache_folder(out: Path, model: str) -> Path:
    """``<out>/cache/<model>``, the model name made a single folder name (``org/name`` -> ``org_name``)."""
    return Path(out) / "cache" / model.replace("/", "_")


def _file_name(document: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", document) + ".pkl"


def per_document(
    documents: Sequence[Trace],
    compute: Callable[[Trace], pd.DataFrame],
    cache: Path | None,
    key: dict,
    desc: str = "documents",
    progress: bool = True,
) -> pd.DataFrame:
    """``compute(document)`` for every document, concatenated; cached under `cache` (None: no cache)."""
    frames = []
    for document in tqdm(documents, desc=desc, unit="doc", disable=not progress):
        path = None if cache is None else cache / _file_name(document.id)
        if path is not None and path.is_file():
            stored_key, tokens, frame = pickle.loads(path.read_bytes())
            if stored_key == key and tokens == list(document.token_ids):
                frames.append(frame)
                continue
        frame = compute(document)
        if path is not None:
            with atomic_open(path, "wb") as f:
                pickle.dump((key, list(document.token_ids), frame), f)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
