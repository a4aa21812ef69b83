"""The documents an analysis runs on, and the per-document cache that makes long runs resumable.

`essay_segments` cuts documents of a fixed length from the essays of a split (the evaluation essays
unless a tuning step asks for the calibration ones). `shard_of` splits a run's documents or items
between the array jobs of a cluster scheduler (``--shard i/n``): each job fills the shared cache, and
a run without a shard then reads them all back and writes the tables. `per_document` computes one table per document
and keeps it under the cache folder (`analyses.cache`: Parquet, keyed by the settings and the tokens
that produced it): an interrupted run resumes where it stopped, a run with other settings or
another cut of the document recomputes, and a rerun reads back the same numbers bit for bit (so its
CSVs are identical). `cache_folder` is where a model's cached results go under an output folder.

Quick mode (environment variable ``FI_QUICK=1``) is for the notebooks under ``make test``: the
analyses shrink their documents and sets through `quick`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from forward_influence import corpus
from forward_influence.errors import InputError
from forward_influence.sources import model_slug
from forward_influence.traces import Trace, read_traces

from . import cache


def quick() -> bool:
    """True when ``FI_QUICK=1``: analyses run on a few short documents."""
    return os.environ.get("FI_QUICK", "") not in ("", "0")


def essay_segments(tokenizer, docs: int, max_tokens: int, split: str = "evaluation") -> list[Trace]:
    """`docs` documents of exactly `max_tokens` tokens cut from the essays of `split`.

    Every essay long enough gives its first segment, then the longer essays their second, and so on
    (round robin in name order), so the documents spread over as many essays as they can (15 of the
    25 evaluation essays reach 1024 tokens of SmolLM2's tokenizer). A later segment starts with the
    essay's BOS token when the tokenizer adds one, so every document begins as a text does. Fewer
    than `docs` documents is an `InputError`.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    texts = {}  # per essay: the BOS token (or nothing) and the text tokens after it
    for name in corpus.essay_names(split):
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
            raise InputError(f"the {split} essays hold only {len(traces)} documents of {max_tokens} tokens, not {docs}")
        traces += round_[: docs - len(traces)]
        segment += 1
    return traces


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"``: the i-th of n shards, counted from 0; a `ValueError` for anything else."""
    index, slash, count = text.partition("/")
    try:
        parsed = int(index), int(count)
    except ValueError:
        raise ValueError(f"expected I/N (the I-th of N shards, from 0), got {text!r}") from None
    if not slash or parsed[1] < 1 or not 0 <= parsed[0] < parsed[1]:
        raise ValueError(f"expected I/N with 0 <= I < N, got {text!r}")
    return parsed


def add_shard_option(parser) -> None:
    """``--shard I/N`` for an analysis entry point (see `shard_of`)."""
    parser.add_argument(
        "--shard",
        type=parse_shard,
        default=None,
        help="I/N: measure only documents I, I+N, ... into the cache and write no table (array jobs)",
    )


def shard_of(items: Sequence, shard: tuple[int, int] | None) -> list:
    """The items of shard ``(i, n)``: those whose index is i modulo n (all of them when `shard` is None).

    The shard contract of every analysis and of the evaluation: a shard run (an array job) measures its
    items into the per-item cache, writes no table and returns the cache folder it filled, which its
    entry point prints; a run without a shard then reads every item from the cache and writes the tables."""
    if shard is None:
        return list(items)
    index, count = shard
    return [item for position, item in enumerate(items) if position % count == index]


def cache_folder(out: Path, model: str) -> Path:
    """``<out>/cache/<model>``, the model's name made one folder name (`forward_influence.sources.model_slug`)."""
    return Path(out) / "cache" / model_slug(model)


def per_document(
    documents: Sequence[Trace],
    compute: Callable[[Trace], pd.DataFrame],
    folder: Path | None,
    key: dict,
    desc: str = "documents",
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """``compute(document)`` for every document (of `shard`, see `shard_of`), concatenated; cached under
    `folder` (None: no cache)."""
    frames = []
    for document in tqdm(shard_of(documents, shard), desc=desc, unit="doc", disable=not progress):
        path = None if folder is None else folder / cache.file_name(document.id)
        frames.append(
            cache.cached(path, dict(key, tokens=list(document.token_ids)), lambda document=document: compute(document))
        )
    return pd.concat(frames, ignore_index=True)
