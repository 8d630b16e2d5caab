"""`lmforge grpo`: reinforcement learning with verifiable rewards (GRPO) on the built-in tasks or your own.

    lmforge grpo --model smollm2-135m-instruct --kinds add subtract --out-dir runs/grpo
    lmforge grpo --prompts prompts.jsonl --reward my_rewards.py:score

Prompts and rewards are read as every RL command reads them (:mod:`lmforge.rl`): the built-in
tasks with their checker, or JSONL prompts with a user's reward function or a reward model. The
stage is :class:`lmforge.train.grpo.GRPOStage` on the one training loop.
On the built-in tasks, held-out tasks (no shared prompt) are answered greedily before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.checkpoint import save_checkpoint
from lmforge.eval.tasks import accuracy_gain
from lmforge.files import holds_output, write_json_atomic
from lmforge.peft.method import finish_weights, prepare_weights
from lmforge.rl import RLConfig, rl_setup
from lmforge.settings import field, to_dict
from lmforge.train import TrainConfig, fit
from lmforge.train.grpo import GRPO_LOSSES, GRPOStage
from lmforge.train.metrics import plot_curves


@dataclass
class GRPOConfig(RLConfig):
    """GRPO's own settings, beside the policy, prompts and reward that every RL command shares."""

    group_size: int = field(8, "answers sampled per prompt (their rewards are compared within the group)")
    beta: float = field(0.0, "weight of the KL penalty to the reference (0: none, no reference pass)")
    epsilon: float = field(0.2, "clipping range of the policy ratio")
    loss: str = field("dapo", "dapo (each answer token counts once) or grpo (each answer's mean)")
    keep_zero_std: bool = field(False, "count groups whose answers all got the same reward in the loss's tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in GRPO_LOSSES:
            raise ValueError(f"loss={self.loss!r}; choose one of {', '.join(GRPO_LOSSES)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2, got {self.group_size}")


@holds_output("train_config.out_dir")
def train_grpo(config: GRPOConfig, train_config: TrainConfig, resume: bool = False) -> dict:
    """Train and write ``model/`` under ``train_config.out_dir``; returns a summary (also summary.json)."""
    setup = rl_setup(config, train_config, "GRPO", needs_reference=config.beta > 0)
    model = setup.model
    stage = GRPOStage(setup.prompts, setup.reward_fn, setup.tokenizer, setup.runtime, train_config.seed,
                      config.group_size, config.max_new_tokens, config.temperature, config.top_p, config.beta,
                      config.epsilon, config.loss, not config.keep_zero_std, setup.reference)
    before = setup.accuracy(config)
    trainable = prepare_weights(model, config, train_config.seed)
    result = fit(model, stage, train_config, tokenizer=setup.tokenizer, resume=resume)
    out = Path(train_config.out_dir)
    finish_weights(model, config, out, config.model)
    save_checkpoint(out / "model", model, setup.tokenizer)
    after = setup.accuracy(config)
    plot_curves(out / "metrics.jsonl", out / "rewards.png",
                [("reward", "mean reward"), ("kl", "KL to the reference"), ("entropy", "entropy (nats/token)"),
                 ("frac_reward_zero_std", "groups with one reward")])
    summary = {"config": to_dict(config), "prompts": len(setup.prompts), "held_out_tasks": len(setup.held_out),
               "trainable_parameters": trainable, "task_accuracy_before": before, "task_accuracy_after": after,
               "task_accuracy_gain": accuracy_gain(before, after) if before else None,
               "steps": result.steps, "seconds": result.seconds, "model": str(out / "model")}
    write_json_atomic(out / "summary.json", summary)
    return summary
