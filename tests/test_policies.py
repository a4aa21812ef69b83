"""Scoring policies: each rule against a direct computation, budgets, and kept sets replayed exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from forward_influence.errors import InputError
from forward_influence.eviction import build_masks
from forward_influence.logits import logits_of
from forward_influence.models import attention_implementation, cache_argument
from forward_influence.observation import LayerObservation, Observation, observe
from forward_influence.tracer import Tracer, expand_cache
from kv_compression.budget import Budget
from kv_compression.kept import eviction_specs, kept_indices
from kv_compression.offline import observation, reads
from kv_compression.policies import H2O, POLICIES, RKV, TOVA, InfoKV, Knorm, PyramidKV, SnapKV, StreamingLLM
from kv_compression.policies.infokv import normalise

from conftest import ONLINE, VOCAB, small_policy, tiny_model

T = 40


@pytest.fixture(scope="module")
def llama():
    return Tracer(tiny_model("llama"))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def obs(llama, ids):
    return observation(llama, ids, [small_policy(name) for name in ONLINE])


@pytest.fixture(scope="module")
def eager(llama, ids):
    with attention_implementation(llama.model, "eager"), torch.no_grad():
        out = llama.model(ids[None], output_attentions=True, use_cache=True)
    return out


def test_every_policy_scores_each_kv_head_of_each_layer(obs):
    for name in ONLINE:
        policy = small_policy(name)
        for layer in range(len(obs.layers)):
            scores = policy.score(obs, layer)
            assert scores.shape == (1, 2, T), name
            assert not torch.isnan(scores).any(), name


def test_snapkv_is_pooled_window_attention_averaged_over_each_group(obs, eager):
    attn = eager.attentions[2][0]  # [heads, q, k]
    received = attn[:, -4:].mean(dim=1)[None]  # the window's attention, before the group mean
    pooled = torch.nn.functional.avg_pool1d(received[..., :-4], 5, stride=1, padding=2)  # prefix only, padding counted
    expected = pooled.reshape(1, 2, 2, T - 4).mean(dim=2)
    scores = SnapKV(window=4, kernel=5).score(obs, 2)
    assert torch.allclose(scores[..., :-4], expected, atol=1e-6)
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


def _hand_layer(n: int, keys: torch.Tensor | None = None) -> LayerObservation:
    """One layer of one head: `n` keys (zeros unless given), one query at the last position."""
    keys = torch.zeros(1, 1, n, 8) if keys is None else keys
    return LayerObservation(
        keys=keys,
        values=torch.ones(1, 1, n, 8),
        queries=torch.ones(1, 1, 1, 8),
        query_positions=torch.tensor([n - 1]),
        positions=torch.arange(n).expand(1, 1, n),
        cumulative_attention=None,
        scaling=1.0,
    )


def test_rkv_penalises_the_older_copy_of_a_duplicate_key():
    keys = torch.randn(1, 1, 6, 8, generator=torch.Generator().manual_seed(0))
    keys[0, 0, 4] = keys[0, 0, 1]  # token 1 has a later duplicate (token 4)
    scores = RKV(window=1, kernel=1, lam=0.0).score(Observation([_hand_layer(6, keys)]), 0)
    assert scores[0, 0, 1] < 0 and scores[0, 0, 4] == 0 and torch.isinf(scores[0, 0, 5])


def test_infokv_is_the_published_formula_on_a_hand_computed_example():
    # Uniform attention (zero keys): A = 0.2 for each of 5 tokens. Entropies at each position 1..5, so the
    # generated alignment is [unknown, 1, 2, 3, 4] and the unknown first one counts as the largest, 4.
    obs = Observation(
        [_hand_layer(5)],
        entropy_next={256: torch.tensor([[1.0, 2, 3, 4, 5]])},
        final_distance=torch.tensor([[[0.5, 0.0, 0.25, 0.0, 1.0]]]),
    )
    # E = (D + 1) * H = [6, 1, 2.5, 3, 8]; S = 0.9 * 0.2 + 0.1 * softmax(E), computed by hand.
    scores = InfoKV(window=1, kernel=1).score(obs, 0)[0, 0]
    assert scores[:4].tolist() == pytest.approx([0.191798, 0.180079, 0.180356, 0.180587], abs=1e-6)
    assert torch.isinf(scores[4])  # the window (the last query's own token) is kept
    policy = InfoKV()
    assert (
        policy.top_k,
        policy.alpha,
        policy.tau,
        policy.alignment,
        policy.evolution,
        policy.combination,
        policy.sinks,
    ) == (256, 0.9, 1.0, "generated", "to_final", "softmax", 0)
    assert policy.reads().final_distance and policy.reads().top_k == {256} and policy.reads().window == 32


def test_infokv_with_alpha_one_is_snapkv_and_the_other_combinations_normalise_per_head(obs):
    from kv_compression.policies.snapkv import window_attention

    attention = window_attention(obs, 3, 4, 5)
    pure = InfoKV(window=4, top_k=5, alpha=1.0).score(obs, 3)
    assert torch.allclose(pure[..., :-4], attention[..., :-4]) and torch.isinf(pure[..., -4:]).all()
    mixed = InfoKV(window=4, top_k=5, alpha=0.5, combination="zscore").score(obs, 3)
    assert not torch.allclose(mixed[..., :-4], normalise(attention, "zscore")[..., :-4], atol=1e-3)
    x = torch.tensor([[3.0, 1.0, float("inf"), 2.0]])
    assert normalise(x, "rank").tolist() == [[1.0, 0.0, float("inf"), 0.5]]
    z = normalise(x, "zscore")[0, [0, 1, 3]]
    assert abs(z.mean()) < 1e-6 and abs(z.std(unbiased=False) - 1) < 1e-5


def test_final_distance_is_the_cosine_distance_to_the_last_layer(llama, ids, obs):
    outputs = llama.run(ids[None], hidden=True).hidden[1:, 0]  # the stream after each layer
    expected = 1 - torch.nn.functional.cosine_similarity(outputs, outputs[-1:], dim=-1)
    assert torch.allclose(obs.final_distance[0], expected, atol=1e-5)
    assert torch.allclose(obs.final_distance[0, -1], torch.zeros(T), atol=1e-6)
    assert obs.final_distance[0, 0].mean() > 0.05  # early layers are far from the last


def test_expected_attention_equals_the_pre_rope_query_statistics(llama, ids, obs):
    # kvpress's route: project the layer's input states through q_proj (before RoPE), average over the
    # window, rotate by the mean RoPE matrix of the next positions; ours rotates the recorded queries back.
    from kv_compression.policies import ExpectedAttention
    from kv_compression.policies.expected_attention import mean_rotation

    layer, window, future = 2, 4, 16
    attention = llama.model.model.layers[layer].self_attn
    with torch.no_grad():
        inputs = llama.model(ids[None], output_hidden_states=True).hidden_states[layer]
        normed = llama.model.model.layers[layer].input_layernorm(inputs)
        queries = attention.q_proj(normed)[0, -window:].reshape(window, 4, 16).transpose(0, 1)  # [heads, w, dim]
    frequencies = llama.model.model.rotary_emb.inv_freq
    rotation = mean_rotation(torch.arange(T, T + future)[:, None].float() * frequencies, 16)
    mean = queries.mean(dim=1) @ rotation.T  # [heads, dim]
    keys = obs.layers[layer].keys[0].repeat_interleave(2, dim=0)  # [heads, tokens, dim]
    expected = torch.softmax(attention.scaling * torch.einsum("htd,hd->ht", keys[:, 4:], mean), dim=-1)
    expected = expected.reshape(2, 2, -1).mean(dim=1)
    policy = ExpectedAttention(window=window, future=future, covariance=False, value_norm=False)
    scores = policy.score(obs, layer)[0]
    assert torch.allclose(scores[:, 4:], expected, atol=1e-5) and torch.isinf(scores[:, :4]).all()
    full = ExpectedAttention(window=window, future=future).score(obs, layer)[0]
    assert not torch.allclose(full[:, 4:], scores[:, 4:], atol=1e-3)  # covariance and value norms matter


def test_rpc_keeps_the_prompt_while_decoding_and_scores_the_path_by_the_selector_window():
    from kv_compression.policies import RPC

    n = 12
    keys = torch.randn(1, 1, n, 8, generator=torch.Generator().manual_seed(1))
    layer = _hand_layer(n, keys)
    layer.queries = torch.randn(1, 1, 2, 8, generator=torch.Generator().manual_seed(2))
    layer.query_positions = torch.tensor([n - 2, n - 1])
    decoding = RPC(window=2, kernel=1).score(Observation([layer], prompt_length=4), 0)[0, 0]
    assert torch.isinf(decoding[:4]).all() and torch.isinf(decoding[-2:]).all()  # the prompt and the window
    probs = torch.softmax(layer.queries[0, 0] @ keys[0, 0, 4:-2].T, dim=-1)  # softmax over the path alone
    assert torch.allclose(decoding[4:-2], probs.sum(dim=0), atol=1e-6)
    prefill = RPC(window=2, kernel=1).score(Observation([layer]), 0)[0, 0]
    assert torch.isfinite(prefill[:-2]).all()  # with nothing generated, the prompt is the path


def test_options_are_checked_when_a_policy_is_built():
    for build, message in (
        (lambda: SnapKV(group="maxx"), "snapkv: group must be one of mean, max, got 'maxx'"),
        (lambda: SnapKV(window=0), "snapkv: window must be an integer of at least 1"),
        (lambda: InfoKV(alpha=1.5), "infokv: alpha must lie in"),
        (lambda: InfoKV(combination="mean"), "infokv: combination must be one of softmax, zscore, rank"),
        (lambda: H2O(recent=-1), "h2o: recent must be a non-negative integer"),
    ):
        with pytest.raises(InputError) as error:
            build()
        assert message in str(error.value)


def test_budgets_parse_and_reject_bad_values():
    assert Budget.parse("0.25").tokens(100) == 25 and Budget.parse("30").tokens(100) == 30
    grows = Budget.parse("prompt+0.25")
    assert grows.target(prompt=100, seen=500) == 200 and grows.target(prompt=100, seen=100) == 100
    assert Budget.parse("0.25").target(prompt=100, seen=500) == 25 and str(grows) == "prompt+0.25"
    for bad, message in (
        ("0", "positive"),
        ("-3", "positive"),
        ("1.5", "ratio"),
        ("lots", "ratio in"),
        ("prompt+2", r"prompt\+RATIO"),
        ("nan", "positive"),
    ):
        with pytest.raises(InputError, match=message):
            Budget.parse(bad)
    with pytest.raises(InputError, match="larger than the sequence"):
        Budget.parse("200").tokens(100)
    with pytest.raises(InputError, match="grows while decoding"):
        grows.tokens(100)


@pytest.mark.parametrize("policy", [SnapKV(window=4), InfoKV(window=4, top_k=5), Knorm()])
def test_kept_set_gathered_per_head_equals_the_tracers_masked_replay(llama, ids, policy):
    t = 29
    obs = observation(llama, ids[: t + 1], [policy])
    kept = kept_indices(policy, obs, Budget.parse("0.5"))
    # Physical: gather each KV head's kept entries from the prefill cache, then decode with original positions.
    cache = DynamicCache()
    with torch.no_grad():
        llama.model(ids[None, : t + 1], **cache_argument(cache), use_cache=True)
        for layer, index in zip(cache.layers, kept):
            gather = index[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
        physical = []
        for position in range(t + 1, T):
            out = llama.model(
                ids[None, position : position + 1],
                position_ids=torch.tensor([[position]]),
                **cache_argument(cache),
                use_cache=True,
            )
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
    from kv_compression.kept import kept_masks

    masks = kept_masks(SnapKV(window=4), obs, Budget.parse("10", head_floor=0.5))
    uniform = kept_masks(SnapKV(window=4), obs, Budget.parse("10"))
    for mask, flat in zip(masks, uniform):
        assert mask.sum() == flat.sum() == 2 * 10  # the layer's total is unchanged
        assert (mask.sum(-1) >= 5).all()  # each head keeps at least its floor
        assert mask[..., -4:].all()  # the protected window stays
    assert any(not torch.equal(m, u) for m, u in zip(masks, uniform))
    specs = eviction_specs(masks, obs, T - 1)
    assert sum(len(s.positions) for s in specs) == 4 * 2 * T - 4 * 20
    with pytest.raises(InputError, match=r"^head_floor must lie in \[0, 1\], got 1.5"):
        Budget.parse("10", head_floor=1.5)


def test_one_offline_observation_serves_every_policy(llama, ids):
    policies = [SnapKV(window=8), H2O(), InfoKV(top_k=5, window=80), InfoKV(top_k=7, evolution="across_layers")]
    shared = observation(llama, ids, policies)
    assert reads(policies).window == 80 and reads(policies).top_k == {5, 7}
    assert shared.layers[0].queries.shape[2] == min(80, T) and sorted(shared.entropy_next) == [5, 7]
    for policy in policies:  # the shared pass scores exactly as each policy's own
        own = observe(llama, ids, policy.reads())
        assert all(torch.equal(policy.score(shared, layer), policy.score(own, layer)) for layer in range(4))


def test_oracle_keeps_the_tokens_whose_eviction_costs_most(llama, ids):
    from forward_influence.eviction import EvictionSpec
    from forward_influence.influence import clean_run, evict
    from kv_compression.policies import Oracle

    t = 29
    oracle = Oracle(distance=8)
    obs = observation(llama, ids[: t + 1], [oracle], future=ids[t + 1 :].tolist())
    clean = clean_run(llama, ids[: t + 9], hidden=False)
    for j in (3, 17):  # each token evicted alone at t, the mean KL over the next 8 positions
        kl = evict(llama, clean, [EvictionSpec((j,), t)], 8, hidden=False).kl[0]
        assert obs.influence[0, j].item() == pytest.approx(kl.mean(), rel=1e-4)
    kept = kept_indices(oracle, obs, Budget.parse("5"))[0][0, 0]
    assert set(kept.tolist()) == set(obs.influence[0].topk(5).indices.tolist())
    with pytest.raises(InputError, match="needs the tokens that follow"):
        observation(llama, ids, [oracle])


def test_learned_scores_each_token_once_from_its_bands_signals(obs):
    from kv_compression.policies import Learned
    from kv_compression.policies.learned import FEATURES, token_features

    weights = torch.zeros(2, len(FEATURES))
    weights[0, FEATURES.index("attention_cumulative")] = 1.0  # band 1 (layers 0-1): H2O's rank
    weights[1, FEATURES.index("key_norm")] = -1.0  # band 2 (layers 2-3): Knorm's rank
    policy = Learned(bands=2, weights=tuple(weights.flatten().tolist()), intercept=0.5, window=4, sinks=2, recent=4)
    features = token_features(obs, 4)[0]  # [layers, tokens, signals], ranks averaged over the KV heads
    expected = 0.5 + features[:2, :, 1].mean(dim=0) - features[2:, :, FEATURES.index("key_norm")].mean(dim=0)
    for layer in range(4):  # one score per token, the same in every layer and head
        scores = policy.score(obs, layer)
        assert torch.allclose(scores[..., 2:-4], expected[2:-4].expand(1, 2, -1), atol=1e-6)
        assert torch.isinf(scores[..., :2]).all() and torch.isinf(scores[..., -4:]).all()
    derived = len(obs.derived)
    policy.score(obs, 1)
    assert len(obs.derived) == derived  # derived once for all layers
    with pytest.raises(InputError, match="3 weights for 1 band"):
        Learned(weights=(1.0, 2.0, 3.0))


def _outside(kind) -> list:
    """Values outside a field's declaration: below an interval or a count, non-finite, of the wrong type."""
    import math
    import typing

    from kv_compression.policies.base import AT_LEAST_ONE, Interval

    args = typing.get_args(kind)
    interval = next((a for a in args[1:] if isinstance(a, Interval)), None)
    if interval is not None:
        below = interval.low if interval.open_low else interval.low - 0.5
        above = [] if math.isinf(interval.high) else [interval.high + 0.5]
        return [below, *above, float("nan"), "text"]
    if AT_LEAST_ONE in args[1:]:
        return [0, -1, 1.5, True]
    if typing.get_origin(kind) is typing.Literal:
        return ["no-such-option"]
    if kind is bool:
        return ["yes"]
    if kind is int:
        return [-1, 2.5]
    if kind is float:
        return [float("inf"), float("nan")]
    return []


