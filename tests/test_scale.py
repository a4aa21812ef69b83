"""The cost of scale: the memory guard refuses what cannot fit before any weight loads, and the scaling
benchmark runs on a model built from a configuration file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from forward_influence.errors import InputError
from forward_influence.memory import MEMORY_VARIABLE, Shape, check_fits, estimate, parse_bytes
from forward_influence.models import random_model, read_config
from forward_influence.sources import DEFAULT_MODEL
from forward_influence_cli.main import main

from conftest import tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "analyses" / "benchmarks" / "configs"


@pytest.mark.parametrize(
    "name, billions", [("llama-3.1-8b", 8.03), ("llama-3.2-3b", 3.21), ("qwen2.5-7b", 7.62), ("gemma-3-4b", 3.88)]
)
def test_the_shipped_configurations_have_their_models_parameter_counts(name, billions):
    assert Shape.of(read_config(CONFIGS / f"{name}.json")).parameters / 1e9 == pytest.approx(billions, abs=0.01)


def test_the_estimate_counts_parameters_exactly_and_grows_with_length_batch_and_chunk():
    config = read_config(CONFIGS / "tiny-llama.json")
    model = random_model(CONFIGS / "tiny-llama.json").model
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert Shape.of(config).parameters == sum(p.numel() for p in model.parameters()) - norms
    small, large = estimate(config, 512), estimate(config, 1024)
    assert large.cache == 2 * small.cache and large.masks == small.masks == 0
    assert large.activations <= 2 * small.activations  # the readout reads attention a chunk of queries at a time
    replay = estimate(config, 1024, "replay", batch_size=4)
    assert replay.cache == 5 * large.cache and replay.masks == 4 * 1024 * 1024 * 4
    assert estimate(config, 1024, "replay", batch_size=4, chunk=128).masks == replay.masks // 8


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_the_readout_estimate_counts_the_window_mask_sdpa_receives(kind):
    loaded, tokens, seen = tiny_model(kind), 512, []
    for layer in loaded.model.get_decoder().layers:
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
        )
    loaded.model(torch.zeros(1, tokens, dtype=torch.long))
    masks = [(tuple(mask.shape), mask.dtype) for mask in seen if mask is not None]
    peak = estimate(loaded.model.config, tokens, attention=False)
    if kind == "llama":  # full attention: the causal fast path, no mask
        assert masks == [] and peak.masks == 0
    else:  # the sliding layers share one boolean mask, which the kernel copies into the dtype
        assert masks == [((1, 1, tokens, tokens), torch.bool)] * 2 and peak.masks == tokens * tokens * (1 + 4)


def test_the_guard_names_the_largest_halving_of_the_first_option_that_fits(monkeypatch):
    config = read_config(CONFIGS / "tiny-llama.json")
    needed = estimate(config, 2048, "replay", batch_size=16).total
    monkeypatch.setenv(MEMORY_VARIABLE, str(needed - 1))
    with pytest.raises(InputError) as raised:
        check_fits(config, 2048, "replay", batch_size=16, options=("batch_size", "max_tokens"))
    value = int(str(raised.value).rsplit(" ", 1)[1])
    assert str(raised.value).endswith(f"; pass batch_size {value}") and raised.value.parameters == ("batch_size",)
    assert estimate(config, 2048, "replay", batch_size=value).total < needed - 1
    assert estimate(config, 2048, "replay", batch_size=2 * value).total > needed - 1
    monkeypatch.setenv(MEMORY_VARIABLE, "1KiB")
    with pytest.raises(InputError, match=r"and the weights alone take 0\.0 GiB$"):
        check_fits(config, 2048)
    assert parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("16GB") == 16 * 10**9
    monkeypatch.setenv(MEMORY_VARIABLE, "lots")
    with pytest.raises(InputError, match="FORWARD_INFLUENCE_MEMORY='lots' is not a size"):
        check_fits(config, 2048)


@pytest.mark.slow
def test_the_command_line_refuses_a_run_that_cannot_fit_before_the_weights_load(capsys, monkeypatch):
    import forward_influence.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the memory was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setenv(MEMORY_VARIABLE, "1GB")
    code = main(["score", "essay:worked", "--max-tokens", "2048"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err == "error: 2048 tokens need about 1.3 GiB, more than the 0.9 GiB of cpu; pass --max-tokens 1024"


@pytest.mark.slow
def test_the_guard_plans_a_scan_for_the_positions_it_reads_not_the_whole_trace(capsys, monkeypatch):
    import forward_influence.models as models

    def loading(*args, **kwargs):
        raise RuntimeError("the weights load")

    _, config = models.load_parts(DEFAULT_MODEL)
    read = estimate(config, 2048, "replay", batch_size=16, chunk=64).total
    assert estimate(config, 2048, "replay", batch_size=16).total > 4 * read
    monkeypatch.setattr(models, "load_model", loading)
    monkeypatch.setenv(MEMORY_VARIABLE, str(read))
    scan = ["scan", "essay:worked", "--max-tokens", "2048", "--start", "1900", "--end", "1920", "--max-distance", "64"]
    main(scan)
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: RuntimeError: the weights load"
    monkeypatch.setenv(MEMORY_VARIABLE, str(read - 1))
    assert main(scan) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: 2048 tokens need about")


def test_the_scaling_benchmark_runs_on_a_configuration_with_random_weights(tmp_path):
    sys.path.insert(0, str(CONFIGS.parent))
    import bench_scale

    bench_scale.main(["--config", "tiny-llama", "--lengths", "128,256,512", "--quick", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "scale.csv")
    assert list(table.job.unique()) == list(bench_scale.JOBS) and sorted(table.tokens.unique()) == [128, 256, 512]
    assert (table.seconds > 0).all() and (table.time_ratio == table.seconds / table.baseline_seconds).all()
    fits = pd.read_csv(tmp_path / "growth.csv")
    assert list(fits.job) == list(bench_scale.JOBS) and fits.longest_predicted_error.notna().all()
    assert (tmp_path / "scale.png").is_file()


def test_the_benchmark_skips_a_job_whose_estimate_does_not_fit(tmp_path, monkeypatch):
    sys.path.insert(0, str(CONFIGS.parent))
    import bench_scale

    config = read_config(CONFIGS / "tiny-llama.json")
    limit = estimate(config, 512, "readout", attention=True).total - 1
    monkeypatch.setenv(MEMORY_VARIABLE, str(limit))
    bench_scale.main(["--config", "tiny-llama", "--lengths", "128,512", "--quick", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "scale.csv").set_index(["tokens", "job"])
    fits = (table.estimated_mb * 2**20 + Shape.of(config).parameters * 4) <= limit
    assert table.loc[(512, "readout"), "skipped"].startswith("the estimate")
    assert table.seconds.isna().equals(~fits) and table.loc[(128, "readout"), "seconds"] > 0


def test_the_benchmark_resumes_from_the_jobs_it_has(tmp_path):
    sys.path.insert(0, str(CONFIGS.parent))
    import bench_scale

    bench_scale.main(["--config", "tiny-llama", "--lengths", "128", "--quick", "--out", str(tmp_path)])
    first = pd.read_csv(tmp_path / "scale.csv")
    first.head(4).to_csv(tmp_path / "scale.csv", index=False)  # a run stopped after its fourth job
    bench_scale.main(["--config", "tiny-llama", "--lengths", "128,256", "--quick", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "scale.csv")
    assert list(table.tokens) == [128] * 6 + [256] * 6 and list(table.job) == list(bench_scale.JOBS) * 2
    pd.testing.assert_frame_equal(table.head(4), first.head(4))


def test_a_resumed_run_builds_the_cached_prefix_only_for_a_job_that_starts_from_it(tmp_path, monkeypatch):
    sys.path.insert(0, str(CONFIGS.parent))
    import bench_scale

    bench_scale.main(["--config", "tiny-llama", "--lengths", "128", "--quick", "--out", str(tmp_path)])
    first = pd.read_csv(tmp_path / "scale.csv")
    first[first.job != "decode"].to_csv(tmp_path / "scale.csv", index=False)  # a run stopped before decoding

    def refuse(*args, **kwargs):
        raise AssertionError("decoding does not start from a cached prefix")

    monkeypatch.setattr(bench_scale, "clean_run", refuse)
    bench_scale.main(["--config", "tiny-llama", "--lengths", "128", "--quick", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "scale.csv")
    assert list(table.job) == list(bench_scale.JOBS)
    pd.testing.assert_frame_equal(table.head(5), first.head(5))
    with pytest.raises(AssertionError, match="cached prefix"):
        bench_scale.jobs(random_model(CONFIGS / "tiny-llama.json"), 128, True, ["scan_exact"])


def test_the_gpu_script_runs_its_tests_and_the_benchmark_on_a_cpu_with_a_tiny_configuration(tmp_path):
    settings = dict(DEVICE="cpu", CONFIG="tiny-llama", DTYPE="float32", LENGTHS="128,256", OUT=str(tmp_path))
    done = subprocess.run(
        ["bash", str(CONFIGS.parent / "gpu_run.sh")],
        cwd=CONFIGS.parents[2],
        env=dict(os.environ, PYTHON=sys.executable, **settings),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines()[0] == "device: cpu; config: tiny-llama; dtype: float32; lengths: 128,256"
    assert done.stdout.splitlines()[-2:] == ["tests: exit 0", "benchmark: exit 0"]
    assert sorted(pd.read_csv(tmp_path / "scale.csv").tokens.unique()) == [128, 256]
