"""``lmforge distill``: a small draft model for speculative decoding, taught by the model it will draft for.

    teacher (checkpoint, HF directory, .gguf, packaged name) + prompts
      -> the teacher answers every prompt greedily through the batched engine, reporting its
         ``top_k`` likeliest tokens at each answer token (kept in OUT_DIR/teacher_answers.jsonl:
         a resumed or repeated run reuses them)
      -> rows of prompt + answer tokens, exactly the ids the teacher read and wrote
      -> a student of the teacher's vocabulary (a preset, or a checkpoint to start from)
      -> the one training loop with the distillation stage (train/distill.py): at the answer
         positions, the teacher's token and its likeliest tokens' probabilities as targets
      -> OUT_DIR/model (a plain checkpoint with the teacher's tokenizer: ``--draft OUT_DIR/model``)
      -> a check: held-out prompts decoded at batch 1 plainly and with the new draft guessing (guesses
         kept, tokens a pass, ms a token each way, the same output)

The built-in prompts ask for summaries, explanations, copies and rewrites of the standard
library's docstrings: text every Python carries, and not the language reference that
``benchmarks/speculative.py`` measures on.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.data.chat_records import iter_chat_records
from lmforge.data.sources import ReadErrors
from lmforge.errors import InputError
from lmforge.files import holds_output, write_json_atomic, write_text_atomic
from lmforge.finetune import split_conversations
from lmforge.interop.packaged import DEFAULT_CHAT_MODEL
from lmforge.runtime import Runtime
from lmforge.settings import field, to_dict
from lmforge.tokenizer.chat import ChatTokens, padding_id
from lmforge.train import TrainConfig, fit
from lmforge.train.distill import DistillStage, TeacherRows, pack_teacher_rows
from lmforge.train.sft import pack_examples

BUILTIN_PROMPTS = "builtin-prompts"
ANSWERS = "teacher_answers.jsonl"

# What the built-in prompts ask of a docstring: tasks whose answers reuse the text's words and
# tasks that reword it, as a chat model's users ask.
INSTRUCTIONS = (
    "Summarize the following text in two or three sentences.",
    "Explain the following text in simple words.",
    "Copy the following text exactly.",
    "List the main points of the following text.",
    "Rewrite the following text in your own words.",
    "What is the following text about? Answer in one sentence.",
)


@dataclass
class DistillConfig:
    """Which teacher, which prompts, which student, and how the loss mixes answers and distributions."""

    teacher: str = field(DEFAULT_CHAT_MODEL, "the model to draft for: checkpoint, HF directory, .gguf or packaged name")
    data: list[str] = field([BUILTIN_PROMPTS], f"prompts: .jsonl/.parquet conversations (the teacher answers "
                                              f"each one's last user turn), or {BUILTIN_PROMPTS}")
    prompts: int = field(2000, f"how many {BUILTIN_PROMPTS} to make")
    max_new_tokens: int = field(128, "longest teacher answer, in tokens")
    answer_batch: int = field(16, "requests the teacher answers at a time")
    student: str = field("draft-small", "the student: a model preset (its vocabulary becomes the teacher's), "
                                        "or a checkpoint with the teacher's vocabulary to start from")
    top_k: int = field(10, "the teacher's likeliest tokens kept at each answer token, for the KL term")
    kl_weight: float = field(0.5, "weight of the KL term (the rest on the teacher's tokens); 0 trains on the "
                                  "answers alone")
    prompt_weight: float = field(0.0, "weight of next-token prediction on the prompts' own text (0: none)")
    val_fraction: float = field(0.05, "share of the prompts held out for validation and the check")
    check_prompts: int = field(8, "held-out prompts decoded speculatively with the new draft at the end (0: none)")
    draft_tokens: int = field(4, "guesses per pass in that check")

    def __post_init__(self) -> None:
        if min(self.prompts, self.max_new_tokens, self.answer_batch, self.top_k) < 1:
            raise ValueError("prompts, max_new_tokens, answer_batch and top_k must be at least 1")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ValueError(f"kl_weight must be in [0, 1], got {self.kl_weight}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.check_prompts < 0 or self.draft_tokens < 1:
            raise ValueError("check_prompts must be >= 0 and draft_tokens >= 1")
        if self.prompt_weight < 0:
            raise ValueError(f"prompt_weight must be >= 0, got {self.prompt_weight}")


def builtin_prompts(count: int, seed: int, shortest: int = 200, longest: int = 900) -> list[list[dict]]:
    """``count`` one-turn chats: an instruction from :data:`INSTRUCTIONS` over a standard-library docstring of
    ``shortest`` to ``longest`` characters, both drawn from ``seed`` (docstrings repeat only past their number)."""
    from lmforge.data.builtin import stdlib_docstrings

    texts = sorted({d.text for d in stdlib_docstrings() if shortest <= len(d.text) <= longest})
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < count:
        order += rng.sample(texts, len(texts))
    return [[{"role": "user", "content": f"{rng.choice(INSTRUCTIONS)}\n\n{text}"}] for text in order[:count]]


def read_prompts(config: DistillConfig, seed: int) -> list[list[dict]]:
    """The chats the teacher answers: each conversation up to and including its last user turn."""
    chats: list[list[dict]] = []
    for spec in config.data:
        if spec == BUILTIN_PROMPTS:
            chats += builtin_prompts(config.prompts, seed)
            continue
        errors = ReadErrors()
        for messages in iter_chat_records(spec, errors):
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last_user is not None:
                chats.append(messages[:last_user + 1])
    if not chats:
        raise InputError("no prompts to distill on: --data names no conversation with a user turn")
    return chats


def teacher_answers(teacher, chats: list[list[dict]], config: DistillConfig, path: Path,
                    progress: bool = True) -> list[dict]:
    """The teacher's greedy answer to each chat: ``{"messages", "prompt_ids", "answer_ids", "stop_id", "top"}``
    (``stop_id`` the end-of-turn token that closed the answer, None when it ran out of tokens; ``top`` per
    answer token, the stop token included, its ``top_k`` likeliest [token, log-prob] pairs).

    Read from ``path`` when it holds answers to exactly these chats by this teacher with these settings;
    otherwise made (the batched engine, ``answer_batch`` at a time) and written there."""
    key = hashlib.sha256(json.dumps([config.teacher, config.max_new_tokens, config.top_k, chats]).encode()).hexdigest()
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and json.loads(lines[0]).get("key") == key:
            return [json.loads(line) for line in lines[1:]]
    records = []
    prompts = [teacher.chat_prompt(messages) for messages in chats]
    sampling = teacher.sampling_config(**teacher.chat_sampling({"temperature": 0.0,
                                                                "max_new_tokens": config.max_new_tokens}))
    context = min(teacher.model.config.max_seq_len, max(map(len, prompts)) + config.max_new_tokens)
    engine = teacher.engine(config.answer_batch, context=context)
    chunk = max(64, config.answer_batch * 4)
    bar = tqdm(total=len(chats), desc="teacher answers", unit="prompt", disable=not progress)
    for first in range(0, len(chats), chunk):
        part = range(first, min(first + chunk, len(chats)))
        done = engine.generate([teacher.request(prompts[i], sampling, logprobs=config.top_k) for i in part])
        records += [{"messages": chats[i], "prompt_ids": prompts[i], "answer_ids": completion.token_ids,
                     "stop_id": completion.stop_token_id,
                     "top": [[[token, round(lp, 5)] for token, lp in entry.top] for entry in completion.logprobs]}
                    for i, completion in zip(part, done)]
        bar.update(len(part))
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(line) + "\n" for line in [{"key": key}, *records]))
    return records


def build_student(name: str, vocab_size: int, max_seq_len: int, seed: int):
    """A fresh student from a preset with the teacher's vocabulary, or a checkpoint (which must have it)."""
    from lmforge.model import PRESETS, build_model, preset

    if name in PRESETS:
        torch.manual_seed(seed)
        return build_model(preset(name, vocab_size=vocab_size,
                                  max_seq_len=max(max_seq_len, PRESETS[name].get("max_seq_len", 0))))
    student = load_model(name)
    if student.config.vocab_size != vocab_size:
        raise InputError(f"--student {name} has vocab_size {student.config.vocab_size}; the teacher's is "
                         f"{vocab_size}: a draft must share the teacher's tokens")
    return student


