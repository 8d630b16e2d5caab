"""``lmforge sft``: from a base or chat model to an assistant, by full fine-tuning, LoRA or QLoRA.

    model (checkpoint, HF directory, .gguf, packaged name) + conversations
      -> chat format with the loss on answers only -> packed rows (an encoder-decoder: prompt -> answer pairs)
      -> full: every weight trains | lora: adapters beside frozen weights
         | qlora: adapters beside a frozen base stored in 4-bit NF4
      -> the one training loop (train/loop.py)
      -> out_dir/model (a plain checkpoint, adapters merged) and, for LoRA, out_dir/adapter (PEFT layout)

``out_dir/checkpoint`` is the loop's training state (for ``--resume``); ``model`` is
what to load, chat with and export.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.checkpoint import load_model, load_tokenizer, save_checkpoint
from lmforge.data.chat_records import iter_chat_records
from lmforge.data.sources import ReadErrors
from lmforge.errors import InputError
from lmforge.eval.tasks import model_task_accuracy
from lmforge.files import holds_output, write_json_atomic
from lmforge.interop.packaged import DEFAULT_CHAT_MODEL
from lmforge.peft.method import MethodConfig, finish_weights, prepare_weights
from lmforge.runtime import Runtime
from lmforge.settings import field, to_dict
from lmforge.tokenizer.chat import padding_id, render_chat
from lmforge.train import TrainConfig, fit
from lmforge.train.sft import (
    PackedRows,
    Seq2SeqRows,
    Seq2SeqSFTStage,
    SFTStage,
    pack_examples,
    split_examples,
)

BUILTIN_TASKS = "builtin-tasks"


@dataclass
class FinetuneConfig(MethodConfig):
    """What to fine-tune, on what, and how."""

    model: str = field(DEFAULT_CHAT_MODEL, "model to start from: checkpoint, HF directory, .gguf or packaged name")
    data: list[str] = field([BUILTIN_TASKS], f"conversations: .jsonl/.parquet files, hf:NAME[:CONFIG]:SPLIT, or {BUILTIN_TASKS}")
    tasks: int = field(2000, f"how many {BUILTIN_TASKS} conversations to generate for training")
    eval_tasks: int = field(200, f"{BUILTIN_TASKS} held out (no shared prompt) to measure accuracy before and after")
    val_fraction: float = field(0.05, "share of the conversations held out for the validation loss")
    system: str = field("", "system prompt put before every conversation that has none")
    skip_errors: bool = field(False, "skip malformed records (counted) instead of stopping")
    qat: str = field("", "quantization-aware training, int8 or int4 (with --method full): the forward pass uses "
                         "the quantized weights; OUT_DIR/quantized is written at the end")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.qat and self.qat not in ("int8", "int4"):
            raise ValueError(f"qat={self.qat!r}; choose int8 or int4")
        if self.qat and self.method != "full":
            raise ValueError("qat trains the weights that get quantized: use it with --method full")


def read_conversations(config: FinetuneConfig, seed: int) -> tuple[list[list[dict]], dict, list]:
    """All conversations of ``config.data``, a summary of what was read and skipped, and the
    held-out built-in tasks (none unless ``builtin-tasks`` is among the data)."""
    errors = ReadErrors(skip=config.skip_errors)
    conversations: list[list[dict]] = []
    held_out: list = []
    for spec in config.data:
        if spec == BUILTIN_TASKS:
            from lmforge.data.tasks import train_eval_tasks

            train, held_out = train_eval_tasks(config.tasks, config.eval_tasks, seed)
            conversations += [task.messages(config.system or None) for task in train]
        else:
            conversations += list(iter_chat_records(spec, errors))
    if config.system:
        conversations = [c if c[0]["role"] == "system" else [{"role": "system", "content": config.system}, *c]
                         for c in conversations]
    if not conversations:
        raise InputError("no conversations to train on")
    return conversations, {"conversations": len(conversations), "skipped": errors.counts,
                           "skipped_examples": errors.examples}, held_out


def split_conversations(conversations: list[list[dict]], val_fraction: float) -> tuple[list, list]:
    """Train/validation by a hash of each conversation's text: independent of order, stable across runs."""
    train, val = [], []
    for conversation in conversations:
        digest = hashlib.sha256(json.dumps(conversation, sort_keys=True).encode()).digest()
        (val if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else train).append(conversation)
    return train, val


@holds_output("train_config.out_dir")
def finetune(config: FinetuneConfig, train_config: TrainConfig, resume: bool = False) -> dict:
    """Fine-tune and write ``model/`` (and ``adapter/``) under ``train_config.out_dir``; returns a summary."""
    model, tokenizer = load_model(config.model), load_tokenizer(config.model)
    conversations, read, held_out = read_conversations(config, train_config.seed)
    runtime = Runtime.resolve(train_config.device, train_config.dtype)

    def task_accuracy() -> dict:
        return model_task_accuracy(model, tokenizer, runtime, held_out, config.system or None)

    before = task_accuracy() if held_out else None
    train, val = split_conversations(conversations, config.val_fraction)
    if not train:
        raise InputError("every conversation went to validation: lower --val-fraction")
    pad_id = padding_id(tokenizer)

    seq2seq = model.config.is_encoder_decoder  # the encoder reads the prompt, the decoder writes the answer

    def pack(items: list) -> PackedRows | Seq2SeqRows:
        examples = [render_chat(tokenizer, c) for c in items]
        if seq2seq:
            return split_examples(examples, train_config.seq_len, pad_id)
        return pack_examples(examples, train_config.seq_len, pad_id)

    rows = pack(train)
    stage = (Seq2SeqSFTStage if seq2seq else SFTStage)(rows, train_config.seed, pack(val) if val else None)
    trainable = prepare_weights(model, config, train_config.seed)
    if config.qat:
        from lmforge.quant.qat import prepare_qat, qat_spec

        prepare_qat(model, qat_spec(config.qat))
    result = fit(model, stage, train_config, tokenizer=tokenizer, resume=resume)
    out = Path(train_config.out_dir)
    finish_weights(model, config, out, config.model)
    save_checkpoint(out / "model", model, tokenizer)
    after = task_accuracy() if held_out else None  # with --qat: the quantized weights' accuracy
    quantized = None
    if config.qat:  # the integer checkpoint holds exactly the weights the forward passes used
        from lmforge.quant.ptq import quantize_checkpoint

        report = quantize_checkpoint(out / "model", out / "quantized", qat_spec(config.qat), eval_items=0)
        quantized = {"model": str(out / "quantized"), "bpb_float": report.bpb_before, "bpb_quantized": report.bpb_after}
    summary = {"task_accuracy_before": before, "task_accuracy_after": after,"config": to_dict(config), "read": read, "train_conversations": len(train),
               "val_conversations": len(val), "rows": len(rows), "truncated": rows.truncated,
               "trainable_parameters": trainable, "steps": result.steps, "seconds": result.seconds,
               "final": result.final, "model": str(out / "model"), "quantized": quantized}
    write_json_atomic(out / "sft_summary.json", summary)
    return summary
