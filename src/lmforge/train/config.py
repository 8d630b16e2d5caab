"""Training hyper-parameters: one dataclass for every stage that runs through the loop."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.settings import field


@dataclass
class TrainConfig:
    """How to train: batch, schedule, precision, budget, logging and checkpoints."""

    out_dir: str = field("runs/pretrain", "folder for checkpoints, metrics and plots")
    batch_size: int = field(16, "sequences per micro-batch on each process")
    seq_len: int = field(256, "tokens per training sequence")
    grad_accum: int = field(1, "micro-batches summed into one optimizer step")
    max_steps: int = field(1000, "optimizer steps to run (ignored when minutes is set)")
    minutes: float = field(0.0, "time budget: when > 0, choose max_steps to fit it after timing a few steps")
    lr: float = field(3e-3, "peak learning rate")
    min_lr_ratio: float = field(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = field(50, "steps of linear warmup from 0 to the peak learning rate")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices (not on norms or biases)")
    beta1: float = field(0.9, "AdamW beta1")
    beta2: float = field(0.95, "AdamW beta2")
    grad_clip: float = field(1.0, "clip the global gradient norm to this (0 disables)")
    eval_every: int = field(100, "steps between validation passes (0 disables)")
    eval_tokens: int = field(65536, "validation tokens per evaluation")
    sample_every: int = field(0, "steps between text samples (0 disables)")
    save_every: int = field(200, "steps between checkpoints (the last step always saves)")
    log_every: int = field(10, "steps between metric lines")
    device: str = field("auto", "auto, cpu, cuda, cuda:1, mps")
    dtype: str = field("auto", "compute dtype: auto (bf16 where fast), bf16, fp32")
    compile: bool = field(False, "torch.compile the model")
    release_memory: bool = field(False, "on CPU, hand freed activations back to the system (glibc): about a "
                                        "quarter less peak memory, steps about a fifth slower (docs/GUIDE.md)")
    seed: int = field(1337, "seed for weights, batches and dropout")
    progress: bool = field(True, "show a progress bar")
