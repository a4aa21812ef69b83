"""Hostile input: every bad value, path or file is one ``error:`` line naming the option or file, exit code 2,
no traceback, and nothing left behind. Checks that need no model run before it loads (fast); the rest are slow."""

from __future__ import annotations

import io

import pytest
import torch

# The commands import these lazily and bind `load_model` by name: imported here first, they hold the real
# loader, never the stand-in a test below patches in while they would otherwise be imported.
import analyses.demo  # noqa: F401
import analyses.learned  # noqa: F401
from forward_influence.errors import InputError
from forward_influence_cli.main import main

BAD_BEFORE_LOADING = [
    # traces
    (["score", "missing.txt"], "no such trace file: missing.txt"),
    (["score", "{binary}"], "binary.txt: a binary file"),
    (["score", "{latin1}"], "latin1.txt: not UTF-8 text"),
    (["score", "{jsonl}"], "bad.jsonl line 2: malformed JSON"),
    (["score", "{tmp}/blank.txt"], "blank.txt: trace 'blank' is empty"),
    (["score", "{tmp}/empty.jsonl"], "empty.jsonl: no trace in it"),
    (["score", "{tmp}/negative.jsonl"], "negative.jsonl line 1: a token id is negative"),
    (["score", "{tmp}/floats.jsonl"], "floats.jsonl line 1: 'token_ids' must be a list of integers"),
    (["score", "{tmp}/strings.jsonl"], "strings.jsonl line 1: 'token_ids' must be a list of integers"),
    (["influence", "essay:gap", "--layers=-1"], "--layers: must be non-negative, got -1"),
    (["influence", "essay:gap", "--heads=-1"], "--heads: must be non-negative, got -1"),
    (
        ["heatmap", "essay:gap", "--signal", "policy:infokv:alpha=9", "--out", "{tmp}/h.html"],
        "infokv: alpha must lie in [0, 1], got 9.0",
    ),
    (["score", "essay:gap", "--out", "{tmp}/" + "x" * 300 + ".csv"], "the file name is longer than"),
    (["score", "essay:nope"], "no essay matches 'nope'"),
    (["score", "essay:gap", "--max-tokens", "0"], "--max-tokens: must be at least 1, got 0"),
    (["score", "essay:gap", "--max-tokens", "-5"], "--max-tokens: must be at least 1, got -5"),
    (["distill", "--docs", "1"], "--docs: must be at least 2, got 1"),  # leaving one out needs two
    (["learn", "--docs", "1"], "--docs: must be at least 2, got 1"),
    (["score", "essay:gap", "--top-k", "0"], "--top-k: must be at least 1"),
    (["score", "essay:gap", "--window", "-1"], "--window: must be at least 1"),
    # outputs
    (["score", "essay:gap", "--out", "{tmp}/x.xlsx"], "--out must end in .csv, .jsonl or .parquet, got 'x.xlsx'"),
    (["score", "essay:gap", "--out", "{tmp}"], "is a folder; name a file"),
    (["score", "essay:gap", "--out", "{file}/x.csv"], "is a file, not a folder"),
    (["score", "essay:gap", "--out", "/proc/x.csv"], "--out /proc: /proc is not writable"),
    (["score", "essay:gap", "--out", "/sys/kernel/new/x.csv"], "--out /sys/kernel/new: /sys/kernel is not writable"),
    (["eval", "--out", "/proc/run"], "--out /proc/run: /proc is not writable"),
    (["compare", "essay:gap", "--out", "{file}"], "--out {file} is a file; name a folder"),
    (["eval", "--out", "{file}"], "--out {file} is a file; name a folder"),
    (["heatmap", "essay:gap", "--out", "{tmp}/x.pdf"], "--out must end in .html or .png, got 'x.pdf'"),
    (["influence", "essay:gap", "--per-distance", "{tmp}/d.txt"], "--per-distance must end in .csv"),
    (["trace", "problems.jsonl", "--out", "{tmp}/t.csv"], "--out must end in .jsonl"),
    # models and devices
    (["score", "essay:gap", "--device", "cuda"], "argument --device: device cuda: no CUDA device is available"),
    (["score", "essay:gap", "--device", "tpu9"], "argument --device: device: unknown device 'tpu9'"),
    (["score", "essay:gap", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["score", "essay:gap", "--model", "{tmp}"], "the folder holds no model (no config.json"),
    (["score", "essay:gap", "--model", "{file}"], "a model file must be a .gguf file"),
    # budgets and policies
    (["generate", "hi", "--policy", "snapkv", "--budget", "0"], "budget must be positive, got 0"),
    (["generate", "hi", "--policy", "snapkv", "--budget", "-3"], "budget must be positive"),
    (["generate", "hi", "--policy", "snapkv", "--budget", "1.5"], "a budget ratio must lie in (0, 1]"),
    (["generate", "hi", "--policy", "snapkv", "--budget", "nan"], "budget must be positive, got nan"),
    (["generate", "hi", "--policy", "snapkv", "--budget", "inf"], "budget must be positive, got inf"),
    (["generate", "hi", "--policy", "snapkv", "--budget", "prompt+2"], "the ratio of prompt+RATIO must lie in (0, 1]"),
    (["generate", "hi", "--policy", "snapkv", "--budget", "lots"], "budget must be a ratio in (0, 1]"),
    (["generate", "hi", "--policy", "oracle", "--budget", "0.5"], "--policy oracle scores from a measured trace only"),
    (
        ["generate", "hi", "--policy", "optimal", "--budget", "0.5"],
        "--policy optimal scores from a measured trace only",
    ),
    (["score", "essay:gap", "--policy", "optimal:starts=oracle"], "optimal: starts must be uniform or online policies"),
    (["score", "essay:gap", "--policy", "optimal:budget=2"], "optimal: budget must lie in (0, 1]"),
    (["influence", "essay:gap", "--seed", "100000000000000000000000"], "--seed: must be at most 4294967295"),
    (["eval", "--seed", "1e23"], "--seed: expected an integer, got '1e23'"),
    (["score", "essay:gap", "--policy", "snapkv", "--budget", "prompt+0.5"], "budget prompt+0.5 grows while decoding"),
    (["compare", "essay:gap", "--budget", "prompt+0.5"], "budget prompt+0.5 grows while decoding"),
    (["calibrate", "--budgets", "0.1,prompt+0.5"], "budget prompt+0.5 grows while decoding"),
    (
        ["calibrate", "--budgets", "0.1,2000"],
        "budget of 2000 tokens is larger than the compressed prefix (1024 tokens)",
    ),
    (
        ["demo", "--budget", "100000000", "--out", "{tmp}/demo"],
        "budget of 100000000 tokens is larger than --max-tokens",
    ),
    (["score", "essay:gap", "--head-floor", "2"], "--head-floor: must lie in [0, 1], got 2"),
    (["score", "essay:gap", "--head-floor", "nan"], "--head-floor: must lie in [0, 1], got nan"),
    (["score", "essay:gap", "--head-floor", "0.5"], "--head-floor applies to --policy, and no --policy is given"),
    (["score", "essay:gap", "--policy", "rkv:lam=-1"], "rkv: lam must lie in [0, 1], got -1.0"),
    (["score", "essay:gap", "--policy", "rkv:threshold=5"], "rkv: threshold must lie in [-1, 1], got 5.0"),
    (
        ["generate", "hi", "--policy", "snapkv:window=0", "--budget", "0.5"],
        "snapkv: window must be an integer of at least 1",
    ),
    (
        ["generate", "hi", "--policy", "snapkv:loud=1", "--budget", "0.5"],
        "'loud=1' is not FIELD=VALUE with a field of snapkv",
    ),
    (["generate", "hi", "--policy", "infokv:alpha=2", "--budget", "0.5"], "infokv: alpha must lie in [0, 1], got 2.0"),
    (["generate", "hi", "--policy", "snapkv:group=maxx", "--budget", "0.5"], "snapkv: group must be one of mean, max"),
    (["generate", "hi", "--policy", "snapkv", "--budget", "0.5", "--max-new-tokens", "0"], "--max-new-tokens: must be"),
    (["generate", "hi", "--policy", "snapkv", "--budget", "0.5", "--buffer", "-1"], "--buffer: must be at least 0"),
    (["generate", "hi", "--policy", "snapkv", "--budget", "0.5", "--seed", "-1"], "--seed: must be at least 0"),
    (["score", "essay:gap", "--policy", "snapkv", "--head-floor", "1.5"], "--head-floor: must lie in [0, 1], got 1.5"),
    (["score", "essay:gap", "--policy", "snapkv", "--head-floor", "nan"], "--head-floor: must lie in [0, 1], got nan"),
    # measurement settings
    (["influence", "essay:gap", "--fraction", "0"], "fraction must lie in (0, 1), got 0"),
    (["influence", "essay:gap", "--fraction", "nan"], "fraction must lie in (0, 1)"),
    (["influence", "essay:gap", "--evict-at", "0"], "--evict-at 0 must be at least --sinks (4)"),
    (["influence", "essay:gap", "--evict-at", "-5"], "--evict-at -5 must be at least --sinks (4)"),
    (["influence", "essay:gap", "--evict-at", "2", "--sinks", "3"], "--evict-at 2 must be at least --sinks (3)"),
    (["influence", "essay:gap", "--max-distance", "0"], "--max-distance: must be at least 1"),
    (["influence", "essay:gap", "--sinks", "-1"], "--sinks: must be at least 0"),
    (["influence", "essay:gap", "--buckets", "0,5"], "bucket edges must be increasing integers"),
    (["influence", "essay:gap", "--layers", ","], "--layers: expected at least one integer"),
    (["influence", "essay:gap", "--heads", "a"], "--heads: expected comma-separated integers"),
    (["influence", "essay:gap", "--seed", "-2"], "--seed: must be at least 0"),
    (["scan", "essay:gap", "--start", "-1", "--end", "5"], "--start: must be at least 0"),
    (["scan", "essay:gap", "--start", "5", "--end", "5"], "--start 5 must be smaller than --end 5"),
    (["scan", "essay:gap", "--start", "1", "--end", "5", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["compare", "essay:gap", "--evict-at", "1"], "--evict-at 1 must be at least --sinks (4)"),
    (["compare", "essay:gap", "--budget", "0"], "budget must be positive"),
    (["heatmap", "essay:gap", "--signal", "loudness", "--out", "{tmp}/h.html"], "unknown signal 'loudness'"),
    (["demo", "--evict-at", "0"], "--evict-at 0 must be at least --sinks (4)"),
    (["demo", "--evict-at", "5000"], "--evict-at 5000 is beyond trace"),
    (["demo", "--docs", "0"], "--docs: must be at least 1"),
    (["demo", "--fraction", "1"], "fraction must lie in (0, 1), got 1"),
    (["eval", "--docs", "0"], "--docs: must be at least 1"),
    (["eval", "--task", "needles"], "unknown task needles"),
    (["eval", "--budgets", ","], "--budgets: no budget given"),
    (["eval", "--budgets", "0.5,-1"], "budget must be positive, got -1"),
    (["eval", "--policies", "snapkv,magic"], "unknown policy magic"),
    (["eval", "--buffer", "-4"], "--buffer: must be at least 0"),
    (["eval", "--shard", "2/2"], "--shard: expected I/N with 0 <= I < N, got '2/2'"),
    (["eval", "--shard", "half"], "--shard: expected I/N (the I-th of N shards, from 0)"),
    (["calibrate", "--docs", "-1"], "--docs: must be at least 1"),
    (["learn", "--docs", "0"], "--docs: must be at least 2, got 0"),
    (["distill", "--docs", "0"], "--docs: must be at least 2, got 0"),
    (["verify", "--max-tokens", "0"], "--max-tokens: must be at least 1"),
    (["trace", "missing.jsonl", "--out", "{tmp}/t.jsonl", "--limit", "0"], "--limit: must be at least 1"),
    # no input destroyed, no two outputs on one path, no item counted twice
    (["score", "{input}", "--out", "{input}"], "--out {input} is the input trace: it would be overwritten"),
    (["trace", "{input}", "--limit", "1", "--out", "{input}"], "--out {input} is the input problems"),
    (["influence", "essay:gap", "--out", "{tmp}/s.csv", "--per-distance", "{tmp}/s.csv"], "is also --out"),
    (["eval", "--policies", "random,random"], "policy 'random' is named twice"),
    (["eval", "--policies", "snapkv", "--budgets", "0.5,0.50"], "budget '0.50' is named twice"),
    (["influence", "essay:gap", "--select", "random,random"], "--select: selection 'random' is named twice"),
]


@pytest.fixture
def files(tmp_path):
    """A folder of hostile files, and what it held before the command ran."""
    (tmp_path / "binary.txt").write_bytes(b"text\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": oops}\n')
    (tmp_path / "plain.txt").write_text("a file, not a folder")
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "negative.jsonl").write_text('{"token_ids": [1, -2]}\n')
    (tmp_path / "floats.jsonl").write_text('{"token_ids": [1.5, 2]}\n')
    (tmp_path / "strings.jsonl").write_text('{"token_ids": ["1"]}\n')
    (tmp_path / "input.jsonl").write_text('{"id": "a", "text": "an input that must survive"}\n')
    return tmp_path


def _argv(argv: list[str], tmp_path) -> list[str]:
    names = dict(
        tmp=str(tmp_path),
        file=str(tmp_path / "plain.txt"),
        binary=str(tmp_path / "binary.txt"),
        latin1=str(tmp_path / "latin1.txt"),
        jsonl=str(tmp_path / "bad.jsonl"),
        input=str(tmp_path / "input.jsonl"),
    )
    return [a.format(**names) for a in argv]


def _one_error(capsys, argv, message, tmp_path, loaded: bool = False) -> str:
    """Run the command; check the one error line (the last of stderr once a model has loaded, after its
    progress bars) and that the folder is unchanged."""
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, err)
    assert "Traceback" not in err
    if loaded:
        err = err.strip().splitlines()[-1] + "\n"
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message.format(file=tmp_path / "plain.txt", input=tmp_path / "input.jsonl") in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing half-written
    return err


