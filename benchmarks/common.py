"""Shared pieces of the benchmarks: a lmforge model and the same weights in transformers' Llama."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.interop import hf_llama_config, hf_llama_state
from lmforge.model import DecoderLM
from lmforge.runtime import Runtime, describe_machine


def machine() -> str:
    return describe_machine()


def llama_twin(model: DecoderLM):
    """A transformers LlamaForCausalLM holding a copy of ``model``'s weights (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    twin = LlamaForCausalLM(LlamaConfig(**hf_llama_config(model.config))).eval()
    twin.load_state_dict({k: v.clone() for k, v in hf_llama_state(model).items()}, strict=True)
    twin.generation_config.eos_token_id = None  # decode exactly the tokens asked for, as lmforge does
    return twin


def fast_dtypes() -> list[str]:
    """The compute dtypes worth timing here: bf16 only where the hardware runs it natively."""
    return ["fp32", "bf16"] if Runtime.resolve("auto", "auto").dtype == torch.bfloat16 else ["fp32"]


def interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, best) seconds of each named ``fn()`` over ``repeats`` rounds, every round calling each once in
    turn (the one that goes first rotates), so that a change in the machine's speed meets every side alike."""
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def training_step(model, optimizer, runtime: Runtime, loss_of):
    """One full optimizer step as a closure, the same for every side: ``loss_of()`` under the runtime's
    autocast, backward, clipping at 1, the optimizer."""
    def step():
        with runtime.autocast():
            loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def logits_loss(logits_of, targets: torch.Tensor):
    """A peer's loss as its own ``labels=`` path computes it: cross entropy over ``logits_of()`` made fp32,
    against ``targets`` (-100 skipped)."""
    return lambda: F.cross_entropy(logits_of().float().flatten(0, 1), targets.flatten())
