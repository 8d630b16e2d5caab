"""`lmforge ppo`: RLHF with PPO, rewarded by a reward model or a rule, kept near the reference by a KL penalty.

    lmforge ppo --model runs/speedrun/sft/model --reward runs/rm/model --prompts prompts.jsonl
    lmforge ppo --kinds max --out-dir runs/ppo          # the built-in tasks' checker as the reward

The policy gets a value head on its own backbone (``head="lm+value"``, starting at zero); with LoRA
(the default) the adapters are shared by the policy and the value head, the head itself trains in
full, and the reference is the policy with its adapters switched off. Prompts and rewards are read
as every RL command reads them (:mod:`lmforge.rl`). The stage is :class:`lmforge.train.ppo.PPOStage`
on the one training loop; checkpoints fall at the start of a rollout cycle so ``--resume`` continues
exactly. Writes ``model/`` (the policy, its value head dropped, adapters merged), ``adapter/`` (LoRA,
PEFT layout), ``checkpoint/`` (resume, with the value head), ``metrics.jsonl``, ``loss.png``,
``rewards.png`` and ``summary.json``; on the built-in tasks the held-out accuracy before and after.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.eval.tasks import accuracy_gain
from lmforge.files import holds_output, write_json_atomic
from lmforge.model.heads import with_head
from lmforge.peft.method import finish_weights, prepare_weights
from lmforge.rl import RLConfig, rl_setup
from lmforge.settings import field, to_dict
from lmforge.train import TrainConfig, fit
from lmforge.train.metrics import plot_curves
from lmforge.train.ppo import PPOStage


@dataclass
class PPOConfig(RLConfig):
    """PPO's own settings (TRL's PPOTrainer defaults), beside the policy, prompts and reward every RL command
    shares."""

    kl_coef: float = field(0.05, "weight of the per-token KL penalty to the reference, paid in the reward")
    gamma: float = field(1.0, "discount of later rewards")
    lam: float = field(0.95, "GAE's lambda: 1 trusts the sampled rewards, 0 the value head")
    epsilon: float = field(0.2, "clipping range of the policy ratio")
    value_clip: float = field(0.2, "clipping range of the value head's update")
    vf_coef: float = field(0.1, "weight of the value loss")
    ppo_epochs: int = field(4, "optimizer passes over each batch of rollouts")
    minibatches: int = field(1, "optimizer steps per pass, each on a share of the rollouts")
    missing_eos_penalty: float = field(0.0, "taken off the score of an answer that hit max_new_tokens unfinished")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ppo_epochs < 1 or self.minibatches < 1:
            raise ValueError(f"ppo_epochs and minibatches must be at least 1, got {self.ppo_epochs} and "
                             f"{self.minibatches}")
        if not 0.0 <= self.lam <= 1.0 or not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"need 0 <= lam <= 1 and 0 < gamma <= 1, got lam={self.lam}, gamma={self.gamma}")


@holds_output("train_config.out_dir")
def train_ppo(config: PPOConfig, train_config: TrainConfig, resume: bool = False) -> dict:
    """Train and write ``model/`` under ``train_config.out_dir``; returns a summary (also summary.json)."""
    setup = rl_setup(config, train_config, "PPO", needs_reference=config.kl_coef > 0)
    before = setup.accuracy(config)
    torch.manual_seed(train_config.seed)
    policy = with_head(setup.model, "lm+value")
    torch.nn.init.zeros_(policy.score.weight)  # V = 0 everywhere at the start: the first advantages are the rewards
    setup.model = policy
    stage = PPOStage(setup.prompts, setup.reward_fn, setup.tokenizer, setup.runtime, train_config.seed,
                     config.max_new_tokens, config.temperature, config.top_p, config.kl_coef, config.gamma,
                     config.lam, config.epsilon, config.value_clip, config.vf_coef, config.ppo_epochs,
                     config.minibatches, config.missing_eos_penalty, setup.reference)
    cycle = stage.cycle_steps  # a checkpoint mid-cycle could not resume: its rollouts are not saved
    train_config = dataclasses.replace(train_config, save_every=math.ceil(train_config.save_every / cycle) * cycle)
    trainable = prepare_weights(policy, config, train_config.seed)
    result = fit(policy, stage, train_config, tokenizer=setup.tokenizer, resume=resume)
    out = Path(train_config.out_dir)
    finish_weights(policy, config, out, config.model)
    setup.model = with_head(policy, "lm")
    save_checkpoint(out / "model", setup.model, setup.tokenizer)
    after = setup.accuracy(config)
    plot_curves(out / "metrics.jsonl", out / "rewards.png",
                [("objective/scores", "mean score"), ("objective/kl", "KL to the reference (per answer)"),
                 ("policy/entropy_avg", "entropy (nats/token)"), ("loss/value_avg", "value loss"),
                 ("policy/clipfrac_avg", "clipped ratios")])
    summary = {"config": to_dict(config), "prompts": len(setup.prompts), "held_out_tasks": len(setup.held_out),
               "trainable_parameters": trainable, "rollout_cycle_steps": cycle,
               "task_accuracy_before": before, "task_accuracy_after": after,
               "task_accuracy_gain": accuracy_gain(before, after) if before else None,
               "steps": result.steps, "seconds": result.seconds, "model": str(out / "model")}
    write_json_atomic(out / "summary.json", summary)
    return summary
