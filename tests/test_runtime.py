"""The compression runtime: real eviction during generation equals the tracer's masked simulation."""

from __future__ import annotations

import pytest
import torch

from forward_influence.eviction import build_masks
from forward_influence.logits import logits_of
from forward_influence.observation import observe
from forward_influence.tracer import Tracer, expand_cache
from kv_compression.budget import Budget, kept_indices
from kv_compression.policies import POLICIES, H2O, InfoKV, SnapKV
from kv_compression.runtime import CompressedCache, compressing, generate, replay_specs
from forward_influence.errors import InputError

from conftest import VOCAB, tiny_model

WINDOWED = ("snapkv", "pyramidkv", "rkv", "entropy", "evolution", "infokv", "random")


def _policy(name):
    return POLICIES[name](window=4) if name in WINDOWED else POLICIES[name]()


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
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_generation_with_eviction_equals_masked_simulation(kind, name):
    loaded = tiny_model(kind)
    prompt = _prompt()
    out, cache = generate(loaded.model, prompt, _policy(name), Budget.parse("12"), buffer=6, max_new_tokens=20,
                          min_new_tokens=20, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert len(cache.compressions) == 3  # after the prefill, then twice when 12 + 6 is exceeded
    generated = torch.stack(out.logits)[:, 0]
    replayed = masked_replay(Tracer(loaded), out.sequences[0], replay_specs(cache), len(prompt))
    assert (generated - replayed).abs().max() < 1e-3
    sizes = cache.sizes()
    assert sizes["full_tokens"] == 30 + 19
    assert sizes["kept_tokens"] == cache.layer_targets[0] + 6 - 1 if name != "pyramidkv" else sizes["kept_tokens"] < 30


def test_eviction_changes_the_generation_so_the_equality_is_not_vacuous():
    loaded = tiny_model("llama")
    prompt = _prompt()
    with torch.no_grad():
        full = loaded.model.generate(prompt[None], max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    out, _ = generate(loaded.model, prompt, SnapKV(window=4), Budget.parse("8"), buffer=4, max_new_tokens=20,
                      min_new_tokens=20, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert (torch.stack(out.logits) - torch.stack(full.logits)).abs().max() > 1e-2


@pytest.mark.parametrize(
    "policy", [SnapKV(window=4), H2O(recent=4), InfoKV(window=4), InfoKV(window=4, evolution="logit_lens")]
)
def test_online_scores_equal_offline_scores(policy):
    loaded = tiny_model("llama")
    prompt = _prompt()
    out, cache = generate(loaded.model, prompt, policy, Budget.parse("0.4"), buffer=100, max_new_tokens=2, pad_token_id=0)
    assert len(cache.compressions) == 1
    offline = observe(Tracer(loaded), prompt, window=64, top_k=10, logit_lens="logit_lens" in policy.requires())
    kept = kept_indices(policy, offline, Budget.parse("0.4"))
    for layer, positions in cache.compressions[0].kept.items():
        assert torch.equal(positions, kept[layer][0]), layer
    online = cache.last_observation
    for layer in range(4):
        assert torch.allclose(policy.score(online, layer), policy.score(offline, layer), atol=1e-5)


def test_sampling_and_a_plain_loop_work_and_keep_original_positions():
    loaded = tiny_model("llama")
    prompt = _prompt()
    out, cache = generate(loaded.model, prompt, SnapKV(window=4), Budget.parse("10"), buffer=3, max_new_tokens=12,
                          min_new_tokens=12, do_sample=True, top_k=5, pad_token_id=0)
    assert out.shape[1] == 30 + 12 and cache.sizes()["kept_tokens"] <= 13
    cache = CompressedCache(loaded.model, SnapKV(window=4), Budget.parse("10"), buffer=3)
    ids = prompt[None]
    with compressing(loaded.model, cache), torch.no_grad():
        logits = loaded.model(ids, past_key_values=cache).logits
        for step in range(5):
            token = logits[:, -1:].argmax(-1)
            position = torch.tensor([[30 + step]])
            logits = loaded.model(token, position_ids=position, past_key_values=cache).logits
            ids = torch.cat([ids, token], dim=1)
    assert cache.seen == 35 and len(cache.compressions) == 2
    assert loaded.model.config._attn_implementation == "sdpa"  # restored after the block


def test_batches_are_refused_and_a_count_above_the_prompt_evicts_only_while_decoding():
    loaded = tiny_model("llama")
    with pytest.raises(InputError, match="batch size 1"):
        generate(loaded.model, torch.zeros(2, 5, dtype=torch.long), SnapKV(), Budget.parse("4"))
    out, cache = generate(loaded.model, _prompt(10), SnapKV(window=2), Budget.parse("12"), buffer=4,
                          max_new_tokens=20, min_new_tokens=20, pad_token_id=0)
    times = [event.time for event in cache.compressions]
    assert times and min(times) >= 16  # first eviction once the cache outgrows 12 + 4 tokens
    assert cache.sizes()["kept_tokens"] <= 12 + 4


@pytest.mark.slow
@pytest.mark.parametrize("policy", [SnapKV(), InfoKV()])
def test_generation_with_eviction_equals_masked_simulation_on_the_embedded_model(embedded, policy):
    from forward_influence.traces import read_traces

    prompt = torch.tensor(read_traces("essay:gap", embedded.tokenizer, max_tokens=160)[0].token_ids)
    out, cache = generate(embedded.model, prompt, policy, Budget.parse("0.5"), buffer=16, max_new_tokens=40,
                          min_new_tokens=40, output_logits=True, return_dict_in_generate=True)
    assert len(cache.compressions) == 3
    generated = torch.stack(out.logits)[:, 0]
    replayed = masked_replay(embedded, out.sequences[0], replay_specs(cache), len(prompt))
    assert (generated - replayed).abs().max() < 1e-3
