"""Resumable result caches: one table per item, stored as Parquet with the key that produced it inside.

Long runs (the analyses' documents, the evaluation's items, the scans) keep each item's table under
``<out>/cache/<model>/...`` so an interrupted run resumes and a rerun reads back the same numbers bit
for bit. A cache file is a Parquet table whose schema metadata holds the JSON key of the settings and
tokens behind it; `read` returns the table only when that key matches. Parquet holds data, never code,
so a results folder that was shared, copied or downloaded cannot run anything when it is read; a file
in the cache folder that is not such a table is refused with an `InputError` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from forward_influence.errors import InputError
from forward_influence.outputs import atomic_path

KEY = b"forward_influence.key"


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def read(path: Path, key: dict, columns: Sequence[str] = ()) -> pd.DataFrame | None:
    """The table cached at `path` if it was written with `key`, else None (missing or other settings).
    A table with that key that lacks any of `columns` was not written by the code that reads it: an
    `InputError`, as is anything at `path` that is not a file (it would block the write after the work)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise InputError(f"{path} is in the way of a cache file (not a file); remove it")
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a cache file this toolkit wrote ({type(exc).__name__}); remove it") from None
    stored = (table.schema.metadata or {}).get(KEY)
    if stored is None:
        raise InputError(f"{path} is not a cache file this toolkit wrote (no key inside); remove it")
    if stored.decode() != _canonical(key):
        return None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"{path} lacks the columns {', '.join(missing)} of this cache; remove it")
    return table.to_pandas()


def write(path: Path, key: dict, frame: pd.DataFrame) -> Path:
    """Store `frame` with `key` at `path`, atomically."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), KEY: _canonical(key).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def cached(path: Path | None, key: dict, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The table at `path` for `key`, computed and stored when missing or stale (`path` None: no cache)."""
    if path is not None:
        frame = read(path, key)
        if frame is not None:
            return frame
    frame = compute()
    if path is not None:
        write(path, key, frame)
    return frame


def file_name(item: str) -> str:
    """A file name for an item id (``essay:gap#2`` -> ``essay_gap_2.parquet``)."""
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in item) + ".parquet"
