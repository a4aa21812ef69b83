"""Half precision on the CPU: the core paths run with bfloat16 and float16 models, and masking still equals
physical eviction within each dtype's rounding (`forward_influence.verify.TOLERANCES`), so dtype mistakes
show without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_runtime import masked_replay

from forward_influence.eviction import EvictionSpec
from forward_influence.influence import clean_run, evict
from forward_influence.signals import token_signals
from forward_influence.tracer import Tracer
from forward_influence.verify import TOLERANCES, verify
from kv_compression.budget import Budget
from kv_compression.kept import kept_indices
from kv_compression.offline import observation
from kv_compression.policies import InfoKV, SnapKV
from kv_compression.runtime import generate, replay_specs

from conftest import VOCAB, tiny_model


@pytest.fixture(
    params=[(torch.bfloat16, "llama"), (torch.bfloat16, "gemma3"), (torch.float16, "llama")],
    ids=lambda p: f"{str(p[0]).removeprefix('torch.')}-{p[1]}",
)
def half(request):
    dtype, kind = request.param
    loaded = tiny_model(kind)
    loaded.model.to(dtype)
    return Tracer(loaded), TOLERANCES[dtype]


def _ids(n=48):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0))


def test_masking_equals_physical_eviction_within_the_dtypes_rounding(half):
    tracer, tolerance = half
    table = verify(tracer, _ids())
    assert table.ok.all() and (table.max_abs_diff < tolerance).all()
    assert (table.max_effect > 2 * tolerance).any()  # the check is not vacuous at this tolerance


def test_signals_influence_and_scores_run_in_half_precision(half):
    tracer, _ = half
    ids = _ids().tolist()
    signals = token_signals(tracer, ids, top_k=5, window=4)
    assert np.isfinite(signals.entropy_next).all() and (signals.entropy_next >= 0).all()
    assert np.isfinite(signals.attention_h2o).all()
    kl = evict(tracer, clean_run(tracer, ids), [EvictionSpec((5, 9), 30)], 17).kl[0]
    assert np.isfinite(kl).all() and (kl >= 0).all() and kl.max() > 1e-3
    policy = InfoKV(window=4, top_k=5)
    obs = observation(tracer, ids[:30], [policy])
    kept = kept_indices(policy, obs, Budget.parse("0.5"))
    assert all(k is None or k.shape[-1] == 15 for k in kept)


def test_compressed_generation_equals_masked_replay_in_half_precision(half):
    tracer, tolerance = half
    ids = _ids()
    out, cache = generate(
        tracer.model,
        ids[:30],
        SnapKV(window=4),
        Budget.parse("12"),
        buffer=6,
        max_new_tokens=12,
        min_new_tokens=12,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert len(cache.compressions) >= 2 and cache.layers[1].keys.dtype == tracer.dtype
    replayed = masked_replay(tracer, out.sequences[0], replay_specs(cache), 30)
    assert (torch.stack(out.logits)[:, 0].float() - replayed).abs().max() < tolerance
