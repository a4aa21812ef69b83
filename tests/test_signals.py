"""Token signals, chunked entropy and KL, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forward_influence.errors import InputError
from forward_influence.logits import entropies, kl_and_agreement, logits_of, references
from forward_influence.models import attention_implementation
from forward_influence.selection import canonical, select_top
from forward_influence.signals import token_signals
from forward_influence.tracer import Tracer

from conftest import VOCAB, tiny_model


@pytest.fixture(scope="module")
def llama():
    return Tracer(tiny_model("llama"))


def _ids(n=30):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(3))


def test_signals_match_a_plain_forward_with_attentions(llama):
    ids = _ids()
    signals = token_signals(llama, ids, top_k=5, window=4)
    with attention_implementation(llama.model, "eager"), torch.no_grad():
        out = llama.model(ids[None], output_attentions=True, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0].float(), -1)
    full = -(logp.exp() * logp).sum(-1)
    top = torch.log_softmax(out.logits[0].topk(5, -1).values, -1)
    top_entropy = -(top.exp() * top).sum(-1)
    np.testing.assert_allclose(signals.entropy_full, full.numpy(), atol=1e-5)
    np.testing.assert_allclose(signals.entropy_next, top_entropy.numpy(), atol=1e-5)
    np.testing.assert_allclose(signals.entropy_generated[1:], top_entropy[:-1].numpy(), atol=1e-5)
    assert np.isnan(signals.entropy_generated[0])
    attn = torch.stack(out.attentions)[:, 0]  # [layers, heads, q, k]
    np.testing.assert_allclose(signals.attention_snapkv_layers, attn[:, :, -4:].mean(2).numpy(), atol=1e-6)
    np.testing.assert_allclose(signals.attention_h2o_layers, attn.sum(2).numpy(), atol=1e-5)
    # Cumulative attention over all queries sums to the number of queries, per layer and head.
    np.testing.assert_allclose(signals.attention_h2o_layers.sum(-1), len(ids), rtol=1e-5)
    hidden = torch.stack(out.hidden_states)  # embeddings, then the output of each layer (the last one normed)
    assert signals.evolution_layers.shape == (4, len(ids))
    first = 1 - torch.nn.functional.cosine_similarity(hidden[0, 0], hidden[1, 0], dim=-1)
    np.testing.assert_allclose(signals.evolution_layers[0], first.numpy(), atol=1e-5)


def test_signal_table_has_the_documented_columns(llama):
    table = token_signals(llama, _ids(12)).table(llama.tokenizer)
    assert list(table.columns) == [
        "position",
        "token",
        "entropy_generated",
        "entropy_next",
        "entropy_full",
        "attention_snapkv",
        "attention_h2o",
        "evolution",
    ]
    assert table.token.iloc[0] == llama.tokenizer.decode([int(_ids(12)[0])])


def test_chunked_entropy_does_not_depend_on_the_chunk_size(llama):
    final = llama.run(_ids()[None]).final[0]
    a = entropies(llama.model, final, top_k=7, chunk=4)
    b = entropies(llama.model, final, top_k=7, chunk=1000)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_fast_kl_equals_the_direct_kl(llama):
    ids = _ids()
    final = llama.run(ids[None]).final[0]
    other = final + 0.05 * torch.randn_like(final, generator=None)
    positions = torch.arange(len(ids))
    fast, agree, nll = kl_and_agreement(llama.model, references(llama.model, final, ids), positions, other)
    p = torch.log_softmax(logits_of(llama.model, final), -1)
    q = torch.log_softmax(logits_of(llama.model, other), -1)
    direct = (p.exp() * (p - q)).sum(-1)
    assert torch.allclose(fast, direct, atol=2e-6)
    assert torch.equal(agree, p.argmax(-1) == q.argmax(-1))
    following = torch.cat([ids[1:], ids[-1:]])
    expected = p.gather(-1, following[:, None])[:, 0] - q.gather(-1, following[:, None])[:, 0]
    assert torch.allclose(nll, expected, atol=1e-5)


def test_selection_takes_the_top_fraction_after_the_sinks():
    scores = np.array([9.0, 9.0, 1.0, 5.0, np.nan, 3.0, 4.0, 0.0, 7.0, 2.0])
    assert select_top(scores, 0.2, time=9, sinks=2) == (3, 8)
    assert select_top(scores, 0.3, time=6, sinks=2) == (3, 6)  # round(0.3 * 7) = 2; only positions <= t
    random_a = select_top(None, 0.3, time=9, sinks=2, seed=1)
    assert random_a == select_top(None, 0.3, time=9, sinks=2, seed=1) and min(random_a) >= 2
    assert canonical("h2o") == "attention_h2o"
    with pytest.raises(InputError, match="fraction"):
        select_top(scores, 1.0, time=9)
    with pytest.raises(InputError, match="unknown selection"):
        canonical("loudness")


def test_fast_top_k_entropies_equal_the_float32_computation(llama):
    from forward_influence.logits import CANDIDATE_MARGIN, topk_entropies

    final = llama.run(_ids(64)[None]).final[0]
    logits = logits_of(llama.model, final)
    assert 10 + CANDIDATE_MARGIN < logits.shape[-1]  # k = 10 takes the bfloat16 candidate search
    fast = topk_entropies(llama.model, final, (3, 10, 200))
    for k in (3, 10, 200):  # 200 exceeds the vocabulary: the whole distribution
        top = torch.log_softmax(logits.topk(min(k, logits.shape[-1]), -1).values, -1)
        assert torch.allclose(fast[k], -(top.exp() * top).sum(-1), atol=1e-6), k
