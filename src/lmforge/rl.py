"""What the reinforcement-learning commands (``lmforge grpo``, ``lmforge ppo``) share: the prompts, the
reward, the sampling settings, and the held-out accuracy before and after.

Prompts are the built-in tasks or JSONL records with ``prompt`` (text) or ``messages``; every other
key of a record is handed to the reward. The reward (``--reward``) is one of

* ``builtin``: the built-in tasks' checker, 1 for an answer :func:`lmforge.data.tasks.is_correct`
  accepts, else 0;
* ``FILE.py:FUNCTION`` or ``module:function``: a user's function, called as
  ``fn(prompts, completions, metas) -> list[float]`` (prompts as chat messages, completions as text,
  metas the records);
* a reward model (a directory written by ``lmforge rm``): its score of the conversation with the
  answer appended, read at the last token (:class:`RewardModelScorer`).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.checkpoint import is_checkpoint, load_model, load_tokenizer
from lmforge.data.jsonl import iter_records
from lmforge.data.tasks import KINDS, Task, is_correct, train_eval_tasks
from lmforge.errors import InputError
from lmforge.eval.tasks import model_task_accuracy
from lmforge.finetune import BUILTIN_TASKS
from lmforge.interop.packaged import DEFAULT_CHAT_MODEL, resolve_model
from lmforge.model.heads import last_token_scores
from lmforge.peft.method import MethodConfig
from lmforge.runtime import Runtime
from lmforge.settings import field
from lmforge.train import TrainConfig
from lmforge.train.rollout import RewardFunction, RLPrompt

BUILTIN_REWARD = "builtin"


@dataclass
class RLConfig(MethodConfig):
    """The policy, its prompts, how its answers are sampled, and how they are rewarded."""

    model: str = field(DEFAULT_CHAT_MODEL, "model to start from (and, for the KL term, the reference)")
    prompts: list[str] = field([BUILTIN_TASKS], f"prompts: .jsonl files (prompt or messages) or {BUILTIN_TASKS}")
    reward: str = field(BUILTIN_REWARD, f"{BUILTIN_REWARD} (the built-in tasks' checker), FILE.py:FUNCTION / "
                                        "module:function called as fn(prompts, completions, metas), or a reward "
                                        "model's directory (`lmforge rm`)")
    tasks: int = field(2000, f"how many {BUILTIN_TASKS} prompts to train on")
    kinds: list[str] = field(list(KINDS), f"built-in task kinds to use ({', '.join(KINDS)})")
    eval_tasks: int = field(200, "built-in tasks held out (no shared prompt) to measure accuracy before and after")
    max_new_tokens: int = field(32, "longest sampled answer")
    temperature: float = field(1.0, "sampling temperature of the rollouts")
    top_p: float = field(1.0, "nucleus sampling of the rollouts")
    reference: str = field("", "reference model for the KL term (default: the starting model)")
    system: str = field("", "system prompt put before every prompt")

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown task kind(s) {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")


def builtin_reward(prompts: list[list[dict]], completions: list[str], metas: list[Task]) -> list[float]:
    """1.0 for each answer the task's checker accepts, else 0.0."""
    return [float(is_correct(task, text.strip())) for task, text in zip(metas, completions)]


class RewardModelScorer:
    """A reward model as a reward function: each conversation with its answer, scored at its last token."""

    def __init__(self, path: str | Path, runtime: Runtime, batch_size: int = 16):
        self.model, self.tokenizer = load_model(path).to(runtime.device), load_tokenizer(path)
        if self.model.config.head != "score":
            raise InputError(f"--reward {path}: a language model (head {self.model.config.head!r}), not a reward "
                             "model; train one with `lmforge rm`")
        self.model.eval().requires_grad_(False)
        self.runtime, self.batch_size = runtime, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], completions: list[str], metas: list) -> list[float]:
        from lmforge.tokenizer.chat import padding_id, render_chat

        limit = self.model.config.max_seq_len
        rows = [render_chat(self.tokenizer, [*messages, {"role": "assistant", "content": answer}]).ids[-limit:]
                for messages, answer in zip(prompts, completions)]
        pad = padding_id(self.tokenizer)
        scores: list[float] = []
        for first in range(0, len(rows), self.batch_size):
            chunk = rows[first:first + self.batch_size]
            ids = torch.full((len(chunk), max(map(len, chunk))), pad, dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, :len(row)] = torch.tensor(row)
            lengths = torch.tensor([len(row) for row in chunk])
            with self.runtime.autocast():
                scores += last_token_scores(self.model, ids.to(self.runtime.device), lengths).float().tolist()
        return scores