@holds_output("train_config.out_dir")
def distill(config: DistillConfig, train_config: TrainConfig, resume: bool = False) -> dict:
    """Distill a draft model into ``train_config.out_dir``/model; returns a summary (also distill_summary.json)."""
    from lmforge.api import load

    out = Path(train_config.out_dir)
    teacher = load(config.teacher, device=train_config.device, dtype=train_config.dtype)
    if teacher.model.config.is_encoder_decoder:
        raise InputError(f"{config.teacher} is an encoder-decoder; speculative decoding drafts for decoders")
    chats = read_prompts(config, train_config.seed)
    records = teacher_answers(teacher, chats, config, out / ANSWERS, progress=train_config.progress)
    by_chat = {json.dumps(r["messages"]): r for r in records}
    train_chats, val_chats = split_conversations([r["messages"] for r in records], config.val_fraction)

    def rows(part: list[list[dict]]) -> TeacherRows:
        examples, tops = [], []
        for messages in part:
            record = by_chat[json.dumps(messages)]
            stop = [record["stop_id"]] if record["stop_id"] is not None else []
            prompt, answer = record["prompt_ids"], record["answer_ids"] + stop
            kept = min(len(answer), max(0, train_config.seq_len + 1 - len(prompt)))  # answer tokens inside a row
            if kept:  # (a prompt longer than a row teaches nothing about answers)
                examples.append(ChatTokens(prompt + answer[:kept], [False] * len(prompt) + [True] * kept))
                tops.append([[tuple(pair) for pair in entry] for entry in record["top"][:kept]])
        packed = pack_examples(examples, train_config.seq_len, padding_id(teacher.tokenizer))
        return pack_teacher_rows(packed, tops, config.top_k)

    train_rows = rows(train_chats)
    if len(train_rows) == 0:
        raise InputError("every prompt went to validation, or is longer than --seq-len: lower --val-fraction "
                         "or raise --seq-len")
    vocab = teacher.model.config.vocab_size
    student = build_student(config.student, vocab, train_config.seq_len, train_config.seed)
    stage = DistillStage(train_rows, train_config.seed, rows(val_chats) if val_chats else None,
                         kl_weight=config.kl_weight, prompt_weight=config.prompt_weight)
    runtime = Runtime.resolve(train_config.device, train_config.dtype)
    before = None if resume else stage.evaluate(student.to(runtime.device), runtime, train_config.eval_tokens,
                                                train_config.batch_size)
    result = fit(student, stage, train_config, tokenizer=teacher.tokenizer, resume=resume)
    save_checkpoint(out / "model", student, teacher.tokenizer)
    check = draft_check(teacher, out / "model", [by_chat[json.dumps(m)] for m in val_chats[:config.check_prompts]],
                        config, train_config.device, train_config.dtype)
    summary = {"config": to_dict(config), "prompts": len(records), "train_prompts": len(train_chats),
               "val_prompts": len(val_chats), "rows": len(train_rows), "truncated": train_rows.truncated,
               "student_parameters": sum(p.numel() for p in student.parameters()),
               "teacher_parameters": sum(p.numel() for p in teacher.model.parameters()),
               "steps": result.steps, "seconds": result.seconds, "before": before, "final": result.final, "check": check,
               "model": str(out / "model")}
    write_json_atomic(out / "distill_summary.json", summary)
    return summary


