"""The fidelity measurement: a policy's compression scored on a teacher-forced continuation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.evaluate import summarize
from analyses.tasks.fidelity import fidelity_rows
from forward_influence.tracer import Tracer
from kv_compression.policies import Random, SnapKV

from conftest import VOCAB, tiny_model


def test_fidelity_rows_measure_each_policy_and_budget_against_the_full_cache():
    tracer = Tracer(tiny_model("llama"))
    ids = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    rows = fidelity_rows(
        tracer,
        "doc",
        ids,
        {"snapkv": SnapKV(window=4), "random": Random(recent=4)},
        ["0.25", "1.0"],
        prefix=40,
        continuation=20,
        far_from=10,
    )
    frame = pd.DataFrame(rows)
    assert len(frame) == 4 and set(frame.policy) == {"snapkv", "random"}
    full = frame[frame.budget == "1.0"]
    assert np.allclose(full[["nll_increase", "kl", "kl_far"]].to_numpy(), 0, atol=1e-5)  # nothing evicted
    assert (full.top1_agreement == 1).all()
    compressed = frame[frame.budget == "0.25"]
    assert (compressed.kl > 1e-3).all() and (compressed.nll_full > 0).all()
    table = summarize(
        frame.assign(task="fidelity", item=["a", "a", "b", "b"]), ["nll_increase", "kl", "kl_far", "top1_agreement"]
    )
    assert {"nll_increase_mean", "nll_increase_ci_low", "kl_far_mean", "top1_agreement_mean"} <= set(table.columns)


def test_a_document_shorter_than_the_prefix_is_refused():
    tracer = Tracer(tiny_model("llama"))
    with pytest.raises(ValueError, match="not more than"):
        fidelity_rows(tracer, "short", list(range(30)), {"random": Random()}, ["0.5"], prefix=40)


def test_each_policy_reads_its_own_top_k_from_the_shared_observation():
    from kv_compression.policies import Entropy

    tracer = Tracer(tiny_model("llama"))
    ids = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    policies = {"k2": Entropy(top_k=2, recent=4), "k50": Entropy(top_k=50, recent=4)}
    rows = fidelity_rows(tracer, "doc", ids, policies, ["0.25"], prefix=40, continuation=20, far_from=10)
    assert rows[0]["kl"] != rows[1]["kl"]  # different k, different entropies, different kept sets
