"""What the on-policy stages (GRPO, PPO) share: prompts, sampling answers on the batched engine, rewards,
and the log-probability of each answer token under a model.

:class:`RolloutSampler` renders each prompt once, then samples answers from the current weights
with the batched engine (:mod:`lmforge.infer.engine`), a fresh engine each time (its prefix cache
must not outlive the weights it was computed with), so answers to one prompt share its computed
prefix. A policy with LoRA adapters (or fp32 weights under a bf16 runtime) is sampled from a plain
copy of its current weights in the compute dtype (:func:`lmforge.peft.lora.merged_copy`), as TRL
hands its weights to vLLM: the adapters' extra matmuls and autocast's per-step weight casts are gone. Each answer is sampled with its own seed drawn from (seed, step, prompt, sample): the same
answers whatever else shares the batch, and a resumed run samples the same answers.

:func:`token_stats` runs a batch of prompt + answer rows through the model once and reads, at the
answer's tokens only, the log-probability, the entropy of the distribution, and (for a policy with
a value head, ``head="lm+value"``) the value; only those positions go through the output layer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.peft.lora import adapters_disabled, lora_layers, merged_copy
from lmforge.runtime import Runtime
from lmforge.tokenizer.chat import end_of_turn_ids, padding_id, render_chat
from lmforge.train.preference import label_logps

# (prompts as chat messages, completions as text, each prompt's metadata) -> one reward per completion
RewardFunction = Callable[[list[list[dict]], list[str], list[Any]], Sequence[float]]


@dataclass
class RLPrompt:
    """A prompt (chat messages before the answer) and what the reward function needs to judge answers."""

    messages: list[dict[str, str]]
    meta: Any = None


@dataclass
class AnswerRows:
    """Sampled answers laid out for a forward pass: prompt then answer, right-padded."""

    ids: torch.Tensor  # (N, T)
    mask: torch.Tensor  # (N, T) true on the answer's tokens
    lengths: torch.Tensor  # (N,) answer tokens (the end-of-turn token included when sampled)
    truncated: torch.Tensor  # (N,) the answer was cut (max_new_tokens, or the context's end) before it ended
    texts: list[str]  # the answers as text, end-of-turn tokens left out


class TokenStats(NamedTuple):
    """Per-token figures (B, T), zero outside the mask: token t's log-probability and the entropy of the
    distribution it was drawn from (read at position t − 1), and the value there (``None`` unless asked)."""

    logps: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None


def token_stats(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, values: bool = False) -> TokenStats:
    """:class:`TokenStats` of the masked tokens of ``ids`` (B, T) (``mask[:, 0]`` is ignored: token 0 has no
    prediction). ``values=True`` reads the value head (``model.score``) at the same positions: the value of
    the state from which token t is chosen."""
    hidden = model(ids, return_hidden=True)
    rows, cols = mask[:, 1:].nonzero(as_tuple=True)
    base = getattr(model, "module", model)
    states = hidden[rows, cols]
    logits = base.lm_head(states).float()
    logps = label_logps(logits, ids[:, 1:][rows, cols])
    with torch.no_grad():
        log_probs = torch.log_softmax(logits, -1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    at = (rows, cols + 1)
    out_values = None
    if values:
        if base.score is None:
            raise ValueError("values=True needs a model with a value head (head 'lm+value')")
        out_values = torch.zeros(ids.shape, device=ids.device).index_put(at, base.score(states).float().squeeze(-1))
    return TokenStats(torch.zeros(ids.shape, device=ids.device, dtype=logps.dtype).index_put(at, logps),
                      torch.zeros(ids.shape, device=ids.device).index_put(at, entropy), out_values)


@torch.no_grad()
def reference_logps(model: nn.Module, reference: nn.Module | None, ids: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the masked tokens under the reference: a frozen model, or (``reference=None``) the
    policy with its LoRA adapters switched off."""
    if reference is not None:
        return token_stats(reference, ids, mask).logps
    if not lora_layers(model):
        raise ValueError("the KL term needs a reference: pass a frozen model, or train LoRA adapters")
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            return token_stats(model, ids, mask).logps
    finally:
        model.train(was_training)


def rollout_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:7], "big")


