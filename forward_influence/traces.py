"""Traces: the token sequences under study, read from text, JSONL, stdin or the essay corpus.

A trace spec is one of

- ``essay:NAME`` (also ``essay:*``-style patterns and ``essay:evaluation`` / ``essay:calibration``),
- a ``.txt`` file (its whole text is one trace),
- a ``.jsonl`` file, one object per line with ``id`` and one of ``text``, ``prompt`` + ``completion``
  (formatted with the tokenizer's chat template when it has one) or ``token_ids``,
- ``-`` for standard input (plain text, or JSONL when every line is a JSON object).

`max_tokens` keeps the first N tokens. Token ids follow the tokenizer's own conventions (the
embedded SmolLM2 GGUF tokenizer adds no BOS to plain text).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import corpus
from .errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Trace:
    """A token sequence with where it came from.

    `prompt_length` is the number of leading tokens that belong to the prompt (0 for plain text).
    """

    id: str
    token_ids: list[int]
    prompt_length: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.token_ids)


def chat_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], int]:
    """Token ids of a chat-formatted prompt + completion, and the prompt's length in tokens."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
        prompt_ids = list(prompt_ids)
    else:
        prompt_ids = tokenizer(prompt).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    return prompt_ids + completion_ids, len(prompt_ids)


def _from_record(record: dict, where: str, tokenizer: PreTrainedTokenizerBase) -> Trace:
    _check_record(record, where)
    trace_id = str(record.get("id", where))
    if "token_ids" in record:
        ids = record["token_ids"]
        vocab = len(tokenizer)
        if any(i >= vocab for i in ids):
            raise InputError(f"{where}: a token id is outside the vocabulary (0..{vocab - 1})")
        return Trace(trace_id, list(ids), record.get("prompt_length", 0), {"source": where})
    if "prompt" in record and "completion" in record:
        ids, n_prompt = chat_ids(tokenizer, str(record["prompt"]), str(record["completion"]))
        return Trace(trace_id, ids, n_prompt, {"source": where})
    return Trace(trace_id, tokenizer(str(record["text"])).input_ids, 0, {"source": where})


def _parse_jsonl(lines: list[str], source: str, tokenizer: PreTrainedTokenizerBase) -> list[Trace]:
    traces = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: malformed JSON ({exc.msg})") from exc
        traces.append(_from_record(record, where, tokenizer))
    return traces


def read_traces(
    spec: str,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int | None = None,
    stdin_text: str | None = None,
) -> list[Trace]:
    """Read every trace a spec names, cut to the first `max_tokens` tokens.

    Raises `InputError` for a missing file, a malformed JSONL line (with its line number), an empty
    trace or an unknown essay.
    """
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if spec.startswith("essay:"):
        traces = [
            Trace(f"essay:{name}", tokenizer(corpus.read_essay(name)).input_ids, 0, {"essay": name})
            for name in corpus.match_essays(spec.removeprefix("essay:"))
        ]
    elif spec == "-":
        text = read_stdin() if stdin_text is None else stdin_text
        lines = text.splitlines()
        if _looks_jsonl(lines):
            traces = _parse_jsonl(lines, "stdin", tokenizer)
        else:
            traces = [Trace("stdin", tokenizer(text).input_ids if text.strip() else [], 0, {})]
    else:
        check_spec(spec)
        path = Path(spec)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            traces = _parse_jsonl(text.splitlines(), str(path), tokenizer)
        else:
            traces = [Trace(path.stem, tokenizer(text).input_ids if text.strip() else [], 0, {"path": str(path)})]
    if not traces:
        raise InputError(f"{spec}: no trace in it")
    for trace in traces:
        if max_tokens is not None:
            trace.token_ids = trace.token_ids[:max_tokens]
        if len(trace) == 0:
            raise InputError(f"{spec}: trace {trace.id!r} is empty")
    return traces


def _check_record(record: object, where: str) -> None:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object")
    if not ("token_ids" in record or ("prompt" in record and "completion" in record) or "text" in record):
        raise InputError(f"{where}: needs 'text', 'prompt' + 'completion', or 'token_ids'")
    if "token_ids" in record:  # what can be checked without a tokenizer (the vocabulary's size needs one)
        ids = record["token_ids"]
        # JSON's true and false are Python ints too: a list of booleans is not a list of token ids.
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InputError(f"{where}: 'token_ids' must be a list of integers")
        if any(i < 0 for i in ids):
            raise InputError(f"{where}: a token id is negative")
        length = record.get("prompt_length", 0)
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= len(ids):
            raise InputError(f"{where}: 'prompt_length' must be an integer in [0, {len(ids)}], got {length!r}")


def decoded(data: bytes, where: str) -> str:
    """The UTF-8 text of a file or of stdin; a binary or non-UTF-8 input is an `InputError` naming `where`."""
    if b"\x00" in data:
        raise InputError(f"{where}: a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None


def check_spec(spec: str) -> None:
    """Refuse, without a tokenizer (so before any model loads), a trace spec that cannot be read: a
    missing essay or file, a file that is binary or not UTF-8, a JSONL line that is not a trace record."""
    if spec == "-":
        return
    if spec.startswith("essay:"):
        corpus.match_essays(spec.removeprefix("essay:"))
        return
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"no such trace file: {spec}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{spec}: cannot be read ({exc.strerror})") from None
    check_text(decoded(data, spec), spec, path.suffix == ".jsonl", path.stem)


def _looks_jsonl(lines: list[str]) -> bool:
    """Stdin is read as JSONL when every non-blank line starts an object."""
    nonblank = [line for line in lines if line.strip()]
    return bool(nonblank) and all(line.lstrip().startswith("{") for line in nonblank)


def read_stdin() -> str:
    """Standard input as UTF-8 text (refused when binary or not UTF-8)."""
    return decoded(sys.stdin.buffer.read(), "stdin")


def check_text(text: str, where: str, jsonl: bool | None = None, name: str = "stdin") -> None:
    """Refuse, without a tokenizer, a trace text that holds nothing, or JSONL (`jsonl`; None: decided as
    for stdin) with a line that is not a trace record."""
    lines = text.splitlines()
    jsonl = _looks_jsonl(lines) if jsonl is None else jsonl
    if not text.strip():
        raise InputError(f"{where}: no trace in it" if jsonl else f"{where}: trace {name!r} is empty")
    if jsonl:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{where} line {number}: malformed JSON ({exc.msg})") from None
                _check_record(record, f"{where} line {number}")


def check_context(traces: list[Trace], config) -> None:
    """Refuse a trace longer than the context of the model of `config` (its transformers configuration),
    naming the ``max_tokens`` that would fit; the memory a run needs is `forward_influence.memory`'s."""
    context = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    for trace in traces:
        if context is not None and len(trace) > context:
            raise InputError(
                f"trace {trace.id!r} has {len(trace)} tokens, more than the model's context of "
                f"{context}; pass max_tokens {context} (or fewer)",
                "max_tokens",
            )