def test_every_policy_field_refuses_values_outside_its_declaration():
    import dataclasses
    import typing

    checked = 0
    for name, cls in POLICIES.items():
        hints = typing.get_type_hints(cls, include_extras=True)
        for field in dataclasses.fields(cls):
            for value in _outside(hints[field.name]):
                with pytest.raises(InputError, match=rf"^{name}: {field.name} must"):
                    cls(**{field.name: value})
                checked += 1
    assert checked > 100  # every policy declares its knobs; the walk is not empty


def test_kvzip_scores_the_largest_attention_of_the_reconstruction_queries(llama, ids):
    """Without a chat template nothing is skipped and one chunk covers the context, so the pass's
    softmax is the model's own causal attention over the context followed by the reconstruction input."""
    from forward_influence.reconstruction import chunk_inputs, reconstruction_prompt
    from kv_compression.policies import KVzip

    policy = KVzip(sinks=2, chunk=64)
    obs = observation(llama, ids, [policy])
    ((start, end, extra),) = chunk_inputs(reconstruction_prompt(llama.tokenizer), ids.tolist(), 64)
    assert (start, end) == (0, T) and extra[-T:] == ids.tolist()
    with attention_implementation(llama.model, "eager"), torch.no_grad():
        attentions = llama.model(torch.cat([ids, torch.tensor(extra)])[None], output_attentions=True).attentions
    for layer, attention in enumerate(attentions):
        expected = attention[0, :, T:, :T].amax(dim=1).reshape(2, 2, T).amax(dim=1)
        assert torch.allclose(obs.reconstruction[policy.signal()][layer][0], expected, atol=1e-5), layer
        scores = policy.score(obs, layer)[0]
        assert torch.isinf(scores[:, :2]).all() and torch.equal(
            scores[:, 2:], obs.reconstruction[policy.signal()][layer][0, :, 2:]
        )


