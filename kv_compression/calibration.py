"""Calibration files: the InfoKV settings a model's Forward Influence measurements chose.

``forward-influence calibrate`` measures a grid of InfoKV's open choices on the calibration essays and
writes ``<folder>/<model>.json``. `calibrated(model)` builds the policy behind the CLI name
``infokv-calibrated``: it reads the user's own calibration first (`user_folder`, in the per-user data
folder), then the file
shipped with the package for the embedded models (package data, read with `importlib.resources`),
and says on stderr which one it used. A model with neither is an `InputError` that names the command
to run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib import resources
from pathlib import Path

from forward_influence.errors import InputError
from forward_influence.outputs import data_home

from .policies import InfoKV

PACKAGED = resources.files("kv_compression") / "data" / "calibration"


def file_name(model: str) -> str:
    """``<model>.json`` with the model name made one file name (``org/name`` -> ``org_name``)."""
    return f"{model.replace('/', '_')}.json"


def user_folder() -> Path:
    """Where `calibrate` writes by default: ``calibration/`` in the per-user data folder
    (`forward_influence.outputs.data_home`)."""
    return data_home() / "calibration"


def read(model: str) -> tuple[dict, str] | None:
    """The calibration of `model` and where it came from (``user`` or ``packaged``), or None."""
    user = user_folder() / file_name(model)
    if user.is_file():
        return json.loads(user.read_text(encoding="utf-8")), f"user file {user}"
    packaged = PACKAGED / file_name(model)
    if packaged.is_file():
        return json.loads(packaged.read_text(encoding="utf-8")), f"packaged calibration {file_name(model)}"
    return None


def calibrated(model: str, quiet: bool = False) -> InfoKV:
    """InfoKV with `model`'s calibrated settings (see the module docstring)."""
    found = read(model)
    if found is None:
        raise InputError(
            f"infokv-calibrated: no calibration for model {model!r}; run "
            f"`forward-influence calibrate --model {model}` (writes to {user_folder()})"
        )
    content, source = found
    names = {f.name for f in dataclasses.fields(InfoKV)}
    settings = {k: v for k, v in content["settings"].items() if k in names}
    policy = InfoKV(**settings)
    if not quiet:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        print(f"infokv-calibrated: {shown} (from the {source})", file=sys.stderr)
    return policy
