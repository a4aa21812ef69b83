"""Long decoding: compression while a model writes thousands of tokens, replayed exactly.

Reference generations. Each item is a prompt and the full-cache model's own sampled continuation of
`new_tokens` tokens (2048 on SmolLM2, 1024 on Gemma-3-270m in the committed references): half the
items ask one of the packaged word problems (`analyses.tasks.reasoning.PROBLEMS`) to be reasoned
through at length, the other half continue the first `essay_prompt` tokens of an evaluation essay.
Sampling is seeded per item (`REFERENCE_SAMPLING`: temperature, nucleus and a mild repetition
penalty, so the text does not fall into loops), the end-of-sequence and other special tokens are
banned so every reference reaches its length, and ``repeated_4grams_full`` records the share of
repeated 4-grams of the generated text, so a reader sees the quality of what is compressed.
References are generated once and kept one item per line in a JSONL file (resumable): the packaged
``analyses/data/long_decode/<model>.jsonl`` for the embedded models (the token ids behind the
committed results), ``<data home>/long_decode/<model>.jsonl`` for any other model.

Measurement, per policy and budget, through the real compressing runtime
(`kv_compression.runtime`), with the compression interval `buffer` (R-KV's 128; the InfoKV paper's
1024):

- teacher-forced fidelity: the reference tokens are fed to the compressed cache
  (`teacher_forced`, exactly equal to decoding them one at a time); per generated token the KL(full
  || compressed) of the next-token distributions, the increase in the reference token's negative
  log-likelihood and top-1 agreement, overall (``kl``, ``nll_increase``, ``top1_agreement``) and per
  bucket of generated positions (``kl_0_511``, ``kl_512_1023``, ...: `BUCKETS`);
- free-running agreement (``agreement_tokens``): at a quarter, half and three quarters of the
  reference, the compressed cache (teacher-forced up to there) decodes greedily; the tokens until its
  first divergence from the full cache's greedy continuation from the same point, at most `horizon`,
  averaged over the three points (`greedy_agreement`: the full cache's continuation is teacher-forced
  in one blocked pass, which counts the same tokens as decoding them one by one).

Budgets are token counts (``256``, ``512``) or RPC's ratio schedule ``prompt+0.25`` (with a buffer of
1024).

    forward-influence eval --task long-decode --policies infokv,rkv,h2o --budgets 256 --docs 1
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from tqdm.auto import tqdm

from forward_influence import corpus
from forward_influence.generate import read_problems
from forward_influence.influence import clean_run
from forward_influence.logits import kl_and_agreement
from forward_influence.models import LoadedModel
from forward_influence.outputs import atomic_open, data_home
from forward_influence.tracer import Tracer
from forward_influence.traces import chat_ids, read_traces
from kv_compression.budget import BUFFER, Budget
from kv_compression.policies import Policy
from kv_compression.runtime import greedy_agreement, teacher_forced

from ..plotting import distinct_palette, save_figure, theme
from . import Item, PerSetting, full_greedy
from .reasoning import PROBLEMS

REASONING_INSTRUCTION = (
    "Reason about the problem below step by step and at length: restate it in your own words, work out every "
    "quantity, check each step twice, try a second method, and discuss what could go wrong, before giving the "
    "final answer as an integer.\n\n"
)
REFERENCE_SAMPLING = dict(do_sample=True, temperature=0.8, top_p=0.95, repetition_penalty=1.1)
PACKAGED = resources.files("analyses") / "data" / "long_decode"
BUCKETS = (0, 512, 1024, 2048, 4096)
KL_LINEAR_BELOW = 1e-3  # the figure's KL axis is linear below this: a bucket before the first eviction holds ~1e-7


def repeated_ngrams(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams of `tokens` that already occurred earlier in it."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@dataclass(frozen=True)
class Prompt:
    """A long-decoding prompt: `kind` is ``problem`` or ``essay``."""

    id: str
    kind: str
    token_ids: list[int]


def prompts(tokenizer, n: int, essay_prompt: int = 128, problems=PROBLEMS) -> list[Prompt]:
    """`n` prompts alternating a word problem (spread over the problem file, a tenth of it apart) and an
    evaluation essay's first `essay_prompt` tokens (the essays long enough, in name order). The first
    n prompts are the same whatever n, so references of a smaller sweep are part of a larger one's."""
    questions = read_problems(problems)
    n_problems, n_essays = (n + 1) // 2, n // 2
    spread = len(questions)
    chosen = [questions[(i * spread // 10 + i // 10) % spread] for i in range(n_problems)]
    problem_prompts = [
        Prompt(q["id"], "problem", chat_ids(tokenizer, REASONING_INSTRUCTION + q["question"], "")[0]) for q in chosen
    ]
    essay_prompts = []
    for name in corpus.essay_names("evaluation"):
        if len(essay_prompts) == n_essays:
            break
        ids = read_traces(f"essay:{name}", tokenizer)[0].token_ids
        if len(ids) >= essay_prompt:
            essay_prompts.append(Prompt(f"essay:{name}", "essay", ids[:essay_prompt]))
    mixed = [p for pair in zip(problem_prompts, essay_prompts) for p in pair]
    return mixed + problem_prompts[len(essay_prompts) :] + essay_prompts[len(problem_prompts) :]


def generate_reference(loaded: LoadedModel, prompt: Prompt, new_tokens: int, seed: int) -> list[int]:
    """The full-cache model's sampled continuation of `prompt`: exactly `new_tokens` token ids."""
    tokenizer, model = loaded.tokenizer, loaded.model
    banned = [[i] for i in tokenizer.all_special_ids]
    ids = torch.tensor([prompt.token_ids], device=model.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            bad_words_ids=banned,
            pad_token_id=banned[0][0],
            **REFERENCE_SAMPLING,
        )
    return out[0, ids.shape[1] :].tolist()


def read_references(path: Path) -> dict[str, dict]:
    """Reference records by item id from a JSONL file (empty when there is none)."""
    if not Path(path).is_file():
        return {}
    records = (json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    return {record["id"]: record for record in records}


def references(
    loaded: LoadedModel,
    n: int,
    new_tokens: int,
    path: Path,
    seed: int = 0,
    essay_prompt: int = 128,
    progress: bool = True,
    known: dict[str, dict] | None = None,
) -> list[dict]:
    """The first `n` reference generations: from `known` records or the JSONL file `path` where they
    hold them (same prompt, length and seed), generated otherwise, `path` rewritten after each one."""
    stored = {**(known or {}), **read_references(path)}
    records = []
    for index, prompt in enumerate(
        tqdm(prompts(loaded.tokenizer, n, essay_prompt), desc="references", unit="item", disable=not progress)
    ):
        record = stored.get(prompt.id)
        settings = dict(new_tokens=new_tokens, seed=seed + index, sampling=REFERENCE_SAMPLING, model=loaded.name)
        if record is None or record["prompt_ids"] != prompt.token_ids or record["settings"] != settings:
            generated = generate_reference(loaded, prompt, new_tokens, seed + index)
            record = dict(
                id=prompt.id,
                kind=prompt.kind,
                settings=settings,
                prompt_ids=prompt.token_ids,
                generated_ids=generated,
                repeated_4grams=repeated_ngrams(generated),
            )
            stored[prompt.id] = record
            written = {**read_references(path), prompt.id: record}
            with atomic_open(path) as f:
                for value in written.values():
                    f.write(json.dumps(value) + "\n")
        records.append(record)
    return records


def packaged_references(model: str) -> dict[str, dict]:
    """The references shipped with the package for `model` (the embedded models), by item id."""
    packaged = PACKAGED / f"{model.replace('/', '_')}.jsonl"
    if not packaged.is_file():
        return {}
    records = (json.loads(line) for line in packaged.read_text(encoding="utf-8").splitlines() if line.strip())
    return {record["id"]: record for record in records}


def user_references(model: str) -> Path:
    """Where references of a model are generated when the package holds none (or too few)."""
    return data_home() / "long_decode" / f"{model.replace('/', '_')}.jsonl"


def bucket_labels(length: int) -> list[tuple[int, int, str]]:
    """``(start, end, label)`` of the position buckets a generation of `length` tokens reaches."""
    edges = [b for b in BUCKETS if b < length] + [length]
    return [(a, b, f"{a}_{b - 1}") for a, b in zip(edges, edges[1:])]


@dataclass
class Reference:
    """One item's full-cache reference: its generated tokens, the clean run's distributions over them,
    and the full cache's greedy continuation from each branch point."""

    generated: list[int]
    clean: object
    branches: dict[int, list[int]]
    repeated: float


@dataclass
class LongDecode(PerSetting):
    """The long-decoding task (see the module docstring)."""

    buffer: int = BUFFER
    new_tokens: int = 1024  # for models without packaged references
    horizon: int = 32
    essay_prompt: int = 128
    seed: int = 0
    name: str = "long-decode"
    decodes = True
    metrics: tuple[str, ...] = ("kl", "nll_increase", "top1_agreement", "agreement_tokens")
    labels = {
        "kl": "KL(full || compressed) (nats / token)",
        "nll_increase": "NLL increase (nats / token)",
        "top1_agreement": "top-1 agreement (share)",
        "agreement_tokens": "greedy tokens before the first divergence",
    }

    def items(self, tokenizer, n: int) -> list[Item]:
        return [
            Item(p.id, p.token_ids, dict(kind=p.kind, index=index))
            for index, p in enumerate(prompts(tokenizer, n, self.essay_prompt))
        ]

    def length(self, model: str) -> int:
        """Tokens generated per reference: the packaged references' length, else `new_tokens`."""
        packaged = packaged_references(model)
        return next(iter(packaged.values()))["settings"]["new_tokens"] if packaged else self.new_tokens

    def capacity(self, item: Item, model: str) -> int:
        return len(item.token_ids) + self.length(model)

    def reference(self, tracer: Tracer, item: Item) -> Reference:
        """The item's reference generation (packaged, stored or generated now), its clean run and the
        full cache's greedy continuation from each branch point."""
        loaded = LoadedModel(tracer.model, tracer.tokenizer, tracer.name)
        packaged = packaged_references(loaded.name)
        records = references(
            loaded,
            item.meta["index"] + 1,
            self.length(loaded.name),
            user_references(loaded.name),
            self.seed,
            self.essay_prompt,
            progress=False,
            known=packaged,
        )
        record = records[item.meta["index"]]
        generated = record["generated_ids"]
        clean = clean_run(tracer, item.token_ids + generated, hidden=False)
        branches = {
            point: full_greedy(tracer, item.token_ids + generated[:point], self.horizon, self.horizon)
            for point in self.branch_points(len(generated))
        }
        return Reference(generated, clean, branches, record["repeated_4grams"])

    def branch_points(self, length: int) -> list[int]:
        return [length // 4, length // 2, 3 * length // 4]

    def measure(self, tracer: Tracer, item: Item, reference: Reference, policy: Policy, budget: Budget) -> dict:
        model, prompt = tracer.model, torch.tensor(item.token_ids)
        generated = torch.tensor(reference.generated)
        points = self.branch_points(len(generated))
        states, _, snapshots = teacher_forced(
            model, prompt, generated, policy, budget, self.buffer, stops=points, tokenizer=tracer.tokenizer
        )
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(generated), device=tracer.device)
        kl, agree, nll = (
            x.float().cpu().numpy()
            for x in kl_and_agreement(model, reference.clean.references, positions, states.to(tracer.device))
        )
        row = dict(
            prompt_tokens=len(prompt),
            generated_tokens=len(generated),
            buffer=self.buffer,
            kl=float(kl.mean()),
            nll_increase=float(nll.mean()),
            top1_agreement=float(agree.mean()),
        )
        for start, end, label in bucket_labels(len(generated)):
            row[f"kl_{label}"] = float(kl[start:end].mean())
            row[f"nll_increase_{label}"] = float(nll[start:end].mean())
        runs = [greedy_agreement(model, snapshots[point], states[point], reference.branches[point]) for point in points]
        row.update(agreement_tokens=float(np.mean(runs)), repeated_4grams_full=reference.repeated)
        return row

    def plot(self, results: pd.DataFrame, title: str, path: Path) -> list[Path]:
        """KL and NLL increase by bucket of generated positions, one line per policy, a panel per budget.
        KL is drawn on a log scale above `KL_LINEAR_BELOW` and a linear one below it (a bucket the budget
        still holds whole differs from the full cache by rounding only); the NLL increase on a linear
        scale (a bucket's mean can be below zero)."""
        theme()
        rows = []
        for metric in ("kl", "nll_increase"):
            columns = [c for c in results.columns if re.fullmatch(rf"{metric}_\d+_\d+", c)]
            long = results.melt(id_vars=["item", "policy", "budget"], value_vars=columns, var_name="bucket")
            rows.append(
                long.assign(metric=metric, bucket=long.bucket.str.removeprefix(f"{metric}_").str.replace("_", "-"))
            )
        data = pd.concat(rows, ignore_index=True).dropna(subset=["value"])
        palette = distinct_palette(results.policy)
        grid = sns.relplot(
            data=data,
            x="bucket",
            y="value",
            hue="policy",
            hue_order=list(palette),
            palette=palette,
            row="metric",
            col="budget",
            kind="line",
            marker="o",
            errorbar=("ci", 95),
            facet_kws=dict(sharey="row"),
            height=3.4,
            aspect=1.3,
        )
        grid.set_axis_labels("generated positions", "")
        for (metric, budget), ax in grid.axes_dict.items():
            if metric == "kl":
                ax.set_yscale("symlog", linthresh=KL_LINEAR_BELOW)
                ax.set_ylim(bottom=0)
            ax.set_title(f"budget {budget}", fontsize=10)
            ax.set_ylabel(self.labels[metric])
        grid.figure.suptitle(title, fontsize=10, y=1.02)
        return save_figure(grid.figure, path)
