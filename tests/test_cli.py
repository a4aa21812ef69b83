"""The command line: outputs, formats, and one-line errors with exit code 2 and no partial files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from forward_influence_cli.main import main

pytestmark = pytest.mark.slow  # these load the embedded model (once per process)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_score_writes_the_documented_columns(capsys, tmp_path):
    out = tmp_path / "gap.csv"
    code, stdout, _ = run(capsys, "score", "essay:gap", "--max-tokens", "40", "--out", str(out))
    assert code == 0 and stdout.strip().splitlines()[-1] == str(out)
    frame = pd.read_csv(out)
    assert list(frame.columns) == [
        "position",
        "token",
        "entropy_generated",
        "entropy_next",
        "entropy_full",
        "attention_snapkv",
        "attention_h2o",
        "evolution",
    ]
    assert len(frame) == 40 and frame.entropy_generated.isna().sum() == 1
    assert (frame.entropy_next <= frame.entropy_full + 1e-6).mean() > 0.9  # top-10 rarely exceeds the full entropy


def test_score_jsonl_to_stdout(capsys):
    code, stdout, _ = run(capsys, "score", "essay:gap", "--max-tokens", "8", "--format", "jsonl")
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and [r["position"] for r in rows] == list(range(8))


def test_influence_and_scan_tables(capsys, tmp_path):
    out = tmp_path / "influence.csv"
    code, _, _ = run(
        capsys,
        "influence",
        "essay:gap",
        "--max-tokens",
        "96",
        "--evict-at",
        "63",
        "--select",
        "entropy,attention,random",
        "--fraction",
        "0.1",
        "--out",
        str(out),
    )
    table = pd.read_csv(out)
    assert code == 0 and set(table.selection) == {"entropy_next", "attention_snapkv", "random"}
    assert list(table.bucket.unique()) == ["1-8", "9-32"]
    code, stdout, _ = run(
        capsys,
        "scan",
        "essay:gap",
        "--max-tokens",
        "64",
        "--start",
        "30",
        "--end",
        "33",
        "--max-distance",
        "16",
        "--format",
        "csv",
    )
    lines = stdout.strip().splitlines()
    assert code == 0 and lines[0] == "position,token,fi_near,fi_far,fi_total" and len(lines) == 4


def test_scan_gradient_estimates_every_token_at_a_common_time(capsys, tmp_path):
    out = tmp_path / "gradient.csv"
    argv = ["scan", "essay:gap", "--max-tokens", "512", "--start", "256", "--end", "512"]
    code, stdout, err = run(capsys, *argv, "--method", "gradient", "--out", str(out))
    assert code == 0 and stdout.strip().splitlines()[-1] == str(out)
    assert "evicted at the common time 447" in err  # 64 positions of the 512 follow it
    table = pd.read_csv(out)
    assert list(table.columns) == ["position", "token", "fi_near", "fi_far"] and len(table) == 256
    assert table.fi_far[:192].notna().all() and table.fi_far[192:].isna().all()  # 448.. come after t
    code, stdout, _ = run(capsys, *argv[:4], "--start", "440", "--end", "448", "--time", "447", "--format", "csv")
    exact = pd.read_csv(io.StringIO(stdout))
    assert code == 0 and exact.fi_far.notna().all()  # the exact scan at the same common time, for comparison


def test_verify_passes_on_the_embedded_model(capsys):
    code, stdout, _ = run(capsys, "verify", "--max-tokens", "48")
    assert code == 0
    assert "within the 0.001 tolerance" in stdout.splitlines()[-1]
    assert stdout.count("True") == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["influence", "essay:gap", "--fraction", "1.5"], "fraction must lie in (0, 1)"),
        (["influence", "missing.txt"], "no such trace file: missing.txt"),
        (["score", "essay:nope"], "no essay matches 'nope'"),
        (["influence", "essay:gap", "--max-tokens", "50", "--evict-at", "60"], "is beyond trace 'essay:gap'"),
        (
            ["scan", "essay:gap", "--max-tokens", "30", "--start", "10", "--end", "40"],
            "scan range [10, 40) must lie in [0, 30]",
        ),
        (
            ["scan", "essay:gap", "--start", "10", "--end", "20", "--method", "gradient", "--time", "5"],
            "--time 5 comes before --start 10",
        ),
        (
            ["scan", "essay:gap", "--max-tokens", "40", "--start", "0", "--end", "40", "--method", "gradient"],
            "lower --max-distance or give --time",
        ),
        (["influence", "essay:gap", "--select", "loudness"], "unknown selection 'loudness'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    code, stdout, stderr = run(capsys, *argv)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr


def test_malformed_jsonl_and_empty_trace(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": oops}\n')
    code, _, stderr = run(capsys, "score", str(bad))
    assert code == 2 and "line 2: malformed JSON" in stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, _, stderr = run(capsys, "score", str(empty))
    assert code == 2 and "is empty" in stderr


def test_a_failed_run_leaves_no_partial_output(capsys, tmp_path):
    out = tmp_path / "table.csv"
    code, _, _ = run(capsys, "influence", "essay:gap", "--max-tokens", "50", "--evict-at", "60", "--out", str(out))
    assert code == 2 and not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_model_from_a_fresh_process():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "forward_influence_cli", "score", "essay:gap", "--model", "no-such/model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown model 'no-such/model'")
    assert "Traceback" not in result.stderr


def test_generate_prints_the_completion_then_the_cache_sizes(capsys):
    code, stdout, _ = run(
        capsys,
        "generate",
        "--trace",
        "essay:gap",
        "--max-tokens",
        "200",
        "--policy",
        "snapkv",
        "--budget",
        "0.25",
        "--buffer",
        "8",
        "--max-new-tokens",
        "12",
    )
    last = stdout.strip().splitlines()[-1]
    assert code == 0 and last.startswith("cache: full_tokens=")
    sizes = dict(item.split("=") for item in last.removeprefix("cache: ").split())
    assert int(sizes["full_tokens"]) == 200 + 11 and int(sizes["kept_tokens"]) <= 50 + 8
    assert int(sizes["kept_bytes"]) < int(sizes["full_bytes"]) / 3


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_generate_with_the_packaged_distilled_weights_of_each_embedded_model(model, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FORWARD_INFLUENCE_HOME", str(tmp_path))  # no user file: the packaged weights are drawn
    code, stdout, err = run(
        capsys,
        "generate",
        "Hello",
        "--model",
        model,
        "--policy",
        "distilled",
        "--budget",
        "0.5",
        "--max-new-tokens",
        "8",
    )
    assert code == 0 and f"(from the packaged distilled {model}.json)" in err
    sizes = dict(item.split("=") for item in stdout.strip().splitlines()[-1].removeprefix("cache: ").split())
    assert int(sizes["kept_tokens"]) < int(sizes["full_tokens"])


def test_score_with_policies_adds_score_and_kept_columns(capsys, tmp_path):
    out = tmp_path / "s.csv"
    code, _, _ = run(
        capsys,
        "score",
        "essay:gap",
        "--max-tokens",
        "64",
        "--policy",
        "snapkv,infokv",
        "--budget",
        "40",
        "--out",
        str(out),
    )
    frame = pd.read_csv(out)
    assert code == 0
    for name in ("snapkv", "infokv"):
        assert {f"score_{name}", f"keep_share_{name}", f"kept_{name}"} <= set(frame.columns)
        assert frame[f"kept_{name}"].isin([0, 1]).all()
        assert frame[f"kept_{name}"].tail(32).all()  # the observation window is always kept
    assert frame.keep_share_snapkv.sum() == pytest.approx(40)  # each layer and head keeps 40 tokens
    code, _, _ = run(
        capsys,
        "score",
        "essay:gap",
        "--max-tokens",
        "64",
        "--policy",
        "snapkv",
        "--budget",
        "40",
        "--head-floor",
        "0.2",
        "--out",
        str(out),
    )
    assert code == 0 and pd.read_csv(out).keep_share_snapkv.sum() == pytest.approx(40)  # same total, pooled


def test_policies_lists_every_policy(capsys):
    code, stdout, _ = run(capsys, "policies")
    names = [line.split()[0] for line in stdout.splitlines() if not line.startswith(" ")]
    assert code == 0 and names == [
        "streaming",
        "snapkv",
        "h2o",
        "tova",
        "knorm",
        "pyramidkv",
        "rkv",
        "expected-attention",
        "rpc",
        "kvzip",
        "keydiff",
        "criticalkv",
        "random",
        "entropy",
        "evolution",
        "infokv",
        "learned",
        "distilled",
        "oracle",
        "optimal",
        "infokv-calibrated",
        "kvpress:CLASS",
    ]
    for offline in ("oracle", "optimal"):
        assert next(line for line in stdout.splitlines() if line.startswith(offline)).endswith("never generate]")
    infokv = stdout.splitlines()[
        stdout.splitlines().index(next(l for l in stdout.splitlines() if l.startswith("infokv "))) + 1
    ]
    assert "top_k=256" in infokv and "alpha=0.9" in infokv and "tau=1.0" in infokv


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "hello", "--policy", "snapkv", "--budget", "1.5"], "ratio must lie in (0, 1]"),
        (["generate", "hello", "--policy", "snapkv", "--budget", "0"], "budget must be positive"),
        (["generate", "hello", "--policy", "magic", "--budget", "0.5"], "unknown policy 'magic'"),
        (["generate", "--policy", "snapkv", "--budget", "0.5"], "give either a PROMPT or --trace"),
        (
            ["score", "essay:gap", "--max-tokens", "20", "--policy", "snapkv", "--budget", "500"],
            "larger than trace 'essay:gap' (20 tokens)",
        ),
        (["eval", "--task", "needles"], "unknown task needles"),
        (["eval", "--policies", "snapkv,magic"], "unknown policy magic"),
    ],
)
def test_bad_generation_input_is_one_line_and_exit_code_2(capsys, argv, message):
    code, _, stderr = run(capsys, *argv)
    # A check that needs the tokenizer comes after the model's loading progress on stderr.
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and message in last and "Traceback" not in stderr


def test_help_and_checks_that_need_no_model_import_nothing_heavy():
    """--help and a refused trace answer without torch, transformers or pandas (see the README's timing)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from forward_influence_cli.main import main\n"
        "assert main(['score', 'missing.txt']) == 2\n"
        "heavy = [m for m in ('torch', 'transformers', 'pandas', 'scipy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "error: argument trace: no such trace file: missing.txt"
