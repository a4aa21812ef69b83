"""Shared fixtures: tiny random models built from configs (no download) and the embedded model.

`FORWARD_INFLUENCE_TEST_DEVICE` (default ``cpu``) puts the tiny models on another device, so the
exactness tests run there too (`analyses/benchmarks/gpu_run.sh`)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from forward_influence.models import LoadedModel, load_model, word_tokenizer
from forward_influence.tracer import Tracer
from kv_compression.policies import POLICIES
from kv_compression.policies.learned import FEATURES

VOCAB = 96
DEVICE = os.environ.get("FORWARD_INFLUENCE_TEST_DEVICE", "cpu")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 .. w95`` (unknown words map to w0)."""
    return word_tokenizer(VOCAB)


def tiny_model(kind: str) -> LoadedModel:
    """A random 4-layer model with GQA (4 query / 2 KV heads); Gemma3 alternates sliding and global layers."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # sharper attention than the default 0.02, so evictions matter
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attn_implementation="sdpa"))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, attn_implementation="sdpa"))
    elif kind == "gemma3":
        config = Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
            attn_implementation="sdpa",
        )
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(kind)
    model.float().to(DEVICE).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), name=f"tiny-{kind}")


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def tiny(request) -> Tracer:
    return Tracer(tiny_model(request.param))


@pytest.fixture(scope="session")
def embedded() -> Tracer:
    return Tracer(load_model())


ONLINE = sorted(name for name, cls in POLICIES.items() if cls.online)


def small_policy(name: str):
    """The policy `name` sized for the tiny models: windows of 4 queries or tokens, top-k 5, chunks of 12
    tokens, and for the learned and distilled policies fixed weight vectors (any vector exercises their rule)."""
    cls = POLICIES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    sizes = dict(window=4, recent=4, top_k=5, future=16, distance=8, chunk=12)
    if name == "learned":
        sizes["weights"] = tuple(torch.linspace(-1, 1, len(FEATURES)).tolist())
    if name == "distilled":  # two bands, so the band of each layer matters
        sizes.update(bands=2, weights=tuple(torch.linspace(-1, 1, 2 * len(FEATURES)).tolist()), intercepts=(0.5, -0.5))
    if name == "criticalkv":
        sizes["inner"] = "tova"  # its inner policy takes default fields: one without a window
    return cls(**{k: v for k, v in sizes.items() if k in fields})
