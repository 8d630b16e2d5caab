"""`lmforge dpo`: align a chat model on preference pairs with DPO, IPO, conservative DPO or SimPO.

    lmforge dpo --model runs/speedrun/sft/model --data builtin-preferences --out-dir runs/dpo
    lmforge dpo --data pairs.jsonl --loss ipo --beta 0.5 --method full

The pairs are read as ``lmforge rm`` reads them (:func:`lmforge.data.preferences.load_pairs`); the
stage is :class:`lmforge.train.dpo.DPOStage` on the one training loop. The reference is the
starting model: with LoRA (the default) the same weights with the adapters switched off, with full
fine-tuning a frozen copy; ``--reference`` names another. On the built-in pairs, built-in tasks that
share no prompt with them are held out, and greedy accuracy on them is measured before and after.
Writes ``model/`` (adapters merged), ``adapter/`` (LoRA, PEFT layout), ``checkpoint/`` (resume),
``metrics.jsonl``, ``loss.png``, ``rewards.png`` and ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.checkpoint import load_model, load_tokenizer, save_checkpoint
from lmforge.data.preferences import BUILTIN_PREFERENCES, SAMPLED_PREFERENCES, load_pairs, split_preferences
from lmforge.data.tasks import KINDS
from lmforge.errors import InputError
from lmforge.eval.tasks import accuracy_gain, model_task_accuracy
from lmforge.files import holds_output, write_json_atomic
from lmforge.interop.packaged import DEFAULT_CHAT_MODEL, resolve_model
from lmforge.peft.method import MethodConfig, finish_weights, prepare_weights
from lmforge.runtime import Runtime
from lmforge.settings import field, to_dict
from lmforge.tokenizer.chat import padding_id
from lmforge.train import TrainConfig, fit
from lmforge.train.dpo import DPO_LOSSES, DPOStage, PreferenceRows
from lmforge.train.metrics import plot_rewards
from lmforge.train.rollout import task_sampler


@dataclass
class DPOConfig(MethodConfig):
    """What to align, on which pairs, with which loss."""

    model: str = field(DEFAULT_CHAT_MODEL, "model to start from (and, unless --reference, the reference)")
    data: list[str] = field([BUILTIN_PREFERENCES], f"preference pairs: .jsonl files, hf:NAME[:CONFIG]:SPLIT, "
                                                   f"{BUILTIN_PREFERENCES} or {SAMPLED_PREFERENCES} (the "
                                                   "model's own answers ranked by the tasks' checker)")
    pairs: int = field(2000, f"how many tasks {BUILTIN_PREFERENCES} and {SAMPLED_PREFERENCES} make pairs of")
    samples: int = field(4, f"answers sampled per task for {SAMPLED_PREFERENCES}")
    kinds: list[str] = field(list(KINDS), f"built-in task kinds the pairs and held-out tasks come from "
                                          f"({', '.join(KINDS)})")
    eval_tasks: int = field(200, f"built-in tasks held out from {BUILTIN_PREFERENCES} and {SAMPLED_PREFERENCES} "
                                 "(no shared prompt) to measure accuracy before and after (0: none)")
    val_fraction: float = field(0.05, "share of the prompts held out for validation (loss, reward accuracy)")
    loss: str = field("sigmoid", "sigmoid (DPO), ipo, or simpo (reference-free)")
    beta: float = field(0.1, "how far from the reference the policy may move (larger: closer); SimPO's reward scale")
    label_smoothing: float = field(0.0, "conservative DPO: the chance that a pair's label is wrong (sigmoid only)")
    simpo_gamma: float = field(0.5, "SimPO's target reward margin")
    rpo_alpha: float = field(0.0, "RPO: add this times the chosen answers' token NLL to the loss (TRL's "
                                  "loss_type [sigmoid, sft] with loss_weights [1, alpha]; 0: plain DPO)")
    reference: str = field("", "reference model (default: the starting model)")
    system: str = field("", "system prompt for the held-out task accuracy")
    skip_errors: bool = field(False, "skip malformed pairs (counted) instead of stopping")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"loss={self.loss!r}; choose one of {', '.join(DPO_LOSSES)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown task kind(s) {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
        if self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError("label_smoothing (conservative DPO) goes with loss=sigmoid")


def _reference(config: DPOConfig, path: str):
    """The frozen reference model, or None when the policy's adapters serve (or SimPO needs none)."""
    if config.loss == "simpo":
        return None
    if config.reference:
        return load_model(resolve_model(config.reference))
    return None if config.adapters else load_model(path)


@holds_output("train_config.out_dir")
def train_dpo(config: DPOConfig, train_config: TrainConfig, resume: bool = False) -> dict:
    """Align and write ``model/`` under ``train_config.out_dir``; returns a summary (also summary.json)."""
    path = resolve_model(config.model)
    model, tokenizer = load_model(path), load_tokenizer(path)
    if model.config.head != "lm":
        raise InputError(f"{config.model} has the {model.config.head!r} head; DPO trains a language model")
    runtime = Runtime.resolve(train_config.device, train_config.dtype)
    pairs, read, held_out = load_pairs(config.data, config.pairs, train_config.seed, config.skip_errors,
                                       config.eval_tasks, config.kinds,
                                       task_sampler(model, tokenizer, runtime, config.samples, train_config.seed,
                                                    train_config.progress))
    train, val = split_preferences(pairs, config.val_fraction, train_config.seed)
    if not train:
        raise InputError("every pair went to validation: lower --val-fraction")
    pad_id = padding_id(tokenizer)
    rows = PreferenceRows(tokenizer, train, train_config.seq_len, pad_id)
    stage = DPOStage(rows, train_config.seed, PreferenceRows(tokenizer, val, train_config.seq_len, pad_id) if val else None,
                     config.loss, config.beta, config.label_smoothing, config.simpo_gamma, _reference(config, path),
                     config.rpo_alpha)
    if stage.reference is not None:
        stage.reference.to(runtime.device)
    system = config.system or None
    before = model_task_accuracy(model, tokenizer, runtime, held_out, system) if held_out else None
    trainable = prepare_weights(model, config, train_config.seed)
    result = fit(model, stage, train_config, tokenizer=tokenizer, resume=resume)
    final = result.final or stage.evaluate(model, runtime, 0, train_config.batch_size)  # before the merge
    out = Path(train_config.out_dir)
    finish_weights(model, config, out, config.model)
    save_checkpoint(out / "model", model, tokenizer)
    after = model_task_accuracy(model, tokenizer, runtime, held_out, system) if held_out else None
    plot_rewards(out / "metrics.jsonl", out / "rewards.png")
    summary = {"config": to_dict(config), "read": read, "train_pairs": len(train), "val_pairs": len(val),
               "truncated": rows.truncated, "trainable_parameters": trainable, "held_out_tasks": len(held_out),
               "task_accuracy_before": before, "task_accuracy_after": after,
               "task_accuracy_gain": accuracy_gain(before, after) if held_out else None, "final": final,
               "steps": result.steps, "seconds": result.seconds, "model": str(out / "model")}
    write_json_atomic(out / "summary.json", summary)
    return summary
