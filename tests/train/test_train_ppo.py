"""The PPO stage: GAE against a plain per-answer computation, whitening, the clipped losses by hand, the value
head, rollout cycles, and learning a reward under a KL penalty."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmforge.model import DecoderLM, preset
from lmforge.model.heads import with_head
from lmforge.peft.lora import LoraConfig, apply_lora
from lmforge.runtime import Runtime
from lmforge.tokenizer import train_tokenizer
from lmforge.train import TrainConfig, fit
from lmforge.train.ppo import PPORollouts, PPOStage, gae, whiten
from lmforge.train.rollout import RLPrompt, token_stats

CPU = Runtime.resolve("cpu", "fp32")
TEXT = "the cat sat on the mat. a dog ran to the park. one two three four five six seven eight nine ten. " * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], 300, progress=False)


def policy(tokenizer, seed=0):
    torch.manual_seed(seed)
    model = with_head(DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=128)), "lm+value")
    torch.nn.init.zeros_(model.score.weight)
    return model


def prompts(n=8):
    return [RLPrompt([{"role": "user", "content": f"say something {i}"}], i) for i in range(n)]


def has_e(prompts, completions, metas):
    return [float("e" in c) for c in completions]


def stage_for(tokenizer, reward=has_e, **kw):
    settings = dict(max_new_tokens=6, kl_coef=0.0)
    settings.update(kw)
    return PPOStage(prompts(), reward, tokenizer, CPU, seed=0, **settings)


def test_gae_equals_the_recursion_run_answer_by_answer():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 9), torch.randn(3, 9)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 2:9], mask[1, 4:6], mask[2, 8] = True, True, True
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(3):
        span = mask[row].nonzero().flatten().tolist()
        following, expected = 0.0, {}
        for i, t in enumerate(reversed(span)):
            next_value = values[row, span[len(span) - i]].item() if i else 0.0  # 0 after the last token
            delta = rewards[row, t].item() + gamma * next_value - values[row, t].item()
            following = delta + gamma * lam * following
            expected[t] = following
        for t in range(9):
            want = expected.get(t, 0.0)
            assert advantages[row, t].item() == pytest.approx(want, abs=1e-5)
            assert returns[row, t].item() == pytest.approx(want + values[row, t].item() if t in expected else 0.0,
                                                           abs=1e-5)
    # one token, gamma = lam = 1: the advantage is the reward minus the value
    one, _ = gae(torch.tensor([[0.0, 2.0]]), torch.tensor([[5.0, 0.5]]), torch.tensor([[False, True]]), 1.0, 1.0)
    assert one.tolist() == [[0.0, 1.5]]


def test_whiten_over_the_mask_only():
    x = torch.tensor([[100.0, 1.0, 2.0, 3.0], [-50.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[False, True, True, True], [False, True, True, True]])
    out = whiten(x, mask)
    assert out[mask].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out[mask].var().item() == pytest.approx(1.0, abs=1e-5)
    assert out[~mask].tolist() == [0.0, 0.0]


def test_values_are_the_value_head_before_each_answer_token(tokenizer):
    model = policy(tokenizer)
    torch.nn.init.normal_(model.score.weight)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 4:10], mask[1, 7:] = True, True
    stats = token_stats(model, ids, mask, values=True)
    everywhere = model.score(model(ids, return_hidden=True)).squeeze(-1)
    torch.testing.assert_close(stats.values[:, 1:][mask[:, 1:]], everywhere[:, :-1][mask[:, 1:]])
    assert bool((stats.values[~mask] == 0).all())
    logits = model(ids)  # head lm+value: forward still gives next-token logits
    assert logits.shape == (2, 12, tokenizer.vocab_size)
    with pytest.raises(ValueError, match="value head"):
        token_stats(DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size)), ids, mask, values=True)


def test_the_clipped_losses_by_hand(tokenizer):
    model = policy(tokenizer)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    stage = stage_for(tokenizer, epsilon=0.2, value_clip=0.1, vf_coef=0.5)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3:], mask[1, 6:9] = True, True
    with torch.no_grad():
        logps, _, values = token_stats(model, ids, mask, values=True)
    shift = torch.where(mask, torch.linspace(-0.6, 0.6, 20).view(2, 10), 0.0)  # ratios on both sides of the clip
    advantages = torch.where(mask, torch.randn(2, 10), 0.0)
    returns = torch.where(mask, values + torch.randn(2, 10), 0.0)
    old = PPORollouts(ids, mask, logps - shift, values + 0.3 * mask, advantages, returns)
    loss, figures = stage.ppo_loss(model, old)
    ratio = torch.exp(shift)[mask]
    a = advantages[mask]
    expected_policy = torch.max(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean()
    old_v, v, r = old.values[mask], values[mask], returns[mask]
    v_clipped = old_v + (v - old_v).clamp(-0.1, 0.1)
    expected_value = 0.5 * torch.max((v - r) ** 2, (v_clipped - r) ** 2).mean()
    torch.testing.assert_close(loss, expected_policy + 0.5 * expected_value, rtol=1e-5, atol=1e-5)
    assert figures["loss/value_avg"] == pytest.approx(expected_value.item(), rel=1e-5)
    clipped = ((ratio > 1.2) & (a > 0)) | ((ratio < 0.8) & (a < 0))  # where the clipped term is the larger loss
    assert figures["policy/clipfrac_avg"] == pytest.approx(clipped.float().mean().item(), abs=1e-6)
    assert 0 < figures["policy/clipfrac_avg"] < 1
    value_clipped = ((v_clipped - r) ** 2 > (v - r) ** 2).float().mean().item()
    assert figures["val/clipfrac_avg"] == pytest.approx(value_clipped, abs=1e-6) and 0 < value_clipped < 1


def test_a_fresh_rollout_trains_at_ratio_one(tokenizer):
    model = policy(tokenizer)
    stage = stage_for(tokenizer)
    rollouts = stage.rollout(model, [0, 1, 2, 3], cycle=0)
    assert rollouts.advantages[rollouts.mask].mean().item() == pytest.approx(0.0, abs=1e-5)
    _, figures = stage.ppo_loss(model, rollouts)
    assert figures["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert figures["policy/clipfrac_avg"] == 0.0 and figures["policy/approxkl_avg"] < 1e-9
    # a zero value head: the returns are the rewards to go, the score at the answer's last token
    logged = stage.pop_metrics()
    assert {"objective/scores", "objective/rlhf_reward", "objective/entropy", "completions/mean_length"} <= set(logged)
    assert "objective/kl" not in logged  # kl_coef 0: no reference pass


def test_a_cycle_samples_once_and_shuffles_each_epoch(tokenizer):
    stage = stage_for(tokenizer, ppo_epochs=2, minibatches=2)
    steps = [stage.batch(step, 0, 3, 3, torch.device("cpu")) for step in range(8)]
    assert [b["fresh"] for b in steps] == [True, False, False, False] * 2
    assert all(b["prompts"] == steps[0]["prompts"] for b in steps[:4]) and steps[4]["prompts"] != steps[0]["prompts"]
    for epoch in (steps[0:2], steps[2:4]):  # each epoch's minibatches cover the cycle's answers once
        assert sorted(epoch[0]["rows"] + epoch[1]["rows"]) == list(range(6))
    assert steps[0]["rows"] != steps[2]["rows"]
    with pytest.raises(RuntimeError, match="start of a cycle"):
        stage.loss(policy(tokenizer), steps[1])  # mid-cycle with no rollouts kept (a bad resume)


def test_ppo_raises_the_reward_and_logs_trl_figures(tokenizer, tmp_path):
    model = policy(tokenizer)
    stage = stage_for(tokenizer, kl_coef=0.02, ppo_epochs=2, reference=copy.deepcopy(model))
    everyone = list(range(8))
    answers = stage.sampler.sample(model, everyone, 999, 4)
    start = stage.sampler.rewards(stage.reward_fn, [p for p in everyone for _ in range(4)],
                                  [stage.sampler.text(a) for a in answers]).mean().item()
    config = TrainConfig(out_dir=str(tmp_path), batch_size=16, seq_len=16, max_steps=30, lr=2e-2, warmup_steps=0,
                         eval_every=0, save_every=1000, log_every=2, device="cpu", dtype="fp32", progress=False)
    fit(model, stage, config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert {"objective/scores", "objective/kl", "objective/entropy", "objective/non_score_reward",
            "objective/rlhf_reward", "policy/clipfrac_avg", "policy/approxkl_avg", "policy/entropy_avg",
            "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "completions/mean_length"} <= set(train[-1])
    assert train[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollouts: policy = reference
    assert train[-1]["objective/kl"] > 0.5 and train[-1]["policy/entropy_avg"] < train[0]["policy/entropy_avg"]
    assert max(r["policy/clipfrac_avg"] for r in train) > 0.05  # the second pass over a batch meets the clip
    late = sum(r["objective/scores"] for r in train[-3:]) / 3
    assert late > start + 0.4, (start, late)


def test_with_lora_the_reference_is_the_policy_without_adapters(tokenizer, tmp_path):
    model = apply_lora(policy(tokenizer), LoraConfig(rank=4))
    stage = stage_for(tokenizer, kl_coef=0.1)
    stage.rollout(model, [0, 1], cycle=0)
    assert stage.pop_metrics()["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # adapters at zero
    config = TrainConfig(out_dir=str(tmp_path), batch_size=4, seq_len=16, max_steps=6, lr=3e-2, warmup_steps=0,
                         eval_every=0, save_every=1000, log_every=1000, device="cpu", dtype="fp32", progress=False)
    fit(model, stage, config)
    stage.pop_metrics()
    stage.rollout(model, [0, 1], cycle=0)
    assert abs(stage.pop_metrics()["objective/kl"]) > 1e-3
