"""Proximal policy optimization (PPO) for RLHF as a stage of the one loop: rollouts, a value head, GAE.

RLHF (Stiennon et al., 2020; Ouyang et al., 2022) optimizes a chat model against a reward while a
per-token KL penalty keeps it near the reference model it started from. For each prompt the policy
samples one answer; the answer gets a score (a reward model's, or a rule's) and every answer token
pays for straying from the reference:

    r_t = −β·(log π(y_t) − log π_ref(y_t))          (+ the score, on the answer's last token)

A value head on the policy's own backbone (``head="lm+value"``) estimates, at each position, the
reward still to come. Generalized advantage estimation (Schulman et al., 2016) turns rewards and
values into advantages, from the last token backwards:

    δ_t = r_t + γ·V_{t+1} − V_t,     A_t = δ_t + γ·λ·A_{t+1},     returns R_t = A_t + V_t

then the advantages are whitened over the batch. PPO (Schulman et al., 2017) reuses each batch of
rollouts for several optimizer steps (``ppo_epochs`` passes, each in ``minibatches`` parts). As the
policy moves away from the one that sampled (π_old), the ratio ρ_t = π(y_t) / π_old(y_t) is clipped so
no step goes far:

    policy loss = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))
    value loss  = ½·mean_t max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, ±ε_v) − R_t)²)
    loss        = policy loss + c_v·value loss

How it fits the loop: one loop step is one optimizer step on one minibatch, and a *rollout cycle*
is ``ppo_epochs × minibatches`` steps. At a cycle's first step each micro-batch slot samples its
answers for the whole cycle from the current weights and keeps them (with their old log-probabilities,
values, advantages and returns); the cycle's later steps train on shuffled shares of them. A
checkpoint must fall at a cycle's start for a resumed run to continue exactly (``lmforge ppo`` sees
to it). Metrics carry TRL's ``PPOTrainer`` names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmforge.runtime import Runtime
from lmforge.train.metrics import RecordsFigures
from lmforge.train.rollout import RewardFunction, RLPrompt, RolloutSampler, reference_logps, token_stats
from lmforge.train.sft import epoch_rows


@dataclass
class PPORollouts:
    """Answers sampled by π_old and what was computed about them then, one row per answer (N, T)."""

    ids: torch.Tensor  # prompt then answer, right-padded
    mask: torch.Tensor  # true on the answer's tokens
    logps: torch.Tensor  # log π_old of each answer token
    values: torch.Tensor  # V_old before each answer token
    advantages: torch.Tensor  # whitened GAE advantages
    returns: torch.Tensor  # advantages + values, before whitening: the value head's target

    def select(self, rows: list[int]) -> PPORollouts:
        index = torch.tensor(rows, device=self.ids.device)
        return PPORollouts(*(getattr(self, name).index_select(0, index) for name in self.__dataclass_fields__))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) (N, T) of per-token ``rewards`` and ``values`` over each row's answer (the
    contiguous run where ``mask`` is true); after the answer's last token the value is 0 (the episode ends)."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        on = mask[:, t]
        advantages[:, t] = torch.where(on, advantage, 0.0)
        next_value = torch.where(on, values[:, t], next_value)
        next_advantage = torch.where(on, advantage, next_advantage)
    return advantages, torch.where(mask, advantages + values, 0.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x`` shifted and scaled to mean 0 and variance 1 over the masked entries (unbiased variance, as
    TRL); 0 elsewhere."""
    values = x[mask]
    if values.numel() < 2:
        return torch.where(mask, x - values.mean() if values.numel() else x, 0.0)
    return torch.where(mask, (x - values.mean()) * torch.rsqrt(values.var() + eps), 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.float()
    return (x * weights).sum() / weights.sum().clamp(min=1)


class PPOStage(RecordsFigures):
    """PPO for :func:`lmforge.train.fit` on a policy with a value head (``head="lm+value"``).

    Each loop step trains on ``batch_size`` answers per micro-batch; a cycle samples
    ``minibatches × batch_size`` prompts per micro-batch, one answer each. ``reference``: a frozen
    model for the KL penalty; ``None`` means the policy with its LoRA adapters off.
    """

    def __init__(self, prompts: list[RLPrompt], reward_fn: RewardFunction, tokenizer, runtime: Runtime, seed: int,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, kl_coef: float = 0.05,
                 gamma: float = 1.0, lam: float = 0.95, epsilon: float = 0.2, value_clip: float = 0.2,
                 vf_coef: float = 0.1, ppo_epochs: int = 4, minibatches: int = 1, missing_eos_penalty: float = 0.0,
                 reference: nn.Module | None = None, max_batch_size: int = 32):
        if ppo_epochs < 1 or minibatches < 1:
            raise ValueError(f"ppo_epochs and minibatches must be at least 1, got {ppo_epochs} and {minibatches}")
        self.sampler = RolloutSampler(prompts, tokenizer, runtime, seed, max_new_tokens, temperature, top_p,
                                      max_batch_size)
        self.prompts, self.reward_fn, self.seed = prompts, reward_fn, seed
        self.kl_coef, self.gamma, self.lam, self.epsilon = kl_coef, gamma, lam, epsilon
        self.value_clip, self.vf_coef, self.missing_eos_penalty = value_clip, vf_coef, missing_eos_penalty
        self.ppo_epochs, self.minibatches = ppo_epochs, minibatches
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)
        self._kept: dict[int, tuple[int, PPORollouts]] = {}  # micro-batch slot -> (cycle, its rollouts)

    @property
    def cycle_steps(self) -> int:
        """Loop steps (optimizer steps) per batch of rollouts."""
        return self.ppo_epochs * self.minibatches

    # ---- the loop's contract ------------------------------------------------------------------

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        """The cycle's prompts for this micro-batch slot (sampled at the cycle's first step) and which of
        their answers this step trains on (a fresh shuffle each epoch)."""
        cycle, within = divmod(step, self.cycle_steps)
        epoch, part = divmod(within, self.minibatches)
        k = self.minibatches
        prompts = epoch_rows(self.seed, len(self.prompts), cycle, first * k, size * k, global_size * k).tolist()
        order = np.random.default_rng([self.seed, cycle, epoch, first]).permutation(size * k)
        return {"cycle": cycle, "first": first, "fresh": within == 0, "prompts": prompts,
                "rows": order[part * size:(part + 1) * size].tolist()}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        cycle, first = batch["cycle"], batch["first"]
        if batch["fresh"]:
            self._kept[first] = (cycle, self.rollout(model, batch["prompts"], cycle))
        kept = self._kept.get(first)
        if kept is None or kept[0] != cycle:
            raise RuntimeError(f"the rollouts of PPO cycle {cycle} are gone: a run resumes at the start of a "
                               f"cycle (save every multiple of ppo_epochs x minibatches = {self.cycle_steps} steps)")
        loss, figures = self.ppo_loss(model, kept[1].select(batch["rows"]))
        self.record(figures)
        return loss

    def evaluate(self, model: nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        return {}

    # ---- rollouts -----------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, model: nn.Module, prompt_indices: list[int], cycle: int) -> PPORollouts:
        """Sample one answer per prompt, score it, and compute old log-probabilities, values, KL-shaped
        per-token rewards, advantages and returns."""
        answers = self.sampler.sample(model, prompt_indices, cycle, 1)
        rows = self.sampler.rows(prompt_indices, answers)
        device = rows.ids.device
        scores = self.sampler.rewards(self.reward_fn, prompt_indices, rows.texts).to(device)
        if self.missing_eos_penalty:
            scores = scores - self.missing_eos_penalty * rows.truncated.to(device).float()
        was_training = model.training
        model.eval()
        try:
            logps, entropy, values = token_stats(model, rows.ids, rows.mask, values=True)
            kl = torch.zeros_like(logps)
            if self.kl_coef > 0:
                kl = torch.where(rows.mask, logps - reference_logps(model, self.reference, rows.ids, rows.mask), 0.0)
        finally:
            model.train(was_training)
        non_score = -self.kl_coef * kl
        rewards = non_score.clone()
        last = (rows.mask * torch.arange(rows.mask.shape[1], device=device)).argmax(1)  # each answer's last token
        rewards[torch.arange(len(answers), device=device), last] += scores
        advantages, returns = gae(rewards, values, rows.mask, self.gamma, self.lam)
        answer = rows.mask.float()
        figures = {
            "objective/scores": scores.mean().item(),
            "objective/non_score_reward": non_score.sum(1).mean().item(),
            "objective/rlhf_reward": (scores + non_score.sum(1)).mean().item(),
            "objective/entropy": (entropy * answer).sum(1).mean().item(),
            "completions/mean_length": rows.lengths.float().mean().item(),
            "completions/clipped_ratio": rows.truncated.float().mean().item(),
        }
        if self.kl_coef > 0:  # no reference pass without the penalty, so no KL to report
            figures["objective/kl"] = kl.sum(1).mean().item()
        self.record(figures)
        return PPORollouts(rows.ids, rows.mask, logps, values, whiten(advantages, rows.mask), returns)

    # ---- the loss -----------------------------------------------------------------------------

    def ppo_loss(self, model: nn.Module, old: PPORollouts) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped policy loss plus ``vf_coef`` times the clipped value loss, over the answers' tokens."""
        logps, entropy, values = token_stats(model, old.ids, old.mask, values=True)
        mask = old.mask
        log_ratio = logps - old.logps
        ratio = torch.exp(log_ratio)
        unclipped = -old.advantages * ratio
        clipped = -old.advantages * torch.clamp(ratio, 1 - self.epsilon, 1 + self.epsilon)
        policy_loss = masked_mean(torch.max(unclipped, clipped), mask)
        values_clipped = old.values + torch.clamp(values - old.values, -self.value_clip, self.value_clip)
        value_losses = (values - old.returns) ** 2
        value_losses_clipped = (values_clipped - old.returns) ** 2
        value_loss = 0.5 * masked_mean(torch.max(value_losses, value_losses_clipped), mask)
        loss = policy_loss + self.vf_coef * value_loss
        with torch.no_grad():
            figures = {
                "loss/policy_avg": policy_loss.item(),
                "loss/value_avg": value_loss.item(),
                "policy/approxkl_avg": masked_mean(0.5 * log_ratio ** 2, mask).item(),
                "policy/clipfrac_avg": masked_mean((clipped > unclipped).float(), mask).item(),
                "policy/entropy_avg": masked_mean(entropy, mask).item(),
                "val/clipfrac_avg": masked_mean((value_losses_clipped > value_losses).float(), mask).item(),
                "val/ratio": masked_mean(ratio, mask).item(),
            }
        return loss, figures
