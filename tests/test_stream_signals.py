"""The registry of stream signals: each entry computed online, block by block, equals its offline table."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
import torch

from forward_influence.observation import Reads, observe
from forward_influence.stream_signals import STREAM_SIGNALS
from forward_influence.tracer import Tracer
from kv_compression.budget import Budget
from kv_compression.policies import Knorm
from kv_compression.runtime import teacher_forced

from conftest import VOCAB, tiny_model


@dataclass
class Reading(Knorm):
    """Knorm's scores, with whatever the test asks the cache to record."""

    asked: Reads = Reads()

    def reads(self) -> Reads:
        return self.asked


def _asking(signal) -> Reads:
    default = next(f.default for f in fields(Reads) if f.name == signal.read)
    return Reads(**{signal.read: frozenset({2, 5}) if isinstance(default, frozenset) else True})


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("signal", STREAM_SIGNALS, ids=lambda s: s.field)
def test_each_signal_recorded_in_blocks_equals_its_offline_table(kind, signal):
    loaded = tiny_model(kind)
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(1))
    reads = _asking(signal)
    # The prompt, then the continuation's first 9 tokens in blocks of 4, 3 and 2 (the stops split it).
    _, cache, _ = teacher_forced(
        loaded.model, ids[:20], ids[20:], Reading(asked=reads), Budget.parse("30"), stops=(4, 7)
    )
    assert len(cache.recorder.blocks[signal.field]) == 4
    online = cache.recorder.tables()[signal.field]
    offline = getattr(observe(Tracer(loaded), ids[:29], reads), signal.field)
    if isinstance(offline, dict):
        assert sorted(online) == sorted(offline) == [2, 5]
        online, offline = torch.stack(list(online.values())), torch.stack([offline[k] for k in online])
    assert online.shape == offline.shape and online.shape[-1] == 29
    assert torch.allclose(online, offline, atol=1e-5)


def test_every_reads_field_declares_how_two_asks_merge():
    assert all("merge" in f.metadata for f in fields(Reads))
    merged = Reads(window=4, top_k=frozenset({2}), influence=8) | Reads(
        window=2, top_k=frozenset({5}), layer_change=True
    )
    assert merged == Reads(window=4, top_k=frozenset({2, 5}), influence=8, layer_change=True)