class RolloutSampler:
    """Answers to ``prompts`` sampled from a model's current weights, and rewards for them."""

    def __init__(self, prompts: list[RLPrompt], tokenizer, runtime: Runtime, seed: int, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, max_batch_size: int = 32):
        if not prompts:
            raise ValueError("no prompts")
        self.prompts, self.tokenizer, self.runtime, self.seed = prompts, tokenizer, runtime, seed
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.max_batch_size = max_batch_size
        self.prompt_ids = [render_chat(tokenizer, p.messages, add_generation_prompt=True).ids for p in prompts]
        eos = getattr(tokenizer, "eos_id", None)
        self.stop_ids = sorted({*end_of_turn_ids(tokenizer), *([eos] if eos is not None else [])})
        self.pad_id = padding_id(tokenizer)
        self._copy: tuple[nn.Module, nn.Module] | None = None  # (policy, its plain copy in the runtime's dtype)

    def sample(self, model: nn.Module, prompt_indices: list[int], step: int, per_prompt: int) -> list[list[int]]:
        """``per_prompt`` sampled answers (token ids) for each prompt, prompt by prompt.

        An answer that ended keeps its stop token: the policy learns when to stop as it learns what to say."""
        base = getattr(model, "module", model)
        base = getattr(base, "_orig_mod", base)
        limit = base.config.max_seq_len
        longest = max(len(self.prompt_ids[i]) for i in prompt_indices)
        if longest >= limit:
            raise ValueError(f"a prompt has {longest} tokens: no room to answer within the model's context of "
                             f"{limit} tokens")
        sampler = base
        if lora_layers(base) or next(base.parameters()).dtype != self.runtime.dtype:
            # 2.2x the tokens/s of the adapters under autocast; refreshed in place from the second time on
            cached = self._copy if self._copy is not None and self._copy[0] is base else None
            sampler = merged_copy(base, self.runtime.dtype, into=cached[1] if cached else None)
            self._copy = (base, sampler)
        engine = Engine(sampler, self.runtime, context=min(limit, longest + self.max_new_tokens),
                        max_batch_size=min(self.max_batch_size, len(prompt_indices) * per_prompt))
        requests = [Request(self.prompt_ids[p], SamplingConfig(  # answers stop at the context's end at the latest
            temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=min(self.max_new_tokens, limit - len(self.prompt_ids[p])),
            stop_token_ids=self.stop_ids, seed=rollout_seed(self.seed, step, p, g)))
            for p in prompt_indices for g in range(per_prompt)]
        with torch.no_grad():
            done = engine.generate(requests)  # the engine puts a model in training mode in eval mode meanwhile
        return [c.token_ids + ([c.stop_token_id] if c.stop_token_id is not None else []) for c in done]

    def rows(self, prompt_of: list[int], answers: list[list[int]]) -> AnswerRows:
        """Answer ``i`` (to prompt ``prompt_of[i]``) after its prompt, one row each, on the runtime's device."""
        rows = [self.prompt_ids[p] + a for p, a in zip(prompt_of, answers)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (p, row) in enumerate(zip(prompt_of, rows)):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, len(self.prompt_ids[p]):len(row)] = True
        truncated = torch.tensor([not a or a[-1] not in self.stop_ids for a in answers])
        device = self.runtime.device
        return AnswerRows(ids.to(device), mask.to(device), torch.tensor([len(a) for a in answers]), truncated,
                          [self.text(a) for a in answers])

    def rewards(self, reward_fn: RewardFunction, prompt_of: list[int], texts: list[str]) -> torch.Tensor:
        """(N,) float32: ``reward_fn`` on each answer, with its prompt's messages and metadata."""
        rewards = torch.tensor([float(r) for r in reward_fn(
            [self.prompts[p].messages for p in prompt_of], texts, [self.prompts[p].meta for p in prompt_of])],
            dtype=torch.float32)
        if rewards.shape != (len(texts),):
            raise ValueError(f"the reward function gave {tuple(rewards.shape)} rewards for {len(texts)} answers")
        return rewards

    def text(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.stop_ids]
        try:
            return self.tokenizer.decode(ids, skip_special=True)
        except TypeError:
            return self.tokenizer.decode(ids)


def sample_task_answers(model: nn.Module, tokenizer, runtime: Runtime, tasks: Sequence, samples: int, seed: int,
                        max_new_tokens: int = 32, temperature: float = 1.0, chunk: int = 8,
                        progress: bool = True) -> list[list[str]]:
    """``samples`` answers (text) of ``model`` to each built-in task's prompt, task by task, on the engine:
    what :data:`lmforge.data.preferences.SAMPLED_PREFERENCES` ranks into pairs."""
    from tqdm.auto import tqdm

    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    sampler = RolloutSampler([RLPrompt(t.messages()[:-1], t) for t in tasks], tokenizer, runtime, seed,
                             max_new_tokens, temperature)
    model.to(runtime.device)
    answers: list[list[str]] = []
    with tqdm(total=len(tasks), desc="sampling answers", unit="task", disable=not progress) as bar:
        for start in range(0, len(tasks), chunk):
            indices = list(range(start, min(start + chunk, len(tasks))))
            texts = [sampler.text(a) for a in sampler.sample(model, indices, step=0, per_prompt=samples)]
            answers += [texts[i * samples:(i + 1) * samples] for i in range(len(indices))]
            bar.update(len(indices))
    return answers


def task_sampler(model: nn.Module, tokenizer, runtime: Runtime, samples: int, seed: int,
                 progress: bool = True) -> Callable[[Sequence], list[list[str]]]:
    """:func:`sample_task_answers` of ``model`` as the ``sample_answers`` that
    :func:`lmforge.data.preferences.load_pairs` takes (it samples only when asked for sampled pairs)."""
    return lambda tasks: sample_task_answers(model, tokenizer, runtime, tasks, samples, seed, progress=progress)

