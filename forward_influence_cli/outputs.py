"""Output paths and tables: checked before any work, written atomically, the main path printed last."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from forward_influence.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")


def _existing(folder: Path) -> Path:
    """`folder` or its nearest ancestor that exists."""
    folder = folder if str(folder) else Path(".")
    while not folder.exists():
        folder = folder.parent
    return folder


def _writable_folder(folder: Path, option: str) -> None:
    existing = _existing(folder)
    if not existing.is_dir():
        raise InputError(f"{option} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option} {folder}: {existing} is not writable")
    try:  # permissions do not tell the whole story (root under /proc or /sys, a read-only mount): try
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".forward-influence-probe-"):
            pass
    except OSError as exc:
        raise InputError(f"{option} {folder}: {existing} is not writable ({exc.strerror})") from None


def check_file(path: Path | None, suffixes: tuple[str, ...] = TABLE_SUFFIXES, option: str = "--out") -> None:
    """Refuse an output file that cannot be written: a name too long, an unknown extension, a folder, an
    unwritable place."""
    if path is None:
        return
    limit = os.pathconf(_existing(path.parent), "PC_NAME_MAX")
    if len(os.fsencode(path.name)) > limit:
        raise InputError(f"{option} {path.name[:40]}...: the file name is longer than {limit} bytes")
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; name a file")
    if path.suffix not in suffixes:
        choices = " or ".join([", ".join(suffixes[:-1]), suffixes[-1]] if len(suffixes) > 1 else suffixes)
        raise InputError(f"{option} must end in {choices}, got {path.name!r}")
    _writable_folder(path.parent if str(path.parent) else Path("."), option)


def check_folder(path: Path | None, option: str = "--out") -> None:
    """Refuse an output folder that is an existing file or cannot be created or written."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file; name a folder")
    _writable_folder(path, option)


OUTPUTS = (("out", "--out"), ("per_distance", "--per-distance"))  # (argument, flag) of every output file
INPUTS = (("trace", "the input trace"), ("problems", "the input problems"))  # files a command reads


def _resolved(value) -> Path:
    """The path with links followed; one the system cannot resolve (a name too long) stays as written, for
    `check_file` to refuse."""
    try:
        return Path(str(value)).resolve()
    except OSError:
        return Path(str(value)).absolute()


def check_distinct(args: argparse.Namespace) -> None:
    """Refuse two outputs that resolve to one path, and an output that resolves to an input file (the
    input would be overwritten): before anything is read or written."""
    written: dict[Path, str] = {}
    for attribute, flag in OUTPUTS:
        value = getattr(args, attribute, None)
        if value is None:
            continue
        path = _resolved(value)
        if path in written:
            raise InputError(f"{flag} {value} is also {written[path]}: name two files")
        written[path] = flag
    for attribute, what in INPUTS:
        value = getattr(args, attribute, None)
        if value is None or not Path(str(value)).is_file():
            continue
        path = _resolved(value)
        if path in written:
            raise InputError(f"{written[path]} {value} is {what}: it would be overwritten; name another file")


def emit(frame: pd.DataFrame, args: argparse.Namespace) -> None:
    """A table to ``--out`` (the path printed last) or to stdout in ``--format``."""
    import pandas as pd

    from forward_influence.outputs import write_table

    if args.out is not None:
        print(write_table(frame, args.out))
    elif getattr(args, "format", "table") == "csv":
        frame.to_csv(sys.stdout, index=False)
    elif args.format == "jsonl":
        frame.to_json(sys.stdout, orient="records", lines=True, force_ascii=False)
    else:
        with pd.option_context("display.max_rows", None, "display.width", 200, "display.float_format", "{:.4g}".format):
            print(frame.to_string(index=False))
