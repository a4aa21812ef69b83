"""Reconstruction attention: how much each cached entry is needed to repeat the context (KVzip's signal).

KVzip (Kim et al., arXiv 2505.23416) asks the model to reconstruct its context from the cache: after
the cached tokens it feeds a repeat instruction followed by the context itself, as queries over the
cache, a chunk of `Reconstruction.chunk` context tokens at a time. An entry that the reconstruction
needs draws attention; its importance is the largest attention any reconstruction query pays it
(max over the queries and over the query heads of its KV group). Each chunk's softmax runs over the
attention sinks (the first `sinks` positions, or fewer when the chunk starts earlier), the cached
entries of the chunk being reconstructed and the reconstruction tokens themselves (causal), as in the
authors' code and kvpress's ``KVzipPress``; entries outside every chunk (a chat template's header)
score 0. With `plus` (KVzip+), each attention weight is divided by the norm of its query's hidden
state and multiplied by the L2 norm of what the entry's value writes through that head's slice of the
output projection.

The reconstruction prompt (`reconstruction_prompt`): for a chat model, the context is the user turn
of its chat template; the template's header before the user text is not reconstructed (`skip`
tokens), and each chunk's input is the instruction, the template's text that closes the user turn and
opens the assistant's (`suffix`), then the chunk's tokens. The first chunk's instruction is
``"\\n\\nRepeat the previous context exactly."``; a later one asks to repeat "starting with" the last
`OVERLAP` tokens of the previous chunk, which follow it. A model without a chat template gets the
same instructions with ``"\\n"`` as the suffix and nothing skipped.

This module holds the rule and its arithmetic; running the passes over a held cache is the
compressing runtime's (`kv_compression.runtime.reconstruction_pass`), offline and online alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FIRST = "\n\nRepeat the previous context exactly."
LATER = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8  # tokens of the previous chunk that a later instruction quotes
_PLACEHOLDER = "dummy context"


@dataclass(frozen=True)
class Reconstruction:
    """One reconstruction signal: `sinks` always-visible first positions, `chunk` context tokens per
    pass, `plus` for KVzip+'s normalisation."""

    sinks: int = 4
    chunk: int = 2048
    plus: bool = False


@dataclass(frozen=True)
class ReconstructionPrompt:
    """The token ids of a tokenizer's reconstruction prompt (see the module docstring)."""

    skip: int
    first: tuple[int, ...]
    later: tuple[int, ...]
    suffix: tuple[int, ...]


def reconstruction_prompt(tokenizer) -> ReconstructionPrompt:
    """The reconstruction prompt of `tokenizer` (see the module docstring)."""
    header, suffix = "", "\n"
    if getattr(tokenizer, "chat_template", None):
        separator = "\n" + "#" * len(_PLACEHOLDER)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _PLACEHOLDER + separator}],
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=False,
        )
        before, suffix = text.split(separator)
        header = before.split(_PLACEHOLDER)[0]

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()

    return ReconstructionPrompt(len(ids(header)), ids(FIRST), ids(LATER), ids(suffix))


def chunk_inputs(
    prompt: ReconstructionPrompt, token_ids: Sequence[int], chunk: int
) -> list[tuple[int, int, list[int]]]:
    """Per pass, ``(start, end, input_ids)``: the context positions ``[start, end)`` it reconstructs and
    the tokens it feeds (instruction, suffix, the chunk)."""
    passes = []
    for start in range(prompt.skip, len(token_ids), chunk):
        end = min(start + chunk, len(token_ids))
        if start == prompt.skip:
            instruction = list(prompt.first)
        else:
            instruction = [*prompt.later, *token_ids[max(prompt.skip, start - OVERLAP) : start]]
        passes.append((start, end, [*instruction, *prompt.suffix, *token_ids[start:end]]))
    return passes


def reconstruction_received(
    query: torch.Tensor,
    key: torch.Tensor,
    positions: torch.Tensor,
    start: int,
    end: int,
    sinks: int,
    scaling: float,
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[batch, kv_heads, n]``: per cached entry of the chunk ``[start, end)``, the largest attention a
    reconstruction query pays it (0 for entries outside the chunk).

    `query` ``[batch, heads, r, head_dim]`` are the r reconstruction queries (after RoPE); `key`
    ``[batch, kv_heads, n + r, head_dim]`` the n cached entries, then the reconstruction tokens' own
    keys; `positions` ``[batch, kv_heads, n]`` the cached entries' original positions. `weights`, for
    KVzip+: the query rows' hidden-state norms ``[batch, r]`` and the per-head value output norms
    ``[batch, heads, n + r]``."""
    b, heads, r, head_dim = query.shape
    kv_heads, n = positions.shape[1], positions.shape[2]
    group = heads // kv_heads
    grouped = query.float().reshape(b, kv_heads, group, r, head_dim)
    keys = key.float()[:, :, None]  # [b, kv_heads, 1, n + r, head_dim]: shared by the group, never copied
    # The softmax over (visible cached entries, own causal keys) without concatenating them: the cached
    # part's log-attention is its logit minus the log-sum-exp of both parts.
    cached = (grouped @ keys[..., :n, :].transpose(-1, -2)).mul_(scaling)  # [b, kv_heads, group, r, n]
    own = (grouped @ keys[..., n:, :].transpose(-1, -2)).mul_(scaling)  # [b, kv_heads, group, r, r]
    visible = (positions < min(sinks, start)) | ((positions >= start) & (positions < end))
    cached.masked_fill_(~visible[:, :, None, None, :], float("-inf"))
    own.masked_fill_(~torch.ones(r, r, dtype=torch.bool, device=query.device).tril(), float("-inf"))
    normaliser = torch.logaddexp(cached.logsumexp(dim=-1), own.logsumexp(dim=-1))  # [b, kv_heads, group, r]
    if weights is not None:
        normaliser = normaliser + weights[0].log()[:, None, None, :]  # each row over its query's norm
    received = cached.sub_(normaliser[..., None]).amax(dim=3).exp()  # [b, kv_heads, group, n]
    if weights is not None:
        received = received * weights[1][..., :n].reshape(b, kv_heads, group, n)
    in_chunk = (positions >= start) & (positions < end)
    return received.amax(dim=2).masked_fill(~in_chunk, 0.0)
