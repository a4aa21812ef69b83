"""The decoding drivers: generation, teacher forcing and greedy decoding through a compressing cache.

Each installs the recorder (`compressing`) and runs the model with a `CompressedCache`. Teacher forcing
and greedy agreement feed known tokens in blocks that end where the cache's schedule says the next
compression falls due, so they compress at the same times, score the same observations and keep the
same tokens as decoding one token at a time, in a handful of forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from forward_influence.errors import InputError
from forward_influence.logits import logits_of
from forward_influence.models import cache_argument

from ..budget import BUFFER, Budget
from ..policies import Policy
from .cache import CompressedCache
from .recorder import compressing

SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.9)


def held(model: PreTrainedModel, token_ids: Sequence[int], policy: Policy, tokenizer=None) -> CompressedCache:
    """A cache holding the prefill of `token_ids` exactly as the runtime would before compressing it for
    `policy`, frozen: the offline twin of the runtime's state, for passes over a held cache."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=model.device)[None]
    cache = CompressedCache(model, policy, Budget(ids.shape[1], "count"), tokenizer=tokenizer)
    with compressing(model, cache), torch.no_grad():
        model.get_decoder()(ids, **cache_argument(cache))
    cache.frozen = True
    return cache


def _one_sequence(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise InputError("compressed generation supports batch size 1 only; generate one sequence at a time")
    return input_ids


def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    policy: Policy,
    budget: Budget,
    buffer: int = BUFFER,
    max_new_tokens: int = 64,
    tokenizer=None,
    **generate_kwargs,
) -> tuple[torch.Tensor, CompressedCache]:
    """`model.generate` with a `CompressedCache`: returns the generated ids ``[1, prompt + new]`` and
    the cache (its `sizes()` and `compressions` tell what was kept). Extra keyword arguments go to
    `model.generate` (e.g. ``do_sample=True, temperature=0.7``); greedy by default. `tokenizer` as in
    `CompressedCache`."""
    input_ids = _one_sequence(input_ids)
    budget.check_count(input_ids.shape[1] + max_new_tokens, "the prompt plus the new tokens")
    cache = CompressedCache(model, policy, budget, buffer=buffer, tokenizer=tokenizer)
    generate_kwargs.setdefault("do_sample", False)
    with compressing(model, cache), torch.no_grad():
        output = model.generate(
            input_ids.to(model.device),
            attention_mask=torch.ones_like(input_ids, device=model.device),
            **cache_argument(cache),
            max_new_tokens=max_new_tokens,
            min_new_tokens=generate_kwargs.pop("min_new_tokens", 0),
            **generate_kwargs,
        )
    return output, cache


def _feed(
    decoder: torch.nn.Module, cache: CompressedCache, ids: torch.Tensor, stops: Sequence[int] = ()
) -> tuple[list[torch.Tensor], dict[int, CompressedCache]]:
    """Feed ``ids [1, n]`` to a cache that is already `compressing`, in blocks that end where a
    compression falls due (or at a stop): the final normed hidden states of each block and a snapshot
    of the cache after each stop (after the first p tokens)."""
    states, snapshots, start, end, device = [], {}, 0, ids.shape[1], ids.device
    while start < end:
        cache.maybe_compress()
        size = min([end - start, max(cache.room(), 1), *(p - start for p in stops if p > start)])
        positions = torch.arange(cache.seen, cache.seen + size, device=device)[None]
        states.append(
            decoder(ids[:, start : start + size], position_ids=positions, **cache_argument(cache)).last_hidden_state[0]
        )
        start += size
        if start in stops:
            snapshots[start] = cache.snapshot()
    return states, snapshots


def teacher_forced(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    continuation_ids: torch.Tensor,
    policy: Policy,
    budget: Budget,
    buffer: int = BUFFER,
    stops: Sequence[int] = (),
    tokenizer=None,
) -> tuple[torch.Tensor, CompressedCache, dict[int, CompressedCache]]:
    """Feed a fixed continuation to a compressed cache, as decoding those tokens would: the final normed
    hidden states ``[len(continuation), hidden]`` that predict each continuation token (the first from
    the prompt's last position), the cache, and a `snapshot` of the cache at each of `stops` (after the
    first p continuation tokens; its state is ``states[p]``), to decode from without replaying again.
    `tokenizer` as in `CompressedCache`.

    The tokens run in blocks that end where a compression falls due (or at a stop), so the cache
    compresses at the same times, scores the same observations and keeps the same tokens as
    one-token-at-a-time decoding, which it equals (tested), in a handful of forward passes instead of
    one per token."""
    prompt_ids, continuation_ids = _one_sequence(prompt_ids), _one_sequence(continuation_ids)
    budget.check_count(prompt_ids.shape[1] + continuation_ids.shape[1], "the prompt plus the continuation")
    cache = CompressedCache(model, policy, budget, buffer=buffer, tokenizer=tokenizer)
    decoder, device = model.get_decoder(), model.device
    with compressing(model, cache), torch.no_grad():
        first = decoder(prompt_ids.to(device), **cache_argument(cache)).last_hidden_state[0, -1:]
        # The last token predicts nothing in the continuation.
        states, snapshots = _feed(decoder, cache, continuation_ids[:, :-1].to(device), stops)
    return torch.cat([first, *states]).float(), cache, snapshots


def greedy_agreement(model: PreTrainedModel, cache: CompressedCache, state: torch.Tensor, tokens: Sequence[int]) -> int:
    """How many leading `tokens` greedy decoding from a compressed cache reproduces, where `state` is
    the final normed hidden state ``[hidden]`` of the cache's last position (e.g. from `teacher_forced`);
    the cache is consumed.

    While greedy decoding agrees with `tokens`, it has fed exactly those tokens, so its choice at each
    step is the argmax after teacher-forcing them: one blocked pass (compressions at the same times as
    decoding) replaces a forward pass per token, and the count equals that of `greedy_continuation`
    (tested; a different float rounding could only matter at an exact tie between two logits)."""
    if not tokens:
        return 0
    decoder, device = model.get_decoder(), model.device
    with compressing(model, cache), torch.no_grad():
        states, _ = _feed(decoder, cache, torch.tensor([list(tokens[:-1])], device=device))
    choices = logits_of(model, torch.cat([state[None].to(model.dtype), *states])).argmax(dim=-1).tolist()
    return next((i for i, (a, b) in enumerate(zip(choices, tokens)) if a != b), len(tokens))


def greedy_continuation(model: PreTrainedModel, cache: CompressedCache, state: torch.Tensor, steps: int) -> list[int]:
    """Decode `steps` tokens greedily from a compressed cache that has processed a sequence (e.g. after
    `teacher_forced`), starting from `state`, the final normed hidden state ``[hidden]`` of its last
    position; the cache keeps compressing on its schedule."""
    decoder, tokens = model.get_decoder(), []
    with compressing(model, cache), torch.no_grad():
        for _ in range(steps):
            token = int(logits_of(model, state.to(model.dtype)).argmax())
            tokens.append(token)
            position = torch.tensor([[cache.seen]], device=model.device)
            state = decoder(
                torch.tensor([[token]], device=model.device), position_ids=position, **cache_argument(cache)
            ).last_hidden_state[0, -1]
    return tokens
