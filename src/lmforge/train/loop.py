"""The one training loop. A stage (pretraining, SFT, reward model, DPO ...) supplies
batches and a loss; this file owns everything else: precision, accumulation,
clipping, schedule, data parallelism, evaluation, metrics, checkpoints, resume.

A stage is a :class:`Stage`; one that has more to log than its loss (DPO's rewards and
margins, an RL stage's KL) is also a :class:`ReportingStage`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.checkpoint import (
    OPTIMIZER,
    WEIGHTS,
    is_checkpoint,
    load_weights,
    read_trainer_state,
    save_checkpoint,
)
from lmforge.errors import InputError
from lmforge.files import output_lock, recover_folder
from lmforge.model import DecoderLM, train_flops_per_token
from lmforge.runtime import Runtime, measure_matmul_peak, return_freed_memory
from lmforge.settings import to_dict
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import World, all_reduce_mean, barrier, init_world
from lmforge.train.metrics import MetricsLog, plot_losses
from lmforge.train.optim import build_optimizer, load_optimizer_tensors, optimizer_tensors
from lmforge.train.schedule import learning_rate


class Stage(Protocol):
    """What the loop trains on. Batches depend only on (step, first): resume and data parallelism
    see the same sequences."""

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        """Sequences ``first .. first + size - 1`` of the global batch of ``step`` (``global_size`` in all)."""
        ...

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The micro-batch's mean loss (a scalar that backpropagates into ``model``)."""
        ...

    def evaluate(self, model: nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        """Validation figures (may be empty)."""
        ...


@runtime_checkable
class ReportingStage(Stage, Protocol):
    """A stage with figures beside its loss: ``loss`` records them, ``pop_metrics`` returns their
    means since the last call (the loop calls it at each log line and writes them there)."""

    def pop_metrics(self) -> dict[str, float]:
        ...


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    mfu: float
    final: dict
    checkpoint: Path


def checkpoint_dir(config: TrainConfig) -> Path:
    return Path(config.out_dir) / "checkpoint"


def fit(model: DecoderLM, stage: Stage, config: TrainConfig, tokenizer=None, resume: bool = False,
        sample_fn: Callable[[nn.Module], list[str]] | None = None) -> TrainResult:
    """Train ``model`` on ``stage``; returns figures and the final checkpoint's path. The output folder is
    held for the run (:func:`lmforge.files.output_lock`): a second run into it is refused."""
    if not str(config.out_dir).strip():  # Path("") is the current folder: checkpoints would land wherever it is
        raise InputError("out_dir is empty: name the folder for the checkpoints and metrics")
    with output_lock(config.out_dir):
        return _fit(model, stage, config, tokenizer, resume, sample_fn)


def _fit(model: DecoderLM, stage: Stage, config: TrainConfig, tokenizer, resume: bool,
         sample_fn: Callable[[nn.Module], list[str]] | None) -> TrainResult:
    runtime = Runtime.resolve(config.device, config.dtype)
    if config.release_memory and runtime.device.type == "cpu":
        return_freed_memory()  # less memory for more page faults
    world = init_world(runtime.device.type)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(runtime.device).train()
    optimizer = build_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2))
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * world.size

    start_step, max_steps, elapsed_before = 0, config.max_steps, 0.0
    ckpt = checkpoint_dir(config)
    if resume:
        recover_folder(ckpt)  # a save killed between its two renames: the previous checkpoint comes back
        if not is_checkpoint(ckpt):
            raise InputError(f"--resume: no checkpoint in {ckpt}")
        start_step, max_steps, elapsed_before = _restore(ckpt, model, optimizer, runtime)
    elif config.minutes > 0:
        max_steps = _steps_for_budget(model, stage, config, runtime, world)

    train_model: nn.Module = torch.compile(model) if config.compile else model
    if world.size > 1:
        train_model = nn.parallel.DistributedDataParallel(train_model)
    metrics = MetricsLog(out_dir / "metrics.jsonl", keep_until_step=start_step if resume else None) \
        if world.is_main else None
    flops_per_token = train_flops_per_token(model.config, config.seq_len)
    peak = measure_matmul_peak(str(runtime.device), runtime.dtype) * world.size
    if metrics and not resume:
        metrics.write(kind="config", step=0, train=to_dict(config), model=model.config.to_dict(),
                      runtime=runtime.describe(), world_size=world.size, max_steps=max_steps,
                      parameters=model.num_parameters(), flops_per_token=flops_per_token, peak_flops=peak)

    bar = tqdm(total=max_steps, initial=start_step, disable=not (config.progress and world.is_main),
               unit="step", dynamic_ncols=True)
    final: dict = {}
    t_start = time.perf_counter()
    window_t, window_tokens = time.perf_counter(), 0
    tok_s = mfu = 0.0
    for step in range(start_step, max_steps):
        lr = learning_rate(step, config.lr, config.warmup_steps, max_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=runtime.device)
        for micro in range(config.grad_accum):
            first = (world.rank * config.grad_accum + micro) * config.batch_size
            batch = stage.batch(step, first, config.batch_size, tokens_per_step // config.seq_len, runtime.device)
            last = micro == config.grad_accum - 1
            sync = contextlib.nullcontext() if (world.size == 1 or last) else train_model.no_sync()
            with sync:
                with runtime.autocast():
                    loss = stage.loss(train_model, batch) / config.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        loss_value = all_reduce_mean(loss_sum.item(), world, runtime.device)
        if not math.isfinite(loss_value):
            bar.close()
            raise TrainingDiverged(
                f"loss became {loss_value} at step {step}; the last good checkpoint is {ckpt} "
                f"(try a lower --lr, now {config.lr}, or more --warmup-steps)")
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item() \
            if config.grad_clip > 0 else 0.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        window_tokens += tokens_per_step
        if done % config.log_every == 0 or done == max_steps:
            now = time.perf_counter()
            tok_s = window_tokens / (now - window_t)
            mfu = tok_s * flops_per_token / peak
            window_t, window_tokens = now, 0
            extra = stage.pop_metrics() if isinstance(stage, ReportingStage) else {}
            if metrics:
                metrics.write(kind="train", step=done, tokens=done * tokens_per_step, loss=loss_value, lr=lr,
                              grad_norm=grad_norm, tokens_per_second=tok_s, mfu=mfu,
                              elapsed=elapsed_before + now - t_start, **extra)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
        if config.eval_every and (done % config.eval_every == 0 or done == max_steps):
            final = stage.evaluate(model, runtime, config.eval_tokens, config.batch_size)
            if metrics and final:
                metrics.write(kind="val", step=done, tokens=done * tokens_per_step, **final)
                bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
        if sample_fn and config.sample_every and done % config.sample_every == 0 and world.is_main:
            samples = sample_fn(model)
            if metrics:
                metrics.write(kind="sample", step=done, samples=samples)
            for text in samples:
                bar.write(f"sample @ {done}: {text!r}")
        if done % config.save_every == 0 or done == max_steps:
            if world.is_main:
                state = {"step": done, "max_steps": max_steps, "tokens": done * tokens_per_step,
                         "elapsed": elapsed_before + time.perf_counter() - t_start, "train_config": to_dict(config)}
                save_checkpoint(ckpt, model, tokenizer, state, _resume_tensors(optimizer))
            barrier(world)
        bar.update(1)
    bar.close()
    seconds = elapsed_before + time.perf_counter() - t_start
    tokens = max_steps * tokens_per_step
    if metrics:
        plot_losses(metrics.path, out_dir / "loss.png", title=f"{model.num_parameters() / 1e6:.1f}M parameters")
    return TrainResult(max_steps, tokens, seconds, tok_s, mfu, final, ckpt)


def _resume_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = optimizer_tensors(optimizer)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def _restore(ckpt: Path, model: DecoderLM, optimizer: torch.optim.Optimizer, runtime: Runtime) -> tuple[int, int, float]:
    """Load weights, optimizer moments and RNG state; returns (next step, max_steps, elapsed seconds)."""
    from lmforge.interop.hf import mmap_safetensors

    weights = {name: tensor.to(runtime.device) for name, tensor in mmap_safetensors(ckpt / WEIGHTS).items()}
    if model.config.tie_embeddings and "embed.weight" in weights:
        weights["lm_head.weight"] = weights["embed.weight"]
    load_weights(model, weights, ckpt / WEIGHTS)
    state, tensors = read_trainer_state(ckpt)
    try:
        load_optimizer_tensors(optimizer, {k: v.to(runtime.device) if k.endswith(("exp_avg", "exp_avg_sq")) else v
                                           for k, v in tensors.items()})
        for key, device in (("rng.cpu", None), ("rng.cuda", "cuda")):
            if key in tensors and (device is None or torch.cuda.is_available()):
                expected = torch.get_rng_state() if device is None else torch.cuda.get_rng_state()
                if tensors[key].dtype != torch.uint8 or tensors[key].shape != expected.shape:
                    raise ValueError(f"{key}: not a random generator state")
                (torch.set_rng_state if device is None else torch.cuda.set_rng_state)(tensors[key].clone())
    except (ValueError, RuntimeError) as err:  # RuntimeError: torch's "Invalid mt19937 state"
        raise InputError(f"{ckpt / OPTIMIZER}: {err}") from err
    return state["step"], state["max_steps"], state.get("elapsed", 0.0)


def seconds_per_step(model: nn.Module, stage: Stage, config: TrainConfig, runtime: Runtime, global_size: int) -> float:
    """Seconds one optimizer step of ``config`` takes: a few steps timed on a copy of ``model`` (after one to
    warm up: allocations, kernel selection); the model itself is not touched."""
    probe = copy.deepcopy(model).to(runtime.device).train()
    optimizer = build_optimizer(probe, config.lr, config.weight_decay, (config.beta1, config.beta2))

    def one_step(step: int) -> None:
        for micro in range(config.grad_accum):
            batch = stage.batch(step, micro * config.batch_size, config.batch_size, global_size, runtime.device)
            with runtime.autocast():
                loss = stage.loss(probe, batch) / config.grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_step(0)
    t0 = time.perf_counter()
    for step in range(1, 4):
        one_step(step)
    if isinstance(stage, ReportingStage):
        stage.pop_metrics()  # the probe's figures are not the run's
    return (time.perf_counter() - t0) / 3


def _steps_for_budget(model: DecoderLM, stage: Stage, config: TrainConfig, runtime: Runtime, world: World) -> int:
    """Time a few steps (:func:`seconds_per_step`) and choose max_steps to fit ``config.minutes``.

    Validation passes are counted in (a forward pass costs about a third of a step).
    """
    per_step = seconds_per_step(model, stage, config, runtime, config.batch_size * config.grad_accum * world.size)
    eval_cost = 0.0
    if config.eval_every:
        eval_steps = config.eval_tokens / (config.batch_size * config.seq_len * config.grad_accum)
        eval_cost = eval_steps * per_step / 3 / config.eval_every
    steps = int(config.minutes * 60 / (per_step + eval_cost))
    return max(steps, 1)
