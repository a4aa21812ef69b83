"""Per-model files the measurements write: InfoKV's calibration and the learned policy's weights.

``forward-influence calibrate`` measures a grid of InfoKV's open choices on the calibration essays and
writes ``calibration/<model>.json``; ``forward-influence learn`` fits the learned policy to the
calibration essays' Forward Influence and writes ``learned/<model>.json`` (JSON: data, never code).
`read` looks in the user's folder first (`user_folder`, inside the per-user data folder
`forward_influence.outputs.data_home`), then in the files shipped with the package for the embedded
models (package data, read with `importlib.resources`). `calibrated` and `learned` build the policies
behind the CLI names ``infokv-calibrated`` and ``learned``, say on stderr which file they used, and
refuse a model with neither, naming the command to run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Literal

from forward_influence.errors import InputError
from forward_influence.outputs import data_home

from .policies import InfoKV, Learned

Kind = Literal["calibration", "learned"]
COMMANDS = {"calibration": "calibrate", "learned": "learn"}


def file_name(model: str) -> str:
    """``<model>.json`` with the model name made one file name (``org/name`` -> ``org_name``)."""
    return f"{model.replace('/', '_')}.json"


def user_folder(kind: Kind = "calibration") -> Path:
    """Where ``calibrate`` (``learn``) writes by default: ``<data home>/calibration`` (``/learned``)."""
    return data_home() / kind


def read(model: str, kind: Kind = "calibration") -> tuple[dict, str] | None:
    """The file of `model` and where it came from (the user's or the packaged one), or None."""
    user = user_folder(kind) / file_name(model)
    if user.is_file():
        return json.loads(user.read_text(encoding="utf-8")), f"user file {user}"
    packaged = resources.files("kv_compression") / "data" / kind / file_name(model)
    if packaged.is_file():
        return json.loads(packaged.read_text(encoding="utf-8")), f"packaged {kind} {file_name(model)}"
    return None


def _found(model: str, kind: Kind, name: str) -> tuple[dict, str]:
    found = read(model, kind)
    if found is None:
        raise InputError(
            f"{name}: no {kind} file for model {model!r}; run "
            f"`forward-influence {COMMANDS[kind]} --model {model}` (writes to {user_folder(kind)})"
        )
    return found


def calibrated(model: str, quiet: bool = False) -> InfoKV:
    """InfoKV with `model`'s calibrated settings (see the module docstring)."""
    content, source = _found(model, "calibration", "infokv-calibrated")
    names = {f.name for f in dataclasses.fields(InfoKV)}
    settings = {k: v for k, v in content["settings"].items() if k in names}
    if not quiet:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        print(f"infokv-calibrated: {shown} (from the {source})", file=sys.stderr)
    return InfoKV(**settings)


def learned(model: str, quiet: bool = False) -> Learned:
    """The learned policy with `model`'s fitted weights (see the module docstring)."""
    content, source = _found(model, "learned", "learned")
    if not quiet:
        print(
            f"learned: {content['bands']} band(s) x {len(content['features'])} signals (from the {source})",
            file=sys.stderr,
        )
    return Learned(bands=content["bands"], weights=tuple(content["weights"]), intercept=content["intercept"])
