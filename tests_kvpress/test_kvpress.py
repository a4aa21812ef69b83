"""kvpress both ways, against the real kvpress: our policies as presses, its presses measured by our tracer."""

from __future__ import annotations

import kvpress
import pandas as pd
import pytest
import torch
from transformers import DynamicCache, pipeline

from forward_influence.traces import read_traces
from forward_influence_cli.main import main
from kv_compression.budget import Budget
from kv_compression.kept import layer_scores, top_indices
from kv_compression.kvpress import PolicyPress, kept_positions, press
from kv_compression.offline import observation
from kv_compression.policies import TOVA, CriticalKV, InfoKV, KeyDiff, Knorm, SnapKV, StreamingLLM
from kv_compression.runtime import CompressedCache, compressing

RATIO = 0.75


@pytest.fixture(scope="module")
def ids(loaded):
    return read_traces("essay:gap", loaded.tokenizer, max_tokens=400)[0].token_ids


def test_a_policy_press_keeps_what_our_runtime_keeps(loaded, ids):
    model, kept = loaded.model, int(len(ids) * (1 - RATIO))
    cache = DynamicCache()
    with press("infokv", compression_ratio=RATIO)(model), torch.no_grad():
        model.get_decoder()(input_ids=torch.tensor([ids]), past_key_values=cache)
    ours = CompressedCache(model, InfoKV(), Budget(kept, "count"))
    with compressing(model, ours), torch.no_grad():
        model.get_decoder()(input_ids=torch.tensor([ids]), past_key_values=ours)
        ours.maybe_compress()
    assert all(layer.keys.shape[2] == kept for layer in cache.layers)
    assert all(
        torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(cache.layers, ours.layers)
    )


@pytest.mark.parametrize("name", ["infokv", "snapkv", "h2o"])
def test_our_policies_run_in_kvpress_pipeline(loaded, name):
    pipe = pipeline("kv-press-text-generation", model=loaded.model, tokenizer=loaded.tokenizer)
    context = "The secret passkey is 48213. " + "The grass is green and the sky is blue. " * 40
    answer = pipe(
        context, question="What is the secret passkey?", press=press(name, compression_ratio=0.5), max_new_tokens=12
    )["answer"]
    assert isinstance(answer, str) and answer.strip()
    assert isinstance(press(name, compression_ratio=0.5), kvpress.BasePress)


# Ours and kvpress's, with the fields that make them the same rule.
COUNTERPARTS = [
    (StreamingLLM(sinks=4), kvpress.StreamingLLMPress(compression_ratio=RATIO, n_sink=4)),
    (TOVA(), kvpress.TOVAPress(compression_ratio=RATIO)),
    (Knorm(), kvpress.KnormPress(compression_ratio=RATIO)),
    (SnapKV(window=64, kernel=5), kvpress.SnapKVPress(compression_ratio=RATIO, window_size=64, kernel_size=5)),
    (KeyDiff(), kvpress.KeyDiffPress(compression_ratio=RATIO)),
    # Our inner SnapKV has a 32-token window, inside the first stage's 50 tokens, as kvpress's is.
    (
        CriticalKV(inner="snapkv"),
        kvpress.CriticalKVPress(kvpress.SnapKVPress(compression_ratio=RATIO, window_size=32, kernel_size=5)),
    ),
]


@pytest.mark.parametrize("ours, theirs", COUNTERPARTS, ids=lambda p: type(p).__name__)
def test_our_baselines_keep_the_positions_kvpress_keeps(loaded, ids, ours, theirs):
    """Kept sets equal per layer and KV head, but for near-ties at the cut: a position one keeps and the
    other evicts must score within a rounding of the last kept score (TOVA: kvpress leaves the newest
    token out of the last query's attention and always keeps it; ours scores it, and it ranks first)."""
    from forward_influence.tracer import Tracer

    k = int(len(ids) * (1 - RATIO))
    theirs_kept = kept_positions(loaded.model, ids, theirs)
    obs = observation(Tracer(loaded), ids, [ours])
    scores = layer_scores(ours, obs, [k] * len(obs.layers))
    ours_kept = top_indices(obs, scores, [k] * len(obs.layers))
    differing = 0
    for layer, (a, b) in enumerate(zip(ours_kept, theirs_kept)):
        for head in range(a.shape[1]):
            mine, theirs_set = set(a[0, head].tolist()), set(b[head].tolist())
            row = scores[layer][0, head]
            cut = row[a[0, head]].min()
            for position in mine ^ theirs_set:
                assert abs(row[position] - cut) <= 1e-4 * abs(cut) + 1e-7, (layer, head, position)
            differing += len(mine ^ theirs_set)
    assert differing <= 0.001 * k * len(obs.layers) * 3  # near-ties are rare


