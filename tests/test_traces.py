"""Trace input: files, JSONL records, stdin, essays and the corpus split."""

from __future__ import annotations

import io
import json
import re

import pytest

from forward_influence import corpus
from forward_influence.errors import InputError
from forward_influence.traces import read_traces

from conftest import tiny_tokenizer


@pytest.fixture
def tok():
    return tiny_tokenizer()


def test_text_file_and_max_tokens(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_text("w1 w2 w3 w4 w5")
    (trace,) = read_traces(str(path), tok, max_tokens=3)
    assert trace.token_ids == [1, 2, 3] and trace.id == "t"


def test_jsonl_records_of_every_kind(tmp_path, tok):
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"id": "a", "text": "w4 w5"})
        + "\n\n"
        + json.dumps({"id": "b", "token_ids": [7, 8, 9]})
        + "\n"
        + json.dumps({"id": "c", "prompt": "w1", "completion": "w2 w3"})
        + "\n"
    )
    a, b, c = read_traces(str(path), tok)
    assert (a.id, a.token_ids) == ("a", [4, 5])
    assert b.token_ids == [7, 8, 9]
    assert c.token_ids == [1, 2, 3] and c.prompt_length == 1  # no chat template: plain concatenation


def test_malformed_jsonl_names_the_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "w1"}) + "\n{not json\n")
    with pytest.raises(InputError, match="line 2: malformed JSON"):
        read_traces(str(path), tok)
    path.write_text(json.dumps({"id": "a", "words": "w1"}) + "\n")
    with pytest.raises(InputError, match="line 1: needs 'text'"):
        read_traces(str(path), tok)
    path.write_text(json.dumps({"id": "a", "token_ids": [1, 500]}) + "\n")
    with pytest.raises(InputError, match="outside the vocabulary"):
        read_traces(str(path), tok)


def test_stdin_empty_and_missing(tmp_path, tok):
    assert read_traces("-", tok, stdin_text="w3 w2")[0].token_ids == [3, 2]
    assert [t.id for t in read_traces("-", tok, stdin_text='{"id": "x", "text": "w1"}\n')] == ["x"]
    with pytest.raises(InputError, match="is empty"):
        read_traces("-", tok, stdin_text="  \n")
    with pytest.raises(InputError, match="no such trace file"):
        read_traces(str(tmp_path / "missing.txt"), tok)


def test_essays_and_the_fixed_split(tok):
    names = corpus.essay_names()
    assert len(names) == 49  # the package ships 49 essays (the brief counted 48)
    calibration, evaluation = corpus.essay_names("calibration"), corpus.essay_names("evaluation")
    assert calibration == names[:24] and evaluation == names[24:]
    assert not set(calibration) & set(evaluation)
    (gap,) = read_traces("essay:gap", tok, max_tokens=5)
    assert gap.id == "essay:gap" and len(gap) == 5
    assert len(read_traces("essay:g*", tok, max_tokens=2)) == len([n for n in names if n.startswith("g")])
    with pytest.raises(InputError, match="no essay matches"):
        read_traces("essay:zzz*", tok)


@pytest.mark.parametrize(
    "record, message",
    [
        ('{"token_ids": [true, false]}', "'token_ids' must be a list of integers"),
        ('{"token_ids": [1, 2], "prompt_length": "abc"}', "'prompt_length' must be an integer in [0, 2], got 'abc'"),
        ('{"token_ids": [1, 2], "prompt_length": 3}', "'prompt_length' must be an integer in [0, 2], got 3"),
    ],
)
def test_a_token_id_record_is_checked_field_by_field(record, message):
    with pytest.raises(InputError, match=re.escape(message)):
        read_traces("-", tiny_tokenizer(), stdin_text=record + "\n")


@pytest.mark.parametrize(
    "data, message",
    [(b"text\x00\x01", "stdin: a binary file, not text"), ("café".encode("latin-1"), "stdin: not UTF-8")],
)
def test_stdin_is_refused_like_a_file_when_binary_or_not_utf8(monkeypatch, data, message):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    with pytest.raises(InputError, match=message):
        read_traces("-", tiny_tokenizer())
