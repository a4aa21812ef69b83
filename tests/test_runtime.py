"""The compression runtime: real eviction during generation equals the tracer's masked simulation."""

from __future__ import annotations

import pytest
import torch

from forward_influence.errors import InputError
from forward_influence.eviction import build_masks
from forward_influence.logits import logits_of
from forward_influence.models import cache_argument
from forward_influence.tracer import Tracer, expand_cache
from kv_compression.budget import Budget
from kv_compression.kept import kept_indices
from kv_compression.offline import observation
from kv_compression.policies import ExpectedAttention, InfoKV, SnapKV
from kv_compression.runtime import (
    CompressedCache,
    compressing,
    generate,
    greedy_agreement,
    greedy_continuation,
    replay_specs,
    teacher_forced,
)

from conftest import ONLINE, VOCAB, small_policy, tiny_model


def _prompt(n=30, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def masked_replay(tracer: Tracer, ids: torch.Tensor, specs, prompt_length: int) -> torch.Tensor:
    """Logits that produced each generated token, from the tracer's masked simulation."""
    t = prompt_length - 1
    prefix = tracer.run(ids[None, : t + 1], use_cache=True)
    queries = torch.arange(t + 1, len(ids))[None]
    masks = build_masks(tracer.layout, [specs], queries, torch.arange(len(ids))[None])
    out = tracer.run(ids[None, t + 1 :], position_ids=queries, masks=masks, cache=expand_cache(prefix.cache, t + 1, 1))
    return torch.cat([logits_of(tracer.model, prefix.final[0, -1:]), logits_of(tracer.model, out.final[0, :-1])])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("name", ONLINE)
def test_generation_with_eviction_equals_masked_simulation(kind, name):
    loaded = tiny_model(kind)
    prompt = _prompt()
    out, cache = generate(
        loaded.model,
        prompt,
        small_policy(name),
        Budget.parse("12"),
        buffer=6,
        max_new_tokens=20,
        tokenizer=loaded.tokenizer,
        min_new_tokens=20,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    # After the prefill, then every 6 new tokens: the 19 decoding passes compress at passes 7, 13 and 19.
    assert [event.time for event in cache.compressions] == [29, 35, 41, 47]
    generated = torch.stack(out.logits)[:, 0]
    replayed = masked_replay(Tracer(loaded), out.sequences[0], replay_specs(cache), len(prompt))
    assert (generated - replayed).abs().max() < 1e-3
    sizes = cache.sizes()
    assert sizes["full_tokens"] == 30 + 19
    first = cache.full_layers[0]
    assert sizes["kept_tokens"] == cache.planned[first] + 1 and (name == "pyramidkv" or cache.planned[first] == 12)


def test_eviction_changes_the_generation_so_the_equality_is_not_vacuous():
    loaded = tiny_model("llama")
    prompt = _prompt()
    with torch.no_grad():
        full = loaded.model.generate(
            prompt[None],
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    out, _ = generate(
        loaded.model,
        prompt,
        SnapKV(window=4),
        Budget.parse("8"),
        buffer=4,
        max_new_tokens=20,
        min_new_tokens=20,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert (torch.stack(out.logits) - torch.stack(full.logits)).abs().max() > 1e-2


@pytest.mark.parametrize(
    "policy",
    [
        *(small_policy(name) for name in ONLINE),
        InfoKV(window=4, evolution="logit_lens", top_k=5),
        InfoKV(window=4, evolution="across_layers", combination="rank"),
        ExpectedAttention(window=8),
    ],
    ids=lambda p: repr(p)[:40],
)
def test_online_scores_equal_offline_scores(policy):
    loaded = tiny_model("llama")
    prompt = _prompt()
    out, cache = generate(
        loaded.model,
        prompt,
        policy,
        Budget.parse("0.4"),
        buffer=100,
        max_new_tokens=2,
        tokenizer=loaded.tokenizer,
        pad_token_id=0,
    )
    assert len(cache.compressions) == 1
    offline = observation(Tracer(loaded), prompt, [policy])
    kept = kept_indices(policy, offline, Budget.parse("0.4"))
    for layer, positions in cache.compressions[0].kept.items():
        assert torch.equal(positions, kept[layer][0]), layer
    online = cache.last_observation
    for layer in range(4):
        assert torch.allclose(policy.score(online, layer), policy.score(offline, layer), atol=1e-5)


def test_sampling_and_a_plain_loop_work_and_keep_original_positions():
    loaded = tiny_model("llama")
    prompt = _prompt()
    out, cache = generate(
        loaded.model,
        prompt,
        SnapKV(window=4),
        Budget.parse("10"),
        buffer=3,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=True,
        top_k=5,
        pad_token_id=0,
    )
    assert out.shape[1] == 30 + 12 and cache.sizes()["kept_tokens"] <= 10 + 3
    cache = CompressedCache(loaded.model, SnapKV(window=4), Budget.parse("10"), buffer=3)
    ids = prompt[None]
    with compressing(loaded.model, cache), torch.no_grad():
        logits = loaded.model(ids, **cache_argument(cache)).logits
        for step in range(5):
            token = logits[:, -1:].argmax(-1)
            position = torch.tensor([[30 + step]])
            logits = loaded.model(token, position_ids=position, **cache_argument(cache)).logits
            ids = torch.cat([ids, token], dim=1)
    assert cache.seen == 35 and [event.time for event in cache.compressions] == [29, 32]
    assert loaded.model.config._attn_implementation == "sdpa"  # restored after the block


def test_batches_are_refused_and_a_count_above_the_prompt_evicts_only_while_decoding():
    loaded = tiny_model("llama")
    with pytest.raises(InputError, match="batch size 1"):
        generate(loaded.model, torch.zeros(2, 5, dtype=torch.long), SnapKV(), Budget.parse("4"))
    out, cache = generate(
        loaded.model,
        _prompt(10),
        SnapKV(window=2),
        Budget.parse("12"),
        buffer=4,
        max_new_tokens=20,
        min_new_tokens=20,
        pad_token_id=0,
    )
    times = [event.time for event in cache.compressions]
    assert times == [15, 19, 23, 27]  # the first once the cache holds 12 + 4 tokens, then every 4
    assert cache.sizes()["kept_tokens"] <= 12 + 4
    with pytest.raises(InputError, match="larger than the prompt plus the new tokens"):
        generate(loaded.model, _prompt(10), SnapKV(), Budget.parse("100"), max_new_tokens=20)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [SnapKV(), InfoKV()])
def test_generation_with_eviction_equals_masked_simulation_on_the_embedded_model(embedded, policy):
    from forward_influence.traces import read_traces

    prompt = torch.tensor(read_traces("essay:gap", embedded.tokenizer, max_tokens=160)[0].token_ids)
    out, cache = generate(
        embedded.model,
        prompt,
        policy,
        Budget.parse("0.5"),
        buffer=16,
        max_new_tokens=40,
        min_new_tokens=40,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert len(cache.compressions) == 3
    generated = torch.stack(out.logits)[:, 0]
    replayed = masked_replay(embedded, out.sequences[0], replay_specs(cache), len(prompt))
    assert (generated - replayed).abs().max() < 1e-3


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("budget", ["12", "0.5", "prompt+0.5"])
def test_teacher_forcing_in_blocks_equals_decoding_one_token_at_a_time(kind, budget):
    loaded = tiny_model(kind)
    prompt, continuation = _prompt(20, seed=1), _prompt(40, seed=2)
    policy, parsed = InfoKV(window=4, top_k=5), Budget.parse(budget)
    states, blocks, _ = teacher_forced(loaded.model, prompt, continuation, policy, parsed, buffer=6)
    step = CompressedCache(loaded.model, policy, parsed, buffer=6)
    logits = []
    with compressing(loaded.model, step), torch.no_grad():
        logits.append(loaded.model(prompt[None], **cache_argument(step), logits_to_keep=1).logits[0, -1])
        for i in range(39):
            out = loaded.model(
                continuation[None, i : i + 1], position_ids=torch.tensor([[20 + i]]), **cache_argument(step)
            )
            logits.append(out.logits[0, -1])
    assert [e.time for e in blocks.compressions] == [e.time for e in step.compressions] and len(step.compressions) >= 5
    for a, b in zip(blocks.compressions, step.compressions):
        assert all(torch.equal(a.kept[layer], b.kept[layer]) for layer in a.kept)
    assert (logits_of(loaded.model, states) - torch.stack(logits)).abs().max() < 1e-4


def test_greedy_continuation_after_teacher_forcing_equals_decoding_one_token_at_a_time():
    loaded = tiny_model("llama")
    prompt, continuation = _prompt(20, seed=1), _prompt(10, seed=2)
    policy, budget = SnapKV(window=4), Budget.parse("12")
    states, cache, snapshots = teacher_forced(loaded.model, prompt, continuation, policy, budget, buffer=6, stops=(5,))
    forced, differing = cache.snapshot(), cache.snapshot()
    tokens = greedy_continuation(loaded.model, cache, states[-1], 8)
    # Forcing the greedy tokens counts all of them; forcing tokens that differ from the fourth on counts three.
    assert greedy_agreement(loaded.model, forced, states[-1], tokens) == 8
    other = tokens[:3] + [(t + 1) % VOCAB for t in tokens[3:]]
    assert greedy_agreement(loaded.model, differing, states[-1], other) == 3
    assert len(forced.compressions) == len(cache.compressions)  # the forced pass compressed at the same times
    # A snapshot taken on the way decodes as the replay of that prefix would, and leaves the cache as it was.
    prefix_states, prefix_cache, _ = teacher_forced(loaded.model, prompt, continuation[:6], policy, budget, buffer=6)
    assert torch.allclose(states[:6], prefix_states, atol=1e-5)
    assert greedy_continuation(loaded.model, snapshots[5], states[5], 8) == greedy_continuation(
        loaded.model, prefix_cache, prefix_states[-1], 8
    )
    step, expected = CompressedCache(loaded.model, policy, budget, buffer=6), []
    with compressing(loaded.model, step), torch.no_grad():
        logits = loaded.model(prompt[None], **cache_argument(step)).logits[0, -1]
        fed = continuation[:9].tolist()
        for position in range(20, 20 + 9 + 8):
            token = fed[position - 20] if position < 29 else int(logits.argmax())
            if position >= 29:
                expected.append(token)
            logits = loaded.model(
                torch.tensor([[token]]), position_ids=torch.tensor([[position]]), **cache_argument(step)
            ).logits[0, -1]
    assert tokens[0] == int(logits_of(loaded.model, states[-1]).argmax())
    assert tokens == expected[:8] and len(step.compressions) == len(cache.compressions) >= 3


def test_the_runtime_refuses_a_policy_that_reads_the_future():
    from kv_compression.policies import Oracle

    with pytest.raises(InputError, match="policy 'oracle' scores from a measured trace only"):
        generate(tiny_model("llama").model, _prompt(), Oracle(), Budget.parse("12"))
