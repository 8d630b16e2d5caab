"""`lmforge rm`: train a reward model on preference pairs; `lmforge rm score`: score answers with it.

    lmforge rm --model runs/speedrun/sft/model --data builtin-preferences --out-dir runs/rm
    lmforge rm score runs/rm/model --input pairs.jsonl        # one score per answer, and which wins

The model starts from a language model's backbone with a new ``score`` head
(:func:`lmforge.model.heads.with_head`), or continues a reward model. It learns with the
pairwise Bradley-Terry loss (:class:`lmforge.train.reward.RewardStage`) on the one training
loop, and reports the held-out pair accuracy and mean margin before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.checkpoint import load_model, load_tokenizer, save_checkpoint
from lmforge.data.preferences import (
    BUILTIN_PREFERENCES,
    SAMPLED_PREFERENCES,
    Preference,
    load_pairs,
    split_preferences,
)
from lmforge.errors import InputError
from lmforge.files import holds_output, write_json_atomic
from lmforge.interop.packaged import DEFAULT_CHAT_MODEL, resolve_model
from lmforge.model.heads import with_head
from lmforge.peft.method import MethodConfig, finish_weights, prepare_weights
from lmforge.runtime import Runtime
from lmforge.settings import field, to_dict
from lmforge.tokenizer.chat import padding_id
from lmforge.train import TrainConfig, fit
from lmforge.train.reward import PairRows, RewardStage
from lmforge.train.rollout import task_sampler


@dataclass
class RewardConfig(MethodConfig):
    """What reward model to train, on which pairs, changing which weights."""

    method: str = field("full", "full (every weight), lora (adapters; the score head trains in full) or qlora")
    model: str = field(DEFAULT_CHAT_MODEL, "model to start from (a language model gets a new score head) or a "
                                           "reward model to go on training")
    data: list[str] = field([BUILTIN_PREFERENCES], f"preference pairs: .jsonl files, hf:NAME[:CONFIG]:SPLIT, "
                                                   f"{BUILTIN_PREFERENCES} or {SAMPLED_PREFERENCES} (answers "
                                                   "of the starting language model ranked by the tasks' checker)")
    pairs: int = field(2000, f"how many tasks {BUILTIN_PREFERENCES} and {SAMPLED_PREFERENCES} make pairs of")
    samples: int = field(4, f"answers sampled per task for {SAMPLED_PREFERENCES}")
    val_fraction: float = field(0.1, "share of the prompts held out to measure pair accuracy")
    margin: float = field(0.0, "required score gap in the loss: -log sigmoid(r_chosen - r_rejected - margin)")
    skip_errors: bool = field(False, "skip malformed pairs (counted) instead of stopping")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@holds_output("train_config.out_dir")
def train_reward_model(config: RewardConfig, train_config: TrainConfig, resume: bool = False) -> dict:
    """Train and write ``model/`` under ``train_config.out_dir``; returns a summary (also summary.json)."""
    path = resolve_model(config.model)
    model, tokenizer = load_model(path), load_tokenizer(path)
    runtime = Runtime.resolve(train_config.device, train_config.dtype)
    sampler = None  # sampled pairs come from the language model the reward model starts from
    if model.config.head == "lm":
        sampler = task_sampler(model, tokenizer, runtime, config.samples, train_config.seed, train_config.progress)
    pairs, read, _ = load_pairs(config.data, config.pairs, train_config.seed, config.skip_errors,
                                sample_answers=sampler)
    if model.config.head != "score":
        torch.manual_seed(train_config.seed)  # the new head's initial weights
        model = with_head(model, "score")
    train, val = split_preferences(pairs, config.val_fraction, train_config.seed)
    pad_id = padding_id(tokenizer)
    stage = RewardStage(PairRows(tokenizer, train, train_config.seq_len, pad_id), train_config.seed,
                        PairRows(tokenizer, val, train_config.seq_len, pad_id) if val else None, config.margin)
    before = stage.evaluate(model.to(runtime.device), runtime, 0, train_config.batch_size)
    trainable = prepare_weights(model, config, train_config.seed)
    result = fit(model, stage, train_config, tokenizer=tokenizer, resume=resume)
    out = Path(train_config.out_dir)
    finish_weights(model, config, out, config.model)
    save_checkpoint(out / "model", model, tokenizer)
    after = stage.evaluate(model, runtime, 0, train_config.batch_size)
    summary = {"config": to_dict(config), "read": read, "train_pairs": len(train), "val_pairs": len(val),
               "trainable_parameters": trainable, "before": before, "after": after, "steps": result.steps,
               "seconds": result.seconds, "model": str(out / "model")}
    write_json_atomic(out / "summary.json", summary)
    return summary


@torch.no_grad()
def score_pairs(model_path: str | Path, pairs: list[Preference], batch_size: int = 16,
                seq_len: int | None = None) -> list[tuple[float, float]]:
    """(score of chosen, score of rejected) for each pair, under the reward model at ``model_path``."""
    model, tokenizer = load_model(model_path), load_tokenizer(model_path)
    if model.config.head != "score":
        raise InputError(f"{model_path} is a language model (head 'lm'), not a reward model: train one with "
                         "`lmforge rm`")
    stage = RewardStage(PairRows(tokenizer, pairs, seq_len or model.config.max_seq_len), seed=0)
    model.eval()
    scores = []
    for first in range(0, len(pairs), batch_size):
        batch = stage.train.take(list(range(first, min(len(pairs), first + batch_size))), torch.device("cpu"))
        chosen, rejected = stage.scores(model, batch)
        scores += list(zip(chosen.tolist(), rejected.tolist()))
    return scores