@pytest.mark.parametrize("argv, message", BAD_BEFORE_LOADING, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_input_fails_before_the_model_loads(capsys, files, monkeypatch, argv, message):
    import forward_influence.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(models.load_model, "__wrapped__", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.chdir(files)
    _one_error(capsys, _argv(argv, files), message, files)


def test_a_crafted_cache_file_is_refused_and_a_pickle_never_runs(files, tmp_path):
    """A results folder may come from anyone: its cache files are Parquet with their key inside, never
    unpickled; anything else at a cache path is refused with a message naming it."""
    import pandas as pd

    from analyses import cache
    from analyses.documents import per_document
    from forward_influence.errors import InputError
    from forward_influence.traces import Trace

    marker = tmp_path / "payload-ran"
    # A protocol-0 pickle, written by hand: unpickling it would call builtins.open(marker, "w").
    payload = f"cbuiltins\nopen\n(V{marker}\nVw\ntR.".encode()
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "essay_d0.pkl").write_bytes(payload)  # the old cache format: never read
    (folder / "essay_d0.parquet").write_bytes(payload)  # a crafted file at the cache path
    with pytest.raises(InputError, match=r"essay_d0.parquet is not a cache file this toolkit wrote"):
        per_document([Trace("essay:d0", [1, 2, 3])], lambda t: pd.DataFrame({"x": [1]}), folder, {"k": 1})
    assert not marker.exists()
    cache.write(folder / "essay_d1.parquet", {"k": 1}, pd.DataFrame({"x": [1.5]}))
    assert cache.read(folder / "essay_d1.parquet", {"k": 2}) is None  # other settings: recomputed, not trusted
    assert cache.read(folder / "essay_d1.parquet", {"k": 1}).x.tolist() == [1.5]


def test_outputs_get_the_users_normal_permissions(tmp_path):
    import os

    from forward_influence.outputs import atomic_open

    old = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "table.csv") as f:
            f.write("a\n")
    finally:
        os.umask(old)
    assert (tmp_path / "table.csv").stat().st_mode & 0o777 == 0o644


