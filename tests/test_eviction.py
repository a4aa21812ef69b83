"""Masking == physical eviction, and the masks themselves, on tiny random models."""

from __future__ import annotations

import pytest
import torch

from forward_influence.errors import InputError
from forward_influence.eviction import AttentionLayout, EvictionSpec, build_masks
from forward_influence.influence import clean_run, evict
from forward_influence.verify import TOLERANCE, masked_logits, physical_logits, verify

from conftest import VOCAB


def _ids(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_masking_equals_physical_eviction_all_layers_per_layer_per_head(tiny):
    table = verify(tiny, _ids())
    assert list(table.case) == ["all layers", "per layer", "per head"]
    assert (table.max_abs_diff < TOLERANCE).all(), table
    # The check is not vacuous: each eviction moves the logits far more than the tolerance allows.
    assert (table.max_effect > 10 * table.max_abs_diff.max()).all(), table


def test_masking_equals_physical_eviction_per_head_differs_from_all_heads(tiny):
    ids = _ids()
    spec = EvictionSpec((3, 9, 17), 29, layers=(1,), heads=(0,))
    one_head = physical_logits(tiny, ids, spec)
    assert (masked_logits(tiny, ids, spec) - one_head).abs().max() < TOLERANCE
    all_heads = physical_logits(tiny, ids, EvictionSpec((3, 9, 17), 29, layers=(1,)))
    assert (one_head - all_heads).abs().max() > 1e-4


def test_empty_eviction_reproduces_the_clean_run(tiny):
    ids = _ids()
    clean = clean_run(tiny, ids)
    result = evict(tiny, clean, [EvictionSpec((), 20)], max_distance=10)
    assert result.kl.shape == (1, 10)
    assert result.kl.max() < 1e-5
    assert (result.top1_agreement == 1).all()
    assert result.hidden_cos.max() < 1e-5


def test_batched_rows_with_different_times_match_single_rows(tiny):
    ids = _ids()
    clean = clean_run(tiny, ids)
    specs = [EvictionSpec((5,), 5), EvictionSpec((2, 11), 20), EvictionSpec((30,), 30, heads=(1,))]
    together = evict(tiny, clean, specs, max_distance=12, batch_size=3)
    for i, spec in enumerate(specs):
        alone = evict(tiny, clean, [spec], max_distance=12, batch_size=1)
        assert torch.allclose(torch.tensor(together.kl[i]), torch.tensor(alone.kl[0]), atol=2e-6, equal_nan=True)
    # Spec 3 evicts at t=30 of a 40-token trace: distances past the end are NaN.
    assert torch.isnan(torch.tensor(together.kl[2, 9:])).all()
    assert not torch.isnan(torch.tensor(together.kl[2, :9])).any()


def test_masks_hide_evicted_keys_only_after_the_eviction_time():
    layout = AttentionLayout(num_layers=2, num_heads=4, num_kv_heads=2, windows=(None, 3))
    positions = torch.arange(8)[None]
    spec = EvictionSpec((2,), 4, layers=(0,), heads=(1,))
    masks = build_masks(layout, [spec], positions, positions)
    visible = masks[0][0] == 0  # [heads, queries, keys]
    assert visible.shape == (4, 8, 8)
    assert visible[:, 4, 2].all()  # query at t still sees the key
    assert not visible[2:, 5:, 2].any()  # KV head 1 = query heads 2, 3 lose it after t
    assert visible[:2, 5:, 2].all()  # KV head 0 keeps it
    assert not visible[:, 3, 4].any()  # causal
    window = masks[1][0, 0] == 0
    assert window[5].tolist() == [False, False, False, True, True, True, False, False]  # q - k < 3


def test_spec_rejects_positions_after_its_time_and_layout_rejects_bad_heads():
    with pytest.raises(InputError, match="eviction time"):
        EvictionSpec((5,), 4)
    layout = AttentionLayout(2, 4, 2, (None, None))
    with pytest.raises(InputError, match="KV heads"):
        layout.check(EvictionSpec((1,), 4, heads=(2,)))
