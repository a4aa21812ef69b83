"""Reasoning traces: a model's own step-by-step answers to word problems, for decoding studies.

A problem file is JSONL with ``id``, ``question`` and an integer ``answer`` per line. Each problem is
asked through the tokenizer's chat template ("Solve step by step, then give the final answer as an
integer.") and answered by greedy decoding. A trace record holds the prompt, the completion, the
token ids of both (``prompt_length`` of them belong to the prompt), the model, the settings, the
expected answer, the last integer of the completion (``predicted``) and whether they match.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib.abc import Traversable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import InputError
from .models import LoadedModel, pad_token_id
from .traces import chat_ids

INSTRUCTION = "Solve the problem step by step, then give the final answer as an integer.\n\n"


def read_problems(path: Path | Traversable) -> list[dict]:
    """Problems from JSONL (a file or package data); a malformed line is an `InputError` naming its line."""
    if not path.is_file():
        raise InputError(f"no such problem file: {path}")
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {number}: malformed JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "question" not in record or not isinstance(record.get("answer"), int):
            raise InputError(f"{path} line {number}: needs 'question' and an integer 'answer'")
        record.setdefault("id", f"line{number}")
        problems.append(record)
    if not problems:
        raise InputError(f"{path}: no problem in it")
    return problems


def last_integer(text: str) -> int | None:
    numbers = re.findall(r"-?\d[\d,]*", text)
    return int(numbers[-1].replace(",", "")) if numbers else None


def generate_traces(loaded: LoadedModel, problems: list[dict], max_new_tokens: int = 256) -> Iterator[dict]:
    """Greedy answers to each problem, one trace record per problem (see the module docstring)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    for problem in tqdm(problems, desc="problems", unit="problem"):
        prompt = INSTRUCTION + problem["question"]
        prompt_ids, n_prompt = chat_ids(tokenizer, prompt, "")
        with torch.no_grad():
            output = model.generate(
                torch.tensor([prompt_ids], device=model.device),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id(tokenizer),
            )
        completion_ids = output[0, n_prompt:].tolist()
        completion = tokenizer.decode(completion_ids, skip_special_tokens=True)
        predicted = last_integer(completion)
        yield {
            "id": problem["id"],
            "prompt": prompt,
            "completion": completion,
            "token_ids": prompt_ids + completion_ids,
            "prompt_length": n_prompt,
            "model": loaded.name,
            "settings": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "chat_template": True},
            "answer": problem["answer"],
            "predicted": predicted,
            "correct": predicted == problem["answer"],
        }
