"""Per-model files the measurements write: InfoKV's calibration, the learned and distilled policies' weights.

``forward-influence calibrate`` measures a grid of InfoKV's open choices on the calibration essays and
writes ``calibration/<model>.json``; ``forward-influence learn`` fits the learned policy to the
calibration essays' Forward Influence and writes ``learned/<model>.json``; ``forward-influence distill``
fits the distilled policy to the set optimum's kept sets on the calibration essays and writes
``distilled/<model>.json`` (JSON: data, never code).
`read` looks in the user's folder first (`user_folder`, inside the per-user data folder
`forward_influence.outputs.data_home`), then in the files shipped with the package for the embedded
models (package data, read with `importlib.resources`). `calibrated`, `learned` and `distilled` build
the policies behind the CLI names ``infokv-calibrated``, ``learned`` and ``distilled``, say on stderr
which file they used, and refuse a model with neither, naming the command to run.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Literal

from forward_influence.errors import InputError
from forward_influence.outputs import data_home
from forward_influence.sources import model_slug

from .policies import Distilled, InfoKV, Learned

Kind = Literal["calibration", "learned", "distilled"]
COMMANDS = {"calibration": "calibrate", "learned": "learn", "distilled": "distill"}


def file_name(model: str) -> str:
    """``<model>.json``, the model's name made one file name (`forward_influence.sources.model_slug`)."""
    return f"{model_slug(model)}.json"


def user_folder(kind: Kind = "calibration") -> Path:
    """Where ``calibrate`` (``learn``) writes by default: ``<data home>/calibration`` (``/learned``)."""
    return data_home() / kind


SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {  # the keys each kind of file must hold, with their types
    "calibration": {"settings": (dict,)},
    "learned": {"bands": (int,), "features": (list,), "weights": (list,), "intercept": (int, float)},
    "distilled": {"bands": (int,), "features": (list,), "weights": (list,), "intercepts": (list,), "sinks": (int,)},
}


def _load(path, kind: Kind) -> dict:
    """The JSON object of a `kind` file, checked against `SCHEMA`; an `InputError` naming the file."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"not JSON ({exc})"
        raise InputError(f"{kind} file {path}: {reason}") from None
    if not isinstance(content, dict):
        raise InputError(f"{kind} file {path}: expected a JSON object, got {type(content).__name__}")
    for key, types in SCHEMA[kind].items():
        value = content.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            raise InputError(f"{kind} file {path}: {key!r} must be a {wanted}, got {value!r:.40}")
    return content


def read(model: str, kind: Kind = "calibration") -> tuple[dict, str] | None:
    """The file of `model` and where it came from (the user's or the packaged one), or None. A file that
    is not a valid `kind` file (not UTF-8, not JSON, keys missing or of the wrong type) is an
    `InputError` naming it."""
    user = user_folder(kind) / file_name(model)
    if user.is_file():
        return _load(user, kind), f"user file {user}"
    packaged = resources.files("kv_compression") / "data" / kind / file_name(model)
    if packaged.is_file():
        return _load(packaged, kind), f"packaged {kind} {file_name(model)}"
    return None


def _found(model: str, kind: Kind, name: str) -> tuple[dict, str]:
    found = read(model, kind)
    if found is None:
        raise InputError(
            f"{name}: no {kind} file for model {model!r}; run "
            f"`forward-influence {COMMANDS[kind]} --model {model}` (writes to {user_folder(kind)})"
        )
    return found


def _built(source: str, build):
    """The policy `build()` makes from a file, its field errors naming the file."""
    try:
        return build()
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None


def calibrated(model: str) -> tuple[InfoKV, str]:
    """InfoKV with `model`'s calibrated settings (see the module docstring), and the line that says so."""
    content, source = _found(model, "calibration", "infokv-calibrated")
    names = {f.name for f in dataclasses.fields(InfoKV)}
    settings = {k: v for k, v in content["settings"].items() if k in names}
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    return _built(source, lambda: InfoKV(**settings)), f"infokv-calibrated: {shown} (from the {source})"


def learned(model: str) -> tuple[Learned, str]:
    """The learned policy with `model`'s fitted weights (see the module docstring), and the line that
    says so."""
    content, source = _found(model, "learned", "learned")
    policy = _built(
        source,
        lambda: Learned(bands=content["bands"], weights=tuple(content["weights"]), intercept=content["intercept"]),
    )
    return policy, f"learned: {content['bands']} band(s) x {len(content['features'])} signals (from the {source})"


def distilled(model: str) -> tuple[Distilled, str]:
    """The distilled policy with `model`'s fitted weights (``forward-influence distill``), and the line
    that says so."""
    content, source = _found(model, "distilled", "distilled")
    policy = _built(
        source,
        lambda: Distilled(
            bands=content["bands"],
            weights=tuple(content["weights"]),
            intercepts=tuple(content["intercepts"]),
            sinks=content["sinks"],
        ),
    )
    return policy, f"distilled: {content['bands']} band(s) x {len(content['features'])} signals (from the {source})"
