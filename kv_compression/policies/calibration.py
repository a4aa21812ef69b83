"""Calibrated settings: the policy a model's Forward Influence measurements chose.

`make(name, model)` builds a policy by its CLI name; for ``infokv`` it reads the model's calibration
file (``data/calibration/<model>.json``, written by ``forward-influence calibrate``) when one exists
and says so on stderr, and otherwise uses the paper-style defaults. ``infokv-default`` always means
the paper-style defaults, so a sweep can compare them with the calibrated settings.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from .base import Policy

CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "data" / "calibration"


def calibration_path(model: str) -> Path:
    return CALIBRATION_DIR / f"{model.replace('/', '_')}.json"


DEFAULT_INFOKV = "infokv-default"


def policy_names() -> list[str]:
    """Every CLI policy name: the policies' own names plus ``infokv-default``."""
    from . import POLICIES

    return [*POLICIES, DEFAULT_INFOKV]


def make(name: str, model: str | None = None, quiet: bool = False) -> Policy:
    """The policy `name` with its defaults, or InfoKV with `model`'s calibrated settings if any."""
    from . import POLICIES

    if name == DEFAULT_INFOKV:
        return POLICIES["infokv"]()
    cls = POLICIES[name]
    path = calibration_path(model) if model else None
    if name != "infokv" or path is None or not path.is_file():
        return cls()
    settings = json.loads(path.read_text())["settings"]
    fields = {f.name for f in dataclasses.fields(cls)}
    policy = cls(**{k: v for k, v in settings.items() if k in fields})
    if not quiet:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k in fields)
        print(f"infokv: calibrated settings from {path.name}: {shown}", file=sys.stderr)
    return policy
