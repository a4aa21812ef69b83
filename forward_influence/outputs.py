"""Atomic output files: written to a temporary name in the same folder, renamed when complete.

A run that fails half-way leaves no partial file behind, and a file that exists is complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds. The
    temporary file is private (mode 0600) while it is written; the finished file gets the user's
    normal permissions (0666 less the umask), as a plainly created file would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to `path` for writing; it becomes `path` when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f


def write_table(df: pd.DataFrame, path: str | Path, fmt: str | None = None) -> Path:
    """Write a table atomically as CSV, JSONL or Parquet (format from `fmt` or the extension)."""
    path = Path(path)
    fmt = fmt or {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "csv")
    with atomic_path(path) as tmp:
        if fmt == "jsonl":
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        elif fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path


def data_home() -> Path:
    """The per-user folder for what the toolkit writes for later runs (calibrations, reference
    generations): ``$FORWARD_INFLUENCE_HOME``, else ``$XDG_DATA_HOME/forward-influence`` (by default
    ``~/.local/share/forward-influence``)."""
    home = os.environ.get("FORWARD_INFLUENCE_HOME")
    if home:
        return Path(home)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "forward-influence"
