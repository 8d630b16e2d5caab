"""Reward-model training on the one loop: the Bradley-Terry stage learns the built-in preferences."""

from __future__ import annotations

import torch

from lmforge.data.preferences import builtin_preferences, split_preferences
from lmforge.model import DecoderLM, preset
from lmforge.model.heads import with_head
from lmforge.runtime import Runtime
from lmforge.tokenizer import train_tokenizer
from lmforge.train import TrainConfig, fit
from lmforge.train.reward import PairRows, RewardStage


def test_a_tiny_reward_model_learns_to_prefer_the_chosen_answers(tmp_path):
    pairs = builtin_preferences(600, seed=0)
    train, val = split_preferences(pairs, 0.2, seed=0)
    texts = [p.prompt[0]["content"] + " " + p.chosen + " " + p.rejected for p in pairs]
    tokenizer = train_tokenizer(texts, 400, progress=False)
    torch.manual_seed(0)
    model = with_head(DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=96)), "score")
    stage = RewardStage(PairRows(tokenizer, train, 96), seed=0, val=PairRows(tokenizer, val, 96))
    runtime = Runtime.resolve("cpu", "fp32")
    before = stage.evaluate(model, runtime, 0, 64)
    config = TrainConfig(out_dir=str(tmp_path), batch_size=16, seq_len=96, max_steps=120, lr=3e-3, warmup_steps=10,
                         eval_every=0, save_every=1000, log_every=1000, device="cpu", dtype="fp32", progress=False)
    fit(model, stage, config, tokenizer=tokenizer)
    after = stage.evaluate(model, runtime, 0, 64)
    assert set(after) == {"val_loss", "pair_accuracy", "margin"}
    assert after["val_loss"] < before["val_loss"]
    # half the pairs (clean vs malformed answers) are learnable by a tiny model in 120 steps; arithmetic is not
    assert after["pair_accuracy"] >= 0.65 and after["pair_accuracy"] > before["pair_accuracy"] + 0.15
    assert after["margin"] > 0
