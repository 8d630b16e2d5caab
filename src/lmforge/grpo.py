"""`lmforge grpo`: reinforcement learning with verifiable rewards (GRPO) on the built-in tasks or your own.

    lmforge grpo --model smollm2-135m-instruct --kinds add subtract --out-dir runs/grpo
    lmforge grpo --prompts prompts.jsonl --reward my_rewards.py:score

Prompts are the built-in tasks (their checker is the reward: 1 for an answer that
:func:`lmforge.data.tasks.is_correct` accepts, else 0) or JSONL records with ``prompt`` (text) or
``messages``; every other key of a record is handed to the reward function, which a user names as
``FILE.py:FUNCTION`` or ``module:function`` and which is called as
``fn(prompts, completions, metas) -> list[float]`` (prompts as chat messages, completions as text,
metas the records). The stage is :class:`lmforge.train.grpo.GRPOStage` on the one training loop.
On the built-in tasks, held-out tasks (no shared prompt) are answered greedily before and after.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.checkpoint import load_model, load_tokenizer, save_checkpoint
from lmforge.data.tasks import KINDS, Task, is_correct, train_eval_tasks
from lmforge.errors import InputError
from lmforge.eval.tasks import accuracy_gain, model_task_accuracy
from lmforge.interop.packaged import DEFAULT_CHAT_MODEL, resolve_model
from lmforge.peft.method import MethodConfig, finish_weights, prepare_weights
from lmforge.runtime import Runtime
from lmforge.settings import field, to_dict
from lmforge.train import TrainConfig, fit
from lmforge.train.grpo import GRPO_LOSSES, GRPOStage, RewardFunction, RLPrompt
from lmforge.train.metrics import plot_curves

BUILTIN_TASKS = "builtin-tasks"
BUILTIN_REWARD = "builtin"


@dataclass
class GRPOConfig(MethodConfig):
    """What to train, on which prompts, rewarded how."""

    model: str = field(DEFAULT_CHAT_MODEL, "model to start from (and, for the KL term, the reference)")
    prompts: list[str] = field([BUILTIN_TASKS], f"prompts: .jsonl files (prompt or messages) or {BUILTIN_TASKS}")
    reward: str = field(BUILTIN_REWARD, f"{BUILTIN_REWARD} (the built-in tasks' checker) or FILE.py:FUNCTION / "
                                        "module:function, called as fn(prompts, completions, metas)")
    tasks: int = field(2000, f"how many {BUILTIN_TASKS} prompts to train on")
    kinds: list[str] = field(list(KINDS), f"built-in task kinds to use ({', '.join(KINDS)})")
    eval_tasks: int = field(200, "built-in tasks held out (no shared prompt) to measure accuracy before and after")
    group_size: int = field(8, "answers sampled per prompt (their rewards are compared within the group)")
    max_new_tokens: int = field(32, "longest sampled answer")
    temperature: float = field(1.0, "sampling temperature of the rollouts")
    top_p: float = field(1.0, "nucleus sampling of the rollouts")
    beta: float = field(0.0, "weight of the KL penalty to the reference (0: none, no reference pass)")
    epsilon: float = field(0.2, "clipping range of the policy ratio")
    loss: str = field("dapo", "dapo (each answer token counts once) or grpo (each answer's mean)")
    keep_zero_std: bool = field(False, "count groups whose answers all got the same reward in the loss's tokens")
    reference: str = field("", "reference model for the KL term (default: the starting model)")
    system: str = field("", "system prompt put before every prompt")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in GRPO_LOSSES:
            raise ValueError(f"loss={self.loss!r}; choose one of {', '.join(GRPO_LOSSES)}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown task kind(s) {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2, got {self.group_size}")


def builtin_reward(prompts: list[list[dict]], completions: list[str], metas: list[Task]) -> list[float]:
    """1.0 for each answer the task's checker accepts, else 0.0."""
    return [float(is_correct(task, text.strip())) for task, text in zip(metas, completions)]