BAD_AFTER_LOADING = [
    (["influence", "-", "--select", "random"], "trace 'stdin' has 2 tokens, too few to evict"),
    (["influence", "essay:gap", "--max-tokens", "50", "--evict-at", "60"], "--evict-at 60 is beyond trace 'essay:gap'"),
    (["influence", "essay:gap", "--max-tokens", "60", "--layers", "99"], "--layers must lie in [0, 29]"),
    (["influence", "essay:gap", "--max-tokens", "60", "--heads", "3"], "--heads must lie in [0, 2]"),
    (
        ["score", "essay:gap", "--max-tokens", "20", "--policy", "snapkv", "--budget", "500"],
        "larger than trace 'essay:gap'",
    ),
    (
        [
            "heatmap",
            "essay:gap",
            "--max-tokens",
            "20",
            "--signal",
            "policy:snapkv",
            "--budget",
            "100000000",
            "--out",
            "{tmp}/h.html",
        ],
        "budget of 100000000 tokens is larger than trace 'essay:gap' (20 tokens)",
    ),
    (["generate", "hello", "--policy", "snapkv", "--budget", "100000"], "larger than the prompt plus the new tokens"),
    (
        "eval --task fidelity --policies snapkv --budgets 100000000 --docs 1 --out {tmp}/e".split(),
        "budget of 100000000 tokens is larger than fidelity item 'love' (1024 tokens)",
    ),
    (
        "eval --task needle --policies snapkv --budgets prompt+0.5,5000 --docs 1 --out {tmp}/e".split(),
        "budget of 5000 tokens is larger than needle item",
    ),
    (
        ["generate", "hello", "--policy", "snapkv", "--budget", "0.5", "--max-new-tokens", "100000"],
        "the prompt (31 tokens) plus the new tokens exceed the model's context of 8192",
    ),
    (
        ["compare", "essay:gap", "--max-tokens", "40", "--budget", "500", "--out", "{tmp}/c"],
        "budget of 500 tokens is larger than the prefix 0..20 of trace 'essay:gap' (21 tokens)",
    ),
    (["score", "{long}"], "has 3"),
    (["demo", "--docs", "1000", "--out", "{tmp}/demo"], "the evaluation essays hold only"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", BAD_AFTER_LOADING, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_input_that_needs_the_tokenizer_is_still_one_line(capsys, files, monkeypatch, argv, message):
    from forward_influence.corpus import read_essay

    (files / "long.txt").write_text(read_essay("worked") * 2)  # about 36k tokens: beyond the 8k context
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"two words")))
    argv = _argv([a.replace("{long}", str(files / "long.txt")) for a in argv], files)
    err = _one_error(capsys, argv, message, files, loaded=True)
    if argv[1].endswith("long.txt"):
        assert "more than the model's context of 8192; pass --max-tokens 8192" in err


