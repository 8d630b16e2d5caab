"""Group relative policy optimization (GRPO) as a stage of the one loop: rollouts, rewards, group advantages.

GRPO (Shao et al., 2024, "DeepSeekMath") is reinforcement learning without a value model. For each
prompt the policy samples a group of G answers; a reward function scores each (here a checker:
1 if the answer is right, else 0); an answer's advantage is its reward against its group's,
``A = (r − mean(r_group)) / (std(r_group) + 1e-4)``. The loss raises the log-probability of every
token of an answer in proportion to its advantage:

    loss_t = −min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε)·A) + β·KL_t,   ρ_t = π(y_t) / π_old(y_t)

With one gradient step per batch of rollouts (as here, and TRL's default) ``π_old`` is the policy
itself, so ``ρ = 1`` and the loss is the policy gradient ``−A·log π(y_t)``; the clipped form is
kept so the code reads as the method. ``KL_t = exp(r) − r − 1`` with ``r = log π_ref(y_t) − log π(y_t)``
(Schulman's k3 estimator) keeps the policy near the reference when ``β > 0``. A group whose
answers all got the same reward has no advantage anywhere: it teaches nothing, and by default it
is left out of the loss's token count (``frac_reward_zero_std`` says how many there were).

Losses are normalised as TRL's ``loss_type``: ``dapo`` (every answer token of the batch counts
once) or ``grpo`` (each answer's mean, then the mean over answers).

Rollouts are sampled by :class:`lmforge.train.rollout.RolloutSampler` on the batched engine, from the
current weights, with a seed per answer: a resumed run samples the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.runtime import Runtime
from lmforge.train.metrics import RecordsFigures
from lmforge.train.rollout import RewardFunction, RLPrompt, RolloutSampler, reference_logps, token_stats
from lmforge.train.sft import epoch_rows

__all__ = ["GRPO_LOSSES", "GRPOStage", "RLPrompt", "Rollouts", "group_advantages"]

GRPO_LOSSES = ("dapo", "grpo")


@dataclass
class Rollouts:
    """Sampled answers of one micro-batch: rows of prompt + answer, and what was learned about them."""

    ids: torch.Tensor  # (N, T) prompt then answer, right-padded
    mask: torch.Tensor  # (N, T) true on the answer's tokens
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    counted: torch.Tensor  # (N,) true where the answer's group has a learning signal (or all, without skipping)
    lengths: torch.Tensor  # (N,) answer tokens
    truncated: torch.Tensor  # (N,) the answer hit max_new_tokens


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, group std) for rewards (P, G): each reward against its group's mean, over its
    group's standard deviation (unbiased, as TRL). A group of one has std 0."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps), std.squeeze(1)


class GRPOStage(RecordsFigures):
    """GRPO for :func:`lmforge.train.fit`: a micro-batch of ``batch_size`` prompts, ``group_size`` answers each.

    ``reference``: a frozen model for the KL term; ``None`` means the policy with its LoRA adapters
    off (needed only when ``beta > 0``).
    """

    def __init__(self, prompts: list[RLPrompt], reward_fn: RewardFunction, tokenizer, runtime: Runtime, seed: int,
                 group_size: int = 8, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 beta: float = 0.0, epsilon: float = 0.2, loss_type: str = "dapo", skip_zero_std: bool = True,
                 reference: nn.Module | None = None, max_batch_size: int = 32):
        if group_size < 2:
            raise ValueError(f"group_size must be at least 2 (advantages compare answers), got {group_size}")
        if loss_type not in GRPO_LOSSES:
            raise ValueError(f"loss_type must be one of {', '.join(GRPO_LOSSES)}, got {loss_type!r}")
        self.sampler = RolloutSampler(prompts, tokenizer, runtime, seed, max_new_tokens, temperature, top_p,
                                      max_batch_size)
        self.prompts, self.reward_fn, self.seed, self.group_size = prompts, reward_fn, seed, group_size
        self.beta, self.epsilon, self.loss_type, self.skip_zero_std = beta, epsilon, loss_type, skip_zero_std
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)

    # ---- the loop's contract ------------------------------------------------------------------

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        """Which prompts (indices) this micro-batch samples for, and the step (for the sampling seeds)."""
        return {"prompts": epoch_rows(self.seed, len(self.prompts), step, first, size, global_size).tolist(),
                "step": step}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        rollouts = self.rollout(model, batch["prompts"], batch["step"])
        loss, figures = self.policy_loss(model, rollouts)
        self.record(figures)
        return loss

    def evaluate(self, model: nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        return {}

    # ---- rollouts -----------------------------------------------------------------------------

    def sample(self, model: nn.Module, prompt_indices: list[int], step: int) -> list[list[int]]:
        """``group_size`` sampled answers (token ids) for each prompt, grouped prompt by prompt."""
        return self.sampler.sample(model, prompt_indices, step, self.group_size)

    def rollout(self, model: nn.Module, prompt_indices: list[int], step: int) -> Rollouts:
        answers = self.sample(model, prompt_indices, step)
        prompt_of = [p for p in prompt_indices for _ in range(self.group_size)]
        rows = self.sampler.rows(prompt_of, answers)
        rewards = self.sampler.rewards(self.reward_fn, prompt_of, rows.texts)
        advantages, std = group_advantages(rewards.view(len(prompt_indices), self.group_size))
        zero = torch.isclose(std, torch.zeros_like(std))
        counted = (~zero if self.skip_zero_std else torch.ones_like(zero)).repeat_interleave(self.group_size)
        self.record({"frac_reward_zero_std": zero.float().mean().item()})
        device = self.sampler.runtime.device
        return Rollouts(rows.ids, rows.mask, rewards.to(device), advantages.flatten().to(device), counted.to(device),
                        rows.lengths, rows.truncated)

    # ---- the loss -----------------------------------------------------------------------------

    def policy_loss(self, model: nn.Module, rollouts: Rollouts) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped policy-gradient loss (plus β·KL) over the counted answers' tokens, and the figures."""
        mask = rollouts.mask & rollouts.counted[:, None]
        logps, entropy, _ = token_stats(model, rollouts.ids, rollouts.mask)
        ratio = torch.exp(logps - logps.detach())  # π / π_old: 1 in value with one step per rollout batch
        advantages = rollouts.advantages[:, None]
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + self.epsilon)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        kl = torch.zeros_like(per_token)
        if self.beta > 0:
            log_ratio = reference_logps(model, self.reference, rollouts.ids, rollouts.mask) - logps
            kl = torch.exp(log_ratio) - log_ratio - 1
            per_token = per_token + self.beta * kl
        weights = mask.float()
        if self.loss_type == "dapo":
            loss = (per_token * weights).sum() / weights.sum().clamp(min=1)
        else:
            per_answer = (per_token * weights).sum(1) / weights.sum(1).clamp(min=1)
            loss = per_answer.sum() / rollouts.counted.sum().clamp(min=1)
        answer = rollouts.mask.float()
        tokens = answer.sum().clamp(min=1)
        rewards = rollouts.rewards.float()
        figures = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "entropy": ((entropy * answer).sum() / tokens).item(),
            "clip_ratio": (((ratio.detach() - clipped.detach()).abs() > 0).float() * answer).sum().item() / tokens.item(),
            "completions/mean_length": rollouts.lengths.float().mean().item(),
            "completions/min_length": rollouts.lengths.min().item(),
            "completions/max_length": rollouts.lengths.max().item(),
            "completions/clipped_ratio": rollouts.truncated.float().mean().item(),
        }
        if self.beta > 0:  # without the KL term there is no reference pass, so nothing to report (as TRL)
            figures["kl"] = ((kl.detach() * answer).sum() / tokens).item()
        return loss, figures
