"""Scoring policies: each rule against a direct computation, budgets, and kept sets replayed exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from forward_influence.errors import InputError
from forward_influence.eviction import build_masks
from forward_influence.logits import logits_of
from forward_influence.observation import LayerObservation, Observation, observe
from forward_influence.tracer import Tracer, expand_cache
from kv_compression.budget import Budget, eviction_specs, kept_indices
from kv_compression.policies import POLICIES, H2O, RKV, TOVA, InfoKV, Knorm, PyramidKV, SnapKV, StreamingLLM
from kv_compression.policies.base import pool
from kv_compression.policies.infokv import normalise

from conftest import VOCAB, tiny_model

T = 40


@pytest.fixture(scope="module")
def llama():
    return Tracer(tiny_model("llama"))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def obs(llama, ids):
    return observe(llama, ids, window=8, top_k=5)


@pytest.fixture(scope="module")
def eager(llama, ids):
    with llama.attention_implementation("eager"), torch.no_grad():
        out = llama.model(ids[None], output_attentions=True, use_cache=True)
    return out


def test_every_policy_scores_each_kv_head_of_each_layer(obs):
    for name, cls in POLICIES.items():
        policy = cls(window=4) if name in ("snapkv", "pyramidkv", "rkv", "entropy", "evolution", "infokv", "random") else cls()
        for layer in range(len(obs.layers)):
            scores = policy.score(obs, layer)
            assert scores.shape == (1, 2, T), name
            assert not torch.isnan(scores).any(), name


def test_snapkv_is_pooled_window_attention_averaged_over_each_group(obs, eager):
    attn = eager.attentions[2][0]  # [heads, q, k]
    received = attn[:, -4:].mean(dim=1)[None]
    expected = pool(received, 5).reshape(1, 2, 2, T).mean(dim=2)
    scores = SnapKV(window=4, kernel=5).score(obs, 2)
    assert torch.allclose(scores[..., :-4], expected[..., :-4], atol=1e-6)
    assert torch.isinf(scores[..., -4:]).all()


def test_h2o_tova_and_knorm_follow_their_rules(obs, eager):
    attn = eager.attentions[1][0]
    h2o = H2O(recent=3).score(obs, 1)
    assert torch.allclose(h2o[..., :-3], attn.sum(dim=1).reshape(2, 2, T).mean(dim=1)[None, :, :-3], atol=1e-5)
    tova = TOVA().score(obs, 1)
    assert torch.allclose(tova[0, 0], attn[:, -1].mean(dim=0), atol=1e-6) and torch.equal(tova[0, 0], tova[0, 1])
    keys = eager.past_key_values.layers[1].keys
    assert torch.allclose(Knorm().score(obs, 1), -keys.norm(dim=-1), atol=1e-6)


def test_streaming_keeps_sinks_and_the_most_recent(obs):
    kept = kept_indices(StreamingLLM(sinks=4), obs, Budget.parse("10"))
    assert kept[0][0, 0].tolist() == [0, 1, 2, 3] + list(range(T - 6, T))


def test_a_budget_below_the_protected_window_keeps_the_most_recent(obs):
    kept = kept_indices(SnapKV(window=8), obs, Budget.parse("5"))
    assert all(index[0, h].tolist() == list(range(T - 5, T)) for index in kept for h in range(2))


def test_pyramid_budgets_fall_with_depth_and_keep_the_total():
    budgets = PyramidKV(window=8, beta=4).layer_budgets(40, 4)
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) - 4 * 40) <= 2


def test_rkv_penalises_the_older_copy_of_a_duplicate_key():
    keys = torch.randn(1, 1, 6, 8, generator=torch.Generator().manual_seed(0))
    keys[0, 0, 4] = keys[0, 0, 1]  # token 1 has a later duplicate (token 4)
    layer = LayerObservation(
        keys=keys, values=keys, queries=torch.randn(1, 1, 1, 8), query_positions=torch.tensor([5]),
        positions=torch.arange(6).expand(1, 1, 6), cumulative_attention=torch.zeros(1, 1, 6), scaling=1.0,
    )
    obs = Observation([layer], torch.zeros(1, 6), torch.zeros(1, 6), torch.zeros(1, 1, 6))
    scores = RKV(window=1, kernel=1, lam=0.0).score(obs, 0)
    assert scores[0, 0, 1] < 0 and scores[0, 0, 4] == 0 and torch.isinf(scores[0, 0, 5])


def test_infokv_without_entropy_ranks_like_snapkv_and_normalises_per_head(obs):
    attention_only = InfoKV(window=4, weight=0.0, sinks=0).score(obs, 3)
    expected = normalise(SnapKV(window=4).attention(obs, 3), "zscore")
    assert torch.allclose(attention_only[..., :-4], expected[..., :-4], atol=1e-5)
    assert torch.isinf(attention_only[..., -4:]).all()
    with_entropy = InfoKV(window=4, weight=1.0, sinks=0).score(obs, 3)
    assert not torch.allclose(with_entropy[..., :-4], expected[..., :-4], atol=1e-3)
    x = torch.tensor([[3.0, 1.0, float("inf"), 2.0]])
    assert normalise(x, "rank").tolist() == [[1.0, 0.0, float("inf"), 0.5]]
    z = normalise(x, "zscore")[0, [0, 1, 3]]
    assert abs(z.mean()) < 1e-6 and abs(z.std(unbiased=False) - 1) < 1e-5


def test_budgets_parse_and_reject_bad_values():
    assert Budget.parse("0.25").tokens(100) == 25 and Budget.parse("30").tokens(100) == 30
    for bad, message in (("0", "positive"), ("-3", "positive"), ("1.5", "ratio"), ("lots", "ratio in")):
        with pytest.raises(InputError, match=message):
            Budget.parse(bad)
    with pytest.raises(InputError, match="larger than the sequence"):
        Budget.parse("200").tokens(100)


@pytest.mark.parametrize("policy", [SnapKV(window=4), InfoKV(window=4), Knorm()])
def test_kept_set_gathered_per_head_equals_the_tracers_masked_replay(llama, ids, policy):
    t = 29
    obs = observe(llama, ids[: t + 1], window=4, top_k=5)
    kept = kept_indices(policy, obs, Budget.parse("0.5"))
    # Physical: gather each KV head's kept entries from the prefill cache, then decode with original positions.
    cache = DynamicCache()
    with torch.no_grad():
        llama.model(ids[None, : t + 1], past_key_values=cache, use_cache=True)
        for layer, index in zip(cache.layers, kept):
            gather = index[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
        physical = []
        for position in range(t + 1, T):
            out = llama.model(ids[None, position : position + 1], position_ids=torch.tensor([[position]]),
                              past_key_values=cache, use_cache=True)
            physical.append(out.logits[0, -1])
    # Masked: the tracer's replay of the same evictions.
    specs = eviction_specs(kept, obs, t)
    prefix = llama.run(ids[None, : t + 1], use_cache=True)
    queries = torch.arange(t + 1, T)[None]
    masks = build_masks(llama.layout, [specs], queries, torch.arange(T)[None])
    out = llama.run(ids[None, t + 1 :], position_ids=queries, masks=masks, cache=expand_cache(prefix.cache, t + 1, 1))
    masked = logits_of(llama.model, out.final[0])
    assert (masked - torch.stack(physical)).abs().max() < 1e-4
    with torch.no_grad():
        clean = llama.model(ids[None]).logits[0, t + 1 :]
    assert (masked - clean).abs().max() > 1e-2  # the eviction matters, so the agreement is not vacuous
    assert len(specs) == 4 * 2 and all(len(s.positions) == 15 for s in specs)  # 30 tokens, budget 0.5


def test_per_head_allocation_pools_the_layer_budget_with_a_floor(obs):
    from kv_compression.budget import kept_masks

    masks = kept_masks(SnapKV(window=4), obs, Budget.parse("10", head_floor=0.5))
    uniform = kept_masks(SnapKV(window=4), obs, Budget.parse("10"))
    for mask, flat in zip(masks, uniform):
        assert mask.sum() == flat.sum() == 2 * 10  # the layer's total is unchanged
        assert (mask.sum(-1) >= 5).all()  # each head keeps at least its floor
        assert mask[..., -4:].all()  # the protected window stays
    assert any(not torch.equal(m, u) for m, u in zip(masks, uniform))
    specs = eviction_specs(masks, obs, T - 1)
    assert sum(len(s.positions) for s in specs) == 4 * 2 * T - 4 * 20
    with pytest.raises(InputError, match="per-head floor"):
        Budget.parse("10", head_floor=1.5)


def test_offline_observations_share_one_pass_per_top_k(llama, ids, obs):
    from kv_compression.offline import MIN_WINDOW, observations

    policies = [SnapKV(window=8), H2O(), InfoKV(top_k=5, window=80)]
    first, second, third = observations(llama, ids, policies)
    assert first is second and third is not first  # H2O and SnapKV use the default k = 10
    assert (first.top_k, third.top_k) == (10, 5)
    assert first.layers[0].queries.shape[2] == min(80, T) and MIN_WINDOW < 80  # the longest window asked for
    assert torch.equal(third.entropy_next, obs.entropy_next)  # the same entropies as observing with k = 5
    # A policy slices its own window, so the longer observation gives the scores of its own one.
    assert torch.equal(SnapKV(window=8).score(first, 1), SnapKV(window=8).score(obs, 1))
