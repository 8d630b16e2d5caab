"""``lmforge study emergence``: does an ability jump with scale, or does the metric make it jump?

The notes' example: a task made of 5 sub-tasks whose accuracy each rises smoothly from 40%
to 60% looks like a jump from about 1% to 8%, because the whole task is right only when
every part is (p^5). This study trains the ladder (:mod:`lmforge.study.ladder`) on text made
of the built-in verifiable tasks and scores a composite task built from ``k`` of them two
ways:

- **exact match on the whole task**: every one of the k answers right;
- **continuous metrics**: the share of sub-task answers right (p), and the mean per-token
  log-likelihood of the answers.

An item is k question/answer lines, each sub-task drawn from ``--kinds``::

    Q: Sort these numbers: 58, 16, 96, 48 A: 16, 48, 58, 96
    Q: What is the largest of these numbers: 3, 99, 12? A: 99
    ...

The models pretrain on such items (next-token loss on the whole text). On held-out items,
each answer is scored after the gold text before it (teacher forcing): it counts as right
when every token of it, and the line break after it, is the model's likeliest next token
(so greedy decoding would write exactly it). Each text piece (question, answer, line break)
is tokenized on its own, in training and evaluation alike, so an answer always starts and
ends on a token boundary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.data.tasks import TASK_MAKERS, Task
from lmforge.errors import InputError
from lmforge.files import write_json_atomic
from lmforge.runtime import Runtime
from lmforge.settings import field, to_dict
from lmforge.study.ladder import SAME_LADDER, LadderConfig, check_same_study, check_time, plan, run_one
from lmforge.tokenizer.special import BEGIN_OF_TEXT, END_OF_TEXT, SPECIAL_IDS
from lmforge.train import PretrainStage

BOS, EOS = SPECIAL_IDS[BEGIN_OF_TEXT], SPECIAL_IDS[END_OF_TEXT]
SKILLS = ("reverse", "spell", "max", "sort", "count", "add", "subtract", "multiply")  # kinds with a checkable skill
MAX_DRAWS = 1000  # draws of one kind before it counts as used up by the held-out questions


@dataclass
class EmergenceConfig(LadderConfig):
    """An emergence study: the ladder, trained on composite items of the built-in tasks."""

    out: str = field("runs/study-emergence", "folder of the study (data, runs, results); rerun to resume")
    seq_len: int = field(256, "tokens per training sequence (and the longest item that can be scored)")
    k: int = field(5, "sub-tasks per composite item (the whole task is right when all k are)")
    kinds: list[str] = field(["max", "sort", "count"], f"task kinds the sub-tasks are drawn from ({', '.join(SKILLS)}; "
                             "reverse and spell have about a hundred questions each: held-out items use most of them)")
    train_items: int = field(40000, "composite items to pretrain on")
    eval_items: int = field(300, "held-out composite items to score")

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [kind for kind in self.kinds if kind not in SKILLS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds {unknown or self.kinds}: choose from {', '.join(SKILLS)}")
        if self.k < 1 or self.train_items < 1 or self.eval_items < 1:
            raise ValueError("k, train_items and eval_items must be at least 1")


SAME_STUDY = (*SAME_LADDER, "k", "kinds", "train_items", "eval_items")


def make_items(count: int, k: int, kinds: list[str], rng: random.Random, avoid: frozenset[str] = frozenset()
               ) -> list[list[Task]]:
    """``count`` items of ``k`` tasks each, the kinds drawn at random; no question from ``avoid`` (a kind
    draws again until it finds one; InputError when a kind has no question left outside ``avoid``)."""
    items = []
    for _ in range(count):
        item = []
        for kind in (rng.choice(kinds) for _ in range(k)):
            for _ in range(MAX_DRAWS):
                task = TASK_MAKERS[kind](rng)
                if task.prompt not in avoid:
                    item.append(task)
                    break
            else:
                raise InputError(f"the {kind} task has too few distinct questions left after holding out the "
                                 "evaluation items: fewer --eval-items, or leave the kind out")
        items.append(item)
    return items


def encode_item(tokenizer, item: list[Task]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of an item (begin-of-text first) and, for each sub-task, the span of its answer's tokens
    plus the line break after it: (start, end) with ids[start:end] what the model must write."""
    ids, spans = [BOS], []
    newline = tokenizer.encode("\n")
    for task in item:
        ids += tokenizer.encode(f"Q: {task.prompt} A:")
        start = len(ids)
        ids += tokenizer.encode(" " + task.answer) + newline
        spans.append((start, len(ids) - len(newline) + 1))  # the answer and the first token of the line break
    return ids, spans


def item_text(item: list[Task]) -> str:
    return "".join(f"Q: {task.prompt} A: {task.answer}\n" for task in item)