def test_a_later_chunk_quotes_the_previous_one_and_a_chat_header_is_not_reconstructed():
    from forward_influence.reconstruction import ReconstructionPrompt, chunk_inputs

    prompt = ReconstructionPrompt(skip=3, first=(90,), later=(91,), suffix=(92, 93))
    ids = list(range(30))
    passes = chunk_inputs(prompt, ids, 10)
    assert [(s, e) for s, e, _ in passes] == [(3, 13), (13, 23), (23, 30)]
    assert passes[0][2] == [90, 92, 93, *range(3, 13)]
    assert passes[1][2] == [91, *range(5, 13), 92, 93, *range(13, 23)]  # the last 8 tokens of the chunk before


@pytest.mark.slow
def test_the_reconstruction_prompt_of_a_chat_model_closes_the_user_turn(embedded):
    from forward_influence.reconstruction import FIRST, reconstruction_prompt

    tokenizer = embedded.tokenizer
    prompt = reconstruction_prompt(tokenizer)
    header = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(prompt.first) == FIRST
    assert tokenizer.decode(prompt.suffix) == header.split("x")[-1]  # end of the user turn, the assistant's header
    assert prompt.skip == len(tokenizer.encode(header.split("x")[0], add_special_tokens=False))


def test_distilled_scores_each_head_by_its_bands_logistic_regression(obs):
    from kv_compression.policies.learned import features, ranked

    policy = small_policy("distilled")
    weights = torch.tensor(policy.weights).reshape(2, -1)
    for index, layer in enumerate(obs.full_layers):
        which = index * 2 // len(obs.full_layers)  # layers 0-1 in band 0, 2-3 in band 1
        expected = ranked(features(obs, layer, 4)) @ weights[which] + policy.intercepts[which]
        scores = policy.score(obs, layer)
        assert torch.isinf(scores[..., : policy.sinks]).all() and torch.isinf(scores[..., -4:]).all()
        assert torch.allclose(scores[..., policy.sinks : -4], expected[..., policy.sinks : -4])
    assert not torch.equal(policy.score(obs, 0), policy.score(obs, 3))  # heads and bands differ
    with pytest.raises(InputError, match="distilled: 28 weights and 1 intercepts for 2 band"):
        dataclasses.replace(policy, intercepts=(0.0,))