@pytest.mark.slow
def test_a_crafted_file_in_an_eval_cache_is_refused_by_the_cli(capsys, tmp_path):
    folder = tmp_path / "cache" / "smollm2-135m-instruct" / "fidelity"
    folder.mkdir(parents=True)
    (folder / "love.parquet").write_bytes(torch.randn(8).numpy().tobytes())  # at the first item's cache path
    code = main(
        [
            "eval",
            "--task",
            "fidelity",
            "--policies",
            "snapkv",
            "--budgets",
            "0.5",
            "--docs",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: ") and "love.parquet is not a cache file this toolkit wrote" in err


def test_an_output_on_the_input_leaves_the_input_byte_identical(capsys, files):
    source = files / "input.jsonl"
    before = source.read_bytes()
    for argv in (["score", str(source), "--out", str(source)], ["trace", str(source), "--out", str(source)]):
        assert main(argv) == 2
        assert source.read_bytes() == before
    link = files / "link.jsonl"
    link.symlink_to(source)  # the same file under another name is the same file
    assert main(["score", str(source), "--out", str(link)]) == 2 and source.read_bytes() == before
    assert "is the input trace" in capsys.readouterr().err


USER_FILES = [
    ("calibration", b"not json at all", "not JSON"),
    ("calibration", b"[]", "expected a JSON object, got list"),
    ("calibration", b"{}", "'settings' must be a dict, got None"),
    ("calibration", '{"settings": "caf\xe9"}'.encode("latin-1"), "not UTF-8 text"),
    ("calibration", b'{"settings": {"alpha": 7}}', "infokv: alpha must lie in [0, 1], got 7"),
    ("learned", b'{"bands": 1, "weights": [1.0]}', "'features' must be a list, got None"),
    ("learned", b'{"bands": true, "features": [], "weights": [], "intercept": 0}', "'bands' must be a int"),
]


@pytest.mark.parametrize("kind, content, message", USER_FILES)
def test_a_broken_per_user_file_is_refused_by_name_before_the_model_loads(
    capsys, tmp_path, monkeypatch, kind, content, message
):
    import forward_influence.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setenv("FORWARD_INFLUENCE_HOME", str(tmp_path))
    path = tmp_path / kind / "smollm2-135m-instruct.json"
    path.parent.mkdir()
    path.write_bytes(content)
    policy = "infokv-calibrated" if kind == "calibration" else "learned"
    assert main(["score", "essay:gap", "--policy", policy]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err and message in err, err


@pytest.mark.parametrize("spec", ["learned:bands=0", "infokv-calibrated:alpha=7"])
def test_a_bad_field_of_a_per_model_policy_is_one_line_with_no_note_before_it(capsys, spec):
    assert main(["score", "essay:gap", "--policy", spec]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "stdin: trace 'stdin' is empty"),
        (b"  \n\t\n", "stdin: trace 'stdin' is empty"),
        (b'{"id": "a", "text": "fine"}\n{"id": oops}\n', "stdin line 2: malformed JSON"),
        (b'{"token_ids": [true]}\n', "stdin line 1: 'token_ids' must be a list of integers"),
        (b"text\x00\x01", "stdin: a binary file, not text"),
        ("caf\xe9".encode("latin-1"), "stdin: not UTF-8 text"),
    ],
)
def test_bad_stdin_is_refused_before_the_model_loads(capsys, monkeypatch, data, message):
    import forward_influence.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert main(["score", "-"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_a_failed_demo_removes_the_fresh_folder_it_made_and_keeps_an_existing_one(capsys, tmp_path, monkeypatch):
    import analyses.demo

    def fail_midway(model, out, **settings):
        (out / "influence").mkdir(parents=True)
        (out / "influence" / "influence.csv").write_text("half\n")
        raise RuntimeError("the run failed")

    monkeypatch.setattr(analyses.demo, "run_demo", fail_midway)
    assert main(["demo", "--out", str(tmp_path / "fresh")]) == 1
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("the user's\n")
    assert main(["demo", "--out", str(tmp_path / "kept")]) == 1
    assert (tmp_path / "kept" / "mine.txt").read_text() == "the user's\n"
    assert capsys.readouterr().err.count("error: RuntimeError: the run failed") == 2


def test_library_errors_name_parameters_and_the_command_line_names_flags():
    from forward_influence.measure import check_time
    from forward_influence.traces import read_traces

    with pytest.raises(InputError) as raised:
        check_time(2, sinks=3)
    assert str(raised.value) == (
        "evict_at 2 must be at least sinks (3): the first 3 positions are attention sinks, never evicted"
    )
    assert raised.value.command_line() == (
        "--evict-at 2 must be at least --sinks (3): the first 3 positions are attention sinks, never evicted"
    )
    with pytest.raises(InputError, match="^max_tokens must be at least 1, got 0$") as raised:
        read_traces("essay:gap", None, max_tokens=0)
    assert raised.value.command_line() == "--max-tokens must be at least 1, got 0"