def prepare(config: EmergenceConfig, out: Path):
    """Items, tokenizer and token streams of the study (made once, then read back)."""
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    rng = random.Random(f"{config.seed}:emergence")
    eval_items = make_items(config.eval_items, config.k, config.kinds, random.Random(f"{config.seed}:eval"))
    held_out = frozenset(task.prompt for item in eval_items for task in item)
    train_items = make_items(config.train_items, config.k, config.kinds, rng, held_out)
    if not (out / "tokenizer.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer((item_text(item) for item in train_items), config.vocab_size,
                                    progress=config.progress)
        tokenizer.save(out / "tokenizer.json")
    tokenizer = Tokenizer.from_file(out / "tokenizer.json")
    streams = {}
    for split, items in (("train", train_items), ("val", eval_items)):
        path = out / f"{split}.npy"
        if not path.is_file():
            np.save(path, np.array([t for item in items for t in encode_item(tokenizer, item)[0] + [EOS]],
                                   dtype=np.uint16))
        streams[split] = np.load(path, mmap_mode="r")
    return tokenizer, streams, eval_items


def check_length(encoded: list[tuple[list[int], list]], seq_len: int) -> None:
    longest = max(len(ids) for ids, _ in encoded)
    if longest > seq_len:
        raise InputError(f"an item of {longest} tokens is longer than the models' {seq_len}: raise --seq-len or "
                         "lower --k")


@torch.no_grad()
def score(model, tokenizer, items: list[list[Task]], runtime: Runtime, batch_size: int = 32) -> dict:
    """Sub-task accuracy p, whole-task exact match, and the answers' mean per-token log-likelihood."""
    right = np.zeros((len(items), len(items[0])), dtype=bool)
    logprob_sum = token_count = 0.0
    encoded = [encode_item(tokenizer, item) for item in items]
    check_length(encoded, model.config.max_seq_len)
    for first in range(0, len(items), batch_size):
        part = encoded[first:first + batch_size]
        length = max(len(ids) for ids, _ in part)
        ids = torch.full((len(part), length), EOS, dtype=torch.long)
        for row, (tokens, _) in enumerate(part):
            ids[row, :len(tokens)] = torch.tensor(tokens)
        ids = ids.to(runtime.device)
        with runtime.autocast():
            logits = model(ids[:, :-1]).float()  # causal: padding after a row changes none of its positions
        logp = torch.log_softmax(logits, dim=-1)
        guess = logits.argmax(-1)
        for row, (_, spans) in enumerate(part):
            for j, (start, end) in enumerate(spans):
                targets = ids[row, start:end]
                right[first + row, j] = bool((guess[row, start - 1:end - 1] == targets).all())
                answer = logp[row, start - 1:end - 2].gather(1, targets[:-1, None])  # the answer (no line break)
                logprob_sum += answer.sum().item()
                token_count += answer.numel()
    k = right.shape[1]
    p = float(right.mean())
    return {"sub_accuracy": p, "whole_exact": float(right.all(axis=1).mean()), "p_to_the_k": p ** k,
            "answer_logprob": logprob_sum / max(token_count, 1), "k": k}


def emergence_study(config: EmergenceConfig) -> Path:
    """Run (or resume) the study; returns the path of results.md."""
    out = Path(config.out)
    check_same_study(config, out, SAME_STUDY)
    tokenizer, streams, eval_items = prepare(config, out)
    check_length([encode_item(tokenizer, item) for item in eval_items], config.seq_len)
    runs, skipped = plan(config, tokenizer.vocab_size, len(streams["train"]), minimum=2,
                         why_minimum=" (a curve needs two points)")
    for why in skipped:
        print(f"[study] left out {why}", flush=True)
    stage = PretrainStage(streams["train"], config.seq_len, config.seed, val_tokens=streams["val"])
    check_time(config, runs, stage, tokenizer.vocab_size, out)
    runtime = Runtime.resolve(config.device, config.dtype)
    rows = []
    for run in runs:
        print(f"[study] {run.name}: {run.parameters:,} parameters, {run.tokens:,} tokens, {run.steps} steps",
              flush=True)
        rows.append(run_one(config, run, stage, tokenizer, out,
                            measure=lambda model: score(model, tokenizer, eval_items, runtime, config.batch_size)))
    rows.sort(key=lambda r: r["flops"] * 1e12 + r["parameters"])
    results = {"config": to_dict(config), "runtime": runtime.describe(), "skipped": skipped, "runs": rows,
               "example": item_text(eval_items[0])}
    write_json_atomic(out / "results.json", results)
    from lmforge.study.report import write_emergence_report

    return write_emergence_report(out, results)