def draft_check(teacher, draft_path: Path, records: list[dict], config: DistillConfig, device: str = "auto",
                dtype: str = "auto") -> dict | None:
    """Decode ``records``' prompts greedily through the batched engine at batch 1, plainly and with the new draft
    guessing (eager, both): guesses kept, tokens per pass, ms per token each way, and how many outputs are the
    plain ones (all, when exact). The draft loads with the ``device`` and ``dtype`` the teacher was loaded with."""
    if not records:
        return None
    from lmforge.api import load_draft
    from lmforge.infer.request import Request

    drafter = load_draft(draft_path, teacher.tokenizer, config.teacher, device=device, dtype=dtype)
    sampling = teacher.sampling_config(**teacher.chat_sampling({"temperature": 0.0,
                                                                "max_new_tokens": config.max_new_tokens}))
    # no prefix cache: each run prefills its whole prompt, so that both ways start from the same logits (in bf16 a
    # prompt served from the cache and one computed in a pass round differently)
    engine = teacher.engine(1, context=max(len(r["prompt_ids"]) for r in records) + config.max_new_tokens,
                            prefix_caching=False)
    seconds, tokens, same = {"plain": 0.0, "draft": 0.0}, 0, 0
    drafted = accepted = passes = 0
    for record in records:
        outputs = {}
        for way in ("plain", "draft"):
            request = Request(record["prompt_ids"], sampling, drafter=drafter.fork() if way == "draft" else None,
                              draft_tokens=config.draft_tokens, decode=teacher.reply_text)
            stats = engine.stats
            before = (stats.drafted, stats.accepted, stats.decode_steps + stats.prefill_passes)
            start = time.perf_counter()
            outputs[way] = engine.generate([request])[0].token_ids
            seconds[way] += time.perf_counter() - start
            if way == "draft":
                drafted += stats.drafted - before[0]
                accepted += stats.accepted - before[1]
                passes += stats.decode_steps + stats.prefill_passes - before[2]  # (the prompt's pass: 1 token)
        tokens += len(outputs["plain"])
        same += outputs["draft"] == outputs["plain"]
    return {"prompts": len(records), "draft_tokens": config.draft_tokens, "acceptance": accepted / max(drafted, 1),
            "tokens_per_pass": tokens / max(passes, 1), "same_output": same,
            "ms_per_token_plain": 1000 * seconds["plain"] / max(tokens, 1),
            "ms_per_token_draft": 1000 * seconds["draft"] / max(tokens, 1)}