def load_reward_function(spec: str) -> RewardFunction:
    """``builtin``, ``path/to/file.py:function`` or ``package.module:function``."""
    if spec == BUILTIN_REWARD:
        return builtin_reward
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise InputError(f"--reward {spec!r}: expected {BUILTIN_REWARD}, FILE.py:FUNCTION or module:function")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise InputError(f"--reward: no file {where}")
        loaded = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise InputError(f"--reward: cannot import {where}: {err}") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"--reward: {where} has no function {name}")
    return function


def read_prompts(path: str, system: str) -> list[RLPrompt]:
    """RL prompts from JSONL: ``prompt`` (text) or ``messages``; the whole record is the reward's meta."""
    from lmforge.tokenizer.chat import check_messages

    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: invalid JSON: {err.msg}") from err
            if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
                raise InputError(f"{where}: a record needs either 'prompt' (text) or 'messages'")
            if "prompt" in record:
                if not isinstance(record["prompt"], str) or not record["prompt"].strip():
                    raise InputError(f"{where}: 'prompt' must be non-empty text")
                messages = [{"role": "user", "content": record["prompt"]}]
            else:
                messages = check_messages(record["messages"], f"{where}: messages")
            if system and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system}, *messages]
            prompts.append(RLPrompt(messages, record))
    return prompts


def train_grpo(config: GRPOConfig, train_config: TrainConfig, resume: bool = False) -> dict:
    """Train and write ``model/`` under ``train_config.out_dir``; returns a summary (also summary.json)."""
    path = resolve_model(config.model)
    model, tokenizer = load_model(path), load_tokenizer(path)
    if model.config.head != "lm":
        raise InputError(f"{config.model} has the {model.config.head!r} head; GRPO trains a language model")
    reward_fn = load_reward_function(config.reward)
    system = config.system or None
    prompts: list[RLPrompt] = []
    held_out: list[Task] = []
    for spec in config.prompts:
        if spec == BUILTIN_TASKS:
            train, held_out = train_eval_tasks(config.tasks, config.eval_tasks, train_config.seed, config.kinds)
            prompts += [RLPrompt(task.messages(system)[:-1], task) for task in train]
        else:
            prompts += read_prompts(spec, config.system)
    if not prompts:
        raise InputError("no prompts to train on (--prompts)")
    if config.reward == BUILTIN_REWARD and not all(isinstance(p.meta, Task) for p in prompts):
        raise InputError(f"--reward {BUILTIN_REWARD} checks built-in tasks only; name a reward function for "
                         "prompts from a file")
    runtime = Runtime.resolve(train_config.device, train_config.dtype)
    reference = None
    if config.beta > 0 and (config.reference or not config.adapters):
        reference = load_model(resolve_model(config.reference) if config.reference else path).to(runtime.device)
    stage = GRPOStage(prompts, reward_fn, tokenizer, runtime, train_config.seed, config.group_size,
                      config.max_new_tokens, config.temperature, config.top_p, config.beta, config.epsilon,
                      config.loss, not config.keep_zero_std, reference)
    before = model_task_accuracy(model, tokenizer, runtime, held_out, system) if held_out else None
    trainable = prepare_weights(model, config, train_config.seed)
    result = fit(model, stage, train_config, tokenizer=tokenizer, resume=resume)
    out = Path(train_config.out_dir)
    finish_weights(model, config, out, config.model)
    save_checkpoint(out / "model", model, tokenizer)
    after = model_task_accuracy(model, tokenizer, runtime, held_out, system) if held_out else None
    plot_curves(out / "metrics.jsonl", out / "rewards.png",
                [("reward", "mean reward"), ("kl", "KL to the reference"), ("entropy", "entropy (nats/token)"),
                 ("frac_reward_zero_std", "groups with one reward")])
    summary = {"config": to_dict(config), "prompts": len(prompts), "held_out_tasks": len(held_out),
               "trainable_parameters": trainable, "task_accuracy_before": before, "task_accuracy_after": after,
               "task_accuracy_gain": accuracy_gain(before, after) if held_out else None,
               "steps": result.steps, "seconds": result.seconds, "model": str(out / "model")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return summary