def test_a_kvpress_press_is_measured_like_a_policy(capsys, tmp_path):
    out = tmp_path / "s.csv"
    code = main(
        [
            "score",
            "essay:gap",
            "--max-tokens",
            "256",
            "--policy",
            "kvpress:SnapKVPress",
            "--budget",
            "0.25",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    frame = pd.read_csv(out)
    assert frame.keep_share_kvpress.sum() == pytest.approx(64)  # every layer and head keeps a quarter
    assert frame.kept_kvpress.tail(64).all()  # kvpress's SnapKV window (64) is always kept
    code = main(["score", "essay:gap", "--policy", "kvpress:AdaKVPress"])
    assert code == 2 and "kvpress:AdaKVPress: cannot be measured: a wrapper" in capsys.readouterr().err


# What a press is, by kvpress's own classes: the reason each kind is refused.
REFUSED = {
    "AdaKVPress": "a wrapper that selects by its own rule",
    "ThinKPress": "it compresses by its own rule",
    "DecodingPress": "it compresses while decoding",
    "CAMPress": "it compresses while decoding",
    "KVzipPress": "the native policy kvzip measures KVzip",
    "KVgradPress": "the native policy kvzip measures KVzip",
    "ScorerPress": "a base class, not a press",
    "KVPressTextGenerationPipeline": "not a kvpress press",
}


def test_every_kvpress_press_is_measurable_or_refused_in_one_line(capsys, monkeypatch):
    import forward_influence.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    measurable = []
    for name in kvpress.__all__:
        spec = f"kvpress:{name}" + (":press=SnapKVPress" if name == "CriticalKVPress" else "")
        assert main(["score", "essay:gap", "--policy", spec, "--out", "/dev/null/x.csv"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
        if "cannot be measured" in err:
            assert f"kvpress:{name}: cannot be measured: " in err and "measurable are" in err
            assert REFUSED.get(name, "") in err
        else:  # accepted: refused only for the output path, checked after the policy
            assert "/dev/null" in err, (name, err)
            measurable.append(name)
    assert set(measurable) == {n for n in kvpress.__all__ if _scores_every_token(n)}
    assert "CriticalKVPress" in measurable and "KnormPress" in measurable


def _scores_every_token(name: str) -> bool:
    cls = getattr(kvpress, name)
    return isinstance(cls, type) and issubclass(cls, kvpress.ScorerPress) and cls is not kvpress.ScorerPress


def test_a_wrapper_names_its_inner_press(capsys):
    for spec, message in (
        ("CriticalKVPress", "kvpress:CriticalKVPress: a wrapper; name its inner press"),
        ("CriticalKVPress:press=AdaKVPress", "press must name a kvpress ScorerPress that scores by itself"),
        ("CriticalKVPress:press=CriticalKVPress", "press must name a kvpress ScorerPress that scores by itself"),
    ):
        assert main(["score", "essay:gap", "--policy", f"kvpress:{spec}"]) == 2
        assert message in capsys.readouterr().err


def test_criticalkv_measured_through_kvpress_keeps_what_the_native_policy_keeps(loaded, ids):
    """The press runs at each budget's own ratio: its first stage depends on the budget (Knorm inside, the
    same rule on both sides)."""
    from forward_influence.tracer import Tracer
    from kv_compression.kept import kept_indices
    from kv_compression.names import parse

    theirs, ours = parse("kvpress:CriticalKVPress:press=KnormPress"), CriticalKV(inner="knorm")
    obs = observation(Tracer(loaded), ids, [theirs, ours])
    for budget in ("0.1", "0.5"):
        a, b = (kept_indices(p, obs, Budget.parse(budget)) for p in (theirs, ours))
        rows = [(set(x.tolist()), set(y.tolist())) for x, y in zip(a, b) for x, y in zip(x[0], y[0])]
        assert sum(len(x & y) for x, y in rows) / sum(len(x) for x, _ in rows) > 0.99, budget


def test_policy_press_checks_its_ratio():
    with pytest.raises(ValueError, match=r"compression_ratio must lie in \[0, 1\)"):
        PolicyPress(policy=SnapKV(), compression_ratio=1.0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("SnapKVPress:window_size=-5", "kvpress:SnapKVPress: window_size must be a non-negative integer, got -5"),
        ("SnapKVPress:window_size=abc", "kvpress:SnapKVPress: window_size must be an integer, got 'abc'"),
        ("SnapKVPress:kernel_size=1.5", "kvpress:SnapKVPress: kernel_size must be an integer, got '1.5'"),
    ],
)
def test_a_press_field_out_of_range_is_one_line_before_the_model_loads(capsys, monkeypatch, spec, message):
    import forward_influence.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["score", "essay:gap", "--policy", f"kvpress:{spec}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("plus", [False, True])
def test_kvzip_scores_equal_kvpress_kvzip_scores(loaded, ids, monkeypatch, plus):
    """The same score for every entry of every layer and KV head, over four reconstruction chunks, with the
    chat template's header skipped (both score it 0); kvpress keeps every layer's sinks by score, we by +inf."""
    import kvpress.presses.kvzip_press as kvzip_press

    from forward_influence.tracer import Tracer
    from kv_compression.policies import KVzip

    # kvpress reloads the tokenizer by the model's name, which an embedded GGUF model does not have.
    monkeypatch.setattr(kvzip_press.AutoTokenizer, "from_pretrained", lambda *a, **k: loaded.tokenizer)
    theirs = kvpress.KVzipPress(compression_ratio=RATIO, chunk_size=128, kvzip_plus_normalization=plus)
    recorded, compress = {}, theirs.compress_post
    monkeypatch.setattr(
        theirs, "compress_post", lambda model: (recorded.update(s=theirs.score_val.clone()), compress(model))
    )
    with torch.no_grad(), theirs(loaded.model):
        loaded.model.get_decoder()(input_ids=torch.tensor([ids]), past_key_values=DynamicCache())
    ours = KVzip(chunk=128, plus=plus)
    obs = observation(Tracer(loaded), ids, [ours])
    scores = torch.stack([layer[0] for layer in obs.reconstruction[ours.signal()]])  # [layers, kv_heads, tokens]
    expected = recorded["s"][:, 0].float()
    assert (scores == 0).sum() == (expected == 0).sum() > 0  # the header
    assert torch.allclose(scores[..., 4:], expected[..., 4:], rtol=1e-4, atol=1e-6)
