"""The GRPO stage: group advantages, per-token log-probabilities, rollouts on the engine, learning a reward,
the KL to a reference, and groups without a learning signal."""

from __future__ import annotations

import pytest
import torch

from lmforge.model import DecoderLM, preset
from lmforge.peft.lora import LoraConfig, apply_lora
from lmforge.runtime import Runtime
from lmforge.tokenizer import train_tokenizer
from lmforge.train import TrainConfig, fit
from lmforge.train.grpo import GRPOStage, RLPrompt, group_advantages
from lmforge.train.preference import sequence_logps
from lmforge.train.rollout import token_stats

CPU = Runtime.resolve("cpu", "fp32")
TEXT = "the cat sat on the mat. a dog ran to the park. one two three four five six seven eight nine ten. " * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], 300, progress=False)


def tiny(tokenizer, seed=0):
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=128))


def prompts(n=8):
    return [RLPrompt([{"role": "user", "content": f"say something {i}"}], i) for i in range(n)]


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    advantages, std = group_advantages(rewards)
    s = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as TRL
    torch.testing.assert_close(advantages[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4))
    assert torch.equal(advantages[1], torch.zeros(4)) and std[1] == 0


def test_token_logps_equal_the_full_logits_computation(tokenizer):
    model = tiny(tokenizer).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (3, 20))
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, 5:], mask[1, 12:18], mask[2, 1:] = True, True, True
    logps, entropy, _ = token_stats(model, ids, mask)
    sums, _ = sequence_logps(model(ids)[:, :-1], ids[:, 1:], mask[:, 1:])
    torch.testing.assert_close(logps.sum(1), sums, rtol=1e-5, atol=1e-4)
    assert bool((logps[~mask] == 0).all()) and bool((entropy[mask] > 0).all())


def starts_with(token_text: str):
    def reward(prompts, completions, metas):
        return [1.0 if c.lstrip().startswith(token_text) else 0.0 for c in completions]
    return reward


def stage_for(tokenizer, reward, **kw):
    settings = dict(group_size=8, max_new_tokens=6, temperature=1.0)
    settings.update(kw)
    return GRPOStage(prompts(), reward, tokenizer, CPU, seed=0, **settings)


def test_rollouts_are_seeded_per_prompt_and_step(tokenizer):
    model = tiny(tokenizer)
    stage = stage_for(tokenizer, starts_with("the"))
    alone = stage.sample(model, [3], step=5)
    together = stage.sample(model, [1, 3, 6], step=5)
    assert together[8:16] == alone  # the same answers whatever shares the batch
    assert stage.sample(model, [3], step=6) != alone  # a new step samples anew
    assert len(set(map(tuple, alone))) > 1  # a group holds different answers


def test_grpo_raises_the_reward_and_logs_trl_figures(tokenizer, tmp_path):
    model = tiny(tokenizer)
    stage = stage_for(tokenizer, starts_with("t"))
    start = stage.rollout(model, list(range(8)), step=1000).rewards.mean().item()
    config = TrainConfig(out_dir=str(tmp_path), batch_size=4, seq_len=16, max_steps=30, lr=2e-2, warmup_steps=0,
                         eval_every=0, save_every=1000, log_every=5, device="cpu", dtype="fp32", progress=False)
    fit(model, stage, config)
    end = stage.rollout(model, list(range(8)), step=1000).rewards.mean().item()
    assert end > start + 0.4, (start, end)
    import json

    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert {"reward", "reward_std", "frac_reward_zero_std", "entropy", "clip_ratio",
            "completions/mean_length", "completions/max_length"} <= set(train[-1])
    assert "kl" not in train[-1]  # beta 0: no reference pass, no KL to report
    assert train[-1]["reward"] > train[0]["reward"]


def test_the_kl_is_zero_at_the_start_and_grows_with_lora(tokenizer, tmp_path):
    model = apply_lora(tiny(tokenizer), LoraConfig(rank=4))
    stage = stage_for(tokenizer, starts_with("t"), beta=0.1)
    _, figures = stage.policy_loss(model, stage.rollout(model, [0, 1], step=0))
    assert figures["kl"] == pytest.approx(0.0, abs=1e-6)  # adapters at zero: the policy is the reference
    config = TrainConfig(out_dir=str(tmp_path), batch_size=4, seq_len=16, max_steps=10, lr=3e-2, warmup_steps=0,
                         eval_every=0, save_every=1000, log_every=1000, device="cpu", dtype="fp32", progress=False)
    fit(model, stage, config)
    _, figures = stage.policy_loss(model, stage.rollout(model, [0, 1], step=0))
    assert figures["kl"] > 1e-4


def test_groups_with_one_reward_teach_nothing(tokenizer):
    model = tiny(tokenizer)
    stage = stage_for(tokenizer, lambda p, c, m: [1.0] * len(c))
    rollouts = stage.rollout(model, [0, 1], step=0)
    assert stage.pop_metrics()["frac_reward_zero_std"] == 1.0
    loss, _ = stage.policy_loss(model, rollouts)
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in model.parameters())
    with pytest.raises(ValueError, match="rewards for"):
        stage_for(tokenizer, lambda p, c, m: [1.0]).rollout(model, [0], step=0)


def test_an_answer_that_ends_keeps_its_stop_token(tokenizer):
    model = tiny(tokenizer)
    stage = stage_for(tokenizer, starts_with("t"))
    stop = stage.sampler.stop_ids[0]
    model.lm_head.register_forward_hook(lambda module, args, logits: logits.index_add(
        -1, torch.tensor([stop]), torch.full((*logits.shape[:-1], 1), 50.0)))  # the stop token comes first
    answers = stage.sample(model, [0, 1], step=0)
    assert all(a[-1] == stop and len(a) <= 2 for a in answers)  # the stop token is trained with the answer
    rows = stage.sampler.rows([0] * 16, answers)
    assert not rows.truncated.any() and rows.mask.sum(1).tolist() == [len(a) for a in answers]