def load_reward_function(spec: str, runtime: Runtime | None = None) -> RewardFunction:
    """``builtin``, a reward model's directory, ``path/to/file.py:function`` or ``package.module:function``."""
    if spec == BUILTIN_REWARD:
        return builtin_reward
    if is_checkpoint(spec) or (Path(spec) / "config.json").is_file():
        return RewardModelScorer(spec, runtime or Runtime.resolve("cpu", "fp32"))
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise InputError(f"--reward {spec!r}: expected {BUILTIN_REWARD}, a reward model's directory, "
                         "FILE.py:FUNCTION or module:function")
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
    for record, where in iter_records(path):
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


@dataclass
class RLSetup:
    """What an RL command starts from."""

    path: Path  # the starting model's location
    model: torch.nn.Module
    tokenizer: object
    runtime: Runtime
    prompts: list[RLPrompt]
    held_out: list[Task]
    reward_fn: RewardFunction
    reference: torch.nn.Module | None  # a frozen reference, or None (the policy with its adapters off)

    def accuracy(self, config: RLConfig) -> dict | None:
        """Greedy accuracy of the model as it is now on the held-out built-in tasks (None without them)."""
        if not self.held_out:
            return None
        return model_task_accuracy(self.model, self.tokenizer, self.runtime, self.held_out, config.system or None)


def rl_setup(config: RLConfig, train_config: TrainConfig, command: str, needs_reference: bool) -> RLSetup:
    """Load the policy, the prompts (and held-out tasks), the reward and, when the KL term needs one and the
    adapters cannot serve, a frozen reference."""
    path = resolve_model(config.model)
    model, tokenizer = load_model(path), load_tokenizer(path)
    if model.config.head != "lm":
        raise InputError(f"{config.model} has the {model.config.head!r} head; {command} trains a language model")
    runtime = Runtime.resolve(train_config.device, train_config.dtype)
    reward_fn = load_reward_function(config.reward, runtime)
    system = config.system or None
    prompts: list[RLPrompt] = []
    held_out: list[Task] = []
    for spec in config.prompts:
        if spec == BUILTIN_TASKS:
            train, held_out = train_eval_tasks(config.tasks, config.eval_tasks, train_config.seed, config.kinds)
            prompts += [RLPrompt(task.messages(system)[:-1], task) for task in train]
        else:
            prompts += read_prompts(spec, config.system)
    from lmforge.tokenizer.chat import render_chat

    room = model.config.max_seq_len - config.max_new_tokens  # a prompt must leave room for a whole answer
    fitting = [p for p in prompts if len(render_chat(tokenizer, p.messages, add_generation_prompt=True).ids) <= room]
    too_long = len(prompts) - len(fitting)
    if too_long:
        print(f"[{command.lower()}] left out {too_long} of {len(prompts)} prompts: longer than the model's context "
              f"({model.config.max_seq_len} tokens) less --max-new-tokens ({config.max_new_tokens})")
    prompts = fitting
    if not prompts:
        raise InputError("no prompts to train on (--prompts)" + (": every one is too long" if too_long else ""))
    if config.reward == BUILTIN_REWARD and not all(isinstance(p.meta, Task) for p in prompts):
        raise InputError(f"--reward {BUILTIN_REWARD} checks built-in tasks only; name a reward function or a "
                         "reward model for prompts from a file")
    reference = None
    if needs_reference and (config.reference or not config.adapters):
        reference = load_model(resolve_model(config.reference) if config.reference else path).to(runtime.device)
    return RLSetup(path, model, tokenizer, runtime, prompts, held_out, reward_fn, reference)
