"""What every study shares: a ladder of model sizes trained at several compute budgets.

A size is ``dDIMlLAYERS`` (heads of 32 dimensions; RoPE, RMSNorm, SwiGLU, as the cpu-small
preset); N is its parameters without embeddings; a run of it at compute C trains for
D = C / (6 N) tokens through the normal pretraining recipe (:func:`lmforge.train.fit`). A
study plans its runs (leaving out the pairs a size cannot train at a budget), checks the
whole ladder against its time budget from timed steps, runs what is not finished yet and
reads back what is, so an interrupted study resumes.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import InputError
from lmforge.files import read_json, write_json_atomic
from lmforge.model import ModelConfig
from lmforge.model.transformer import DecoderLM
from lmforge.runtime import Runtime
from lmforge.settings import field, to_dict
from lmforge.train import PretrainStage, TrainConfig, fit

SIZE = re.compile(r"d(\d+)l(\d+)")
HEAD_DIM = 32


@dataclass
class LadderConfig:
    """The ladder of a study, its training settings and its time budget."""

    sizes: list[str] = field(["d32l2", "d64l2", "d96l3", "d128l4", "d160l5", "d192l6"], "model sizes of the "
                             "ladder, dDIM lLAYERS (heads of 32 dimensions; RoPE, RMSNorm, SwiGLU as the cpu-small "
                             "preset)")
    budgets: list[float] = field([1e12, 3e12, 6e12], "training FLOPs (6 N D) of each run: every size at every "
                                 "budget where it gets min_steps steps and the data has the tokens")
    minutes: float = field(60.0, "the study must fit this many minutes (estimated from timed steps before "
                           "anything trains); finished runs do not count")
    vocab_size: int = field(2048, "BPE vocabulary of the study's tokenizer (small: embeddings stay a small "
                            "part of the compute)")
    seq_len: int = field(128, "tokens per training sequence")
    batch_size: int = field(16, "sequences per step")
    lr: float = field(3e-3, "peak learning rate (warmup over a tenth of each run, then cosine decay)")
    min_steps: int = field(100, "a run needs at least this many steps: fewer means the size is too big for the "
                           "budget (a run that short measures its warmup more than its size)")
    max_epochs: float = field(4.0, "a run may read the training tokens this many times over (up to about 4, repeated "
                              "text is worth nearly as much as new: Muennighoff et al., 2023); more means the size "
                              "is too small for the budget")
    eval_tokens: int = field(131072, "validation tokens each final loss is measured on (the same for every run)")
    device: str = field("auto", "auto, cpu, cuda, mps")
    dtype: str = field("auto", "auto (bf16 where fast), bf16, fp32")
    seed: int = field(1337, "seed for data, weights and batches")
    progress: bool = field(True, "show progress bars")

    def __post_init__(self) -> None:
        for size in self.sizes:
            parse_size(size)
        if len(self.sizes) * len(self.budgets) < 1:
            raise ValueError("a ladder needs a size and a budget at least")
        if any(b <= 0 for b in self.budgets):
            raise ValueError("budgets are FLOPs: positive numbers such as 1e12")


# Fields that change what a run computes: a study folder made with other values cannot be resumed.
SAME_LADDER = ("vocab_size", "seq_len", "batch_size", "lr", "eval_tokens", "seed")


def describe_flops(flops: float) -> str:
    """1e12 -> "1e12", 3e12 -> "3e12" (run names)."""
    exponent = math.floor(math.log10(flops))
    return f"{flops / 10 ** exponent:.3g}e{exponent}"


def parse_size(text: str) -> tuple[int, int]:
    """"d128l4" -> (dim 128, 4 layers)."""
    match = SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"size {text!r}: write dDIM lLAYERS, e.g. d128l4")
    dim, layers = int(match[1]), int(match[2])
    if dim % HEAD_DIM or dim < HEAD_DIM or layers < 1:
        raise ValueError(f"size {text!r}: dim must be a multiple of {HEAD_DIM} and layers at least 1")
    return dim, layers


def parse_holdout(text: str) -> tuple[str, float]:
    size, _, flops = text.partition("@")
    try:
        return size, float(flops)
    except ValueError:
        raise ValueError(f"holdout {text!r}: write SIZE@FLOPS, e.g. d192l6@1e13") from None


def size_config(size: str, vocab_size: int, seq_len: int) -> ModelConfig:
    dim, layers = parse_size(size)
    heads = dim // HEAD_DIM
    return ModelConfig(vocab_size=vocab_size, max_seq_len=seq_len, dim=dim, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads)


def non_embedding_parameters(config: ModelConfig) -> int:
    with torch.device("meta"):
        return DecoderLM(config).num_parameters(embeddings=False)


@dataclass
class PlannedRun:
    name: str
    size: str
    flops: float
    parameters: int
    tokens: int
    steps: int
    holdout: bool = False


def plan(config: LadderConfig, vocab_size: int, data_tokens: int, holdout: str = "", minimum: int = 1,
         why_minimum: str = "") -> tuple[list[PlannedRun], list[str]]:
    """Every run of the ladder (then the ``holdout`` one, SIZE@FLOPS), and why the (size, budget) pairs left
    out are: a size too big for a budget (fewer than ``min_steps`` steps) or too small for it (more tokens
    than the data holds ``max_epochs`` times over: repeated text would bend the results). InputError when
    fewer than ``minimum`` ladder runs are left (``why_minimum`` says why that many), or for a held-out
    run that cannot be trained."""
    per_step = config.batch_size * config.seq_len
    pairs = [(size, flops, False) for flops in config.budgets for size in config.sizes]
    if holdout:
        pairs.append((*parse_holdout(holdout), True))
    runs, skipped = [], []
    for size, flops, held in pairs:
        n = non_embedding_parameters(size_config(size, vocab_size, config.seq_len))
        steps = round(flops / (6 * n) / per_step)
        name = f"{size}@{describe_flops(flops)}"
        why = None
        if steps < config.min_steps:
            why = f"{name}: {n:,} parameters train for only {steps} steps of {per_step} tokens (min_steps " \
                  f"{config.min_steps})"
        elif steps * per_step > config.max_epochs * data_tokens:
            why = f"{name}: {steps * per_step:,} tokens, more than {config.max_epochs:g} x the {data_tokens:,} of " \
                  "the data (max_epochs)"
        if why and held:
            raise InputError(f"the held-out run {why}: choose another --holdout")
        if why:
            skipped.append(why)
        else:
            runs.append(PlannedRun(name, size, flops, n, steps * per_step, steps, held))
    if sum(not r.holdout for r in runs) < minimum:
        raise InputError(f"fewer than {minimum} runs{why_minimum}" + (": " + "; ".join(skipped) if skipped else "")
                         + ". Change --sizes or --budgets")
    return runs, skipped


def check_time(config: LadderConfig, runs: list[PlannedRun], stage: PretrainStage, vocab_size: int,
               out: Path) -> None:
    """Print the plan, and refuse (InputError) a ladder whose unfinished runs need more than ``minutes``,
    estimated from a few timed steps of each size."""
    todo = [r for r in runs if not (out / "runs" / r.name / "result.json").is_file()]
    per_step = {size: step_seconds(config, size, stage, vocab_size, out) for size in {r.size for r in todo}}
    estimate = sum(r.steps * per_step[r.size] for r in todo) / 60
    print(f"[study] {len(runs)} runs ({len(runs) - len(todo)} finished); the rest needs about {estimate:.1f} min",
          flush=True)
    if estimate > config.minutes:
        raise InputError(f"the ladder needs about {estimate:.0f} minutes, more than --minutes {config.minutes:g}: "
                         "drop the largest budget or size, or raise --minutes")


def frontier(rows: list[dict]) -> list[dict]:
    """The compute frontier: each budget's run with the lowest validation loss, by budget."""
    best: dict[float, dict] = {}
    for r in rows:
        if r["flops"] not in best or r["loss"] < best[r["flops"]]["loss"]:
            best[r["flops"]] = r
    return [best[flops] for flops in sorted(best)]


def check_same_study(config, out: Path, names: tuple[str, ...], data_names: tuple[str, ...] | None = None) -> None:
    """Write the study's settings ``names``, or refuse a folder made with other ones (InputError naming them).
    Settings outside ``data_names`` (default: all of them) shape the runs but not the data, and may change
    until a run has started (``out/runs`` exists): a study refused before training can be rerun with them."""
    settings = {name: to_dict(config)[name] for name in names}
    path = out / "study.json"
    if path.is_file():
        before = read_json(path, "a study result")
        changed = [f"{name} {before.get(name)!r} -> {value!r}" for name, value in settings.items()
                   if before.get(name) != value
                   and (data_names is None or name in data_names or (out / "runs").exists())]
        if changed:
            raise InputError(f"{out} holds a study made with other settings ({'; '.join(changed)}): resume it with "
                             "those, or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


def train_config(config, steps: int, folder: Path, lr: float | None = None) -> TrainConfig:
    """The training settings of a study's run of ``steps`` steps (warmup over a tenth of it, then cosine decay to
    its end) from the study's batch, sequence, device and seed settings; ``lr`` defaults to ``config.lr``."""
    return TrainConfig(out_dir=str(folder), batch_size=config.batch_size, seq_len=config.seq_len, max_steps=steps,
                       lr=config.lr if lr is None else lr, warmup_steps=max(1, steps // 10), eval_every=0,
                       save_every=max(50, steps // 4), log_every=max(1, steps // 20), device=config.device,
                       dtype=config.dtype, seed=config.seed, progress=config.progress)


def step_seconds(config: LadderConfig, size: str, stage: PretrainStage, vocab_size: int, out: Path) -> float:
    """Seconds a training step of ``size`` takes (the loop's own timing, :func:`lmforge.train.loop.seconds_per_step`)."""
    from lmforge.train.loop import seconds_per_step

    torch.manual_seed(config.seed)
    model = DecoderLM(size_config(size, vocab_size, config.seq_len))
    return seconds_per_step(model, stage, train_config(config, 1, out), Runtime.resolve(config.device, config.dtype),
                            config.batch_size)


def run_one(config: LadderConfig, run: PlannedRun, stage: PretrainStage, tokenizer, out: Path,
            measure: Callable[[DecoderLM], dict] | None = None) -> dict:
    """Train one run (or finish an interrupted one), measure its final validation loss (and ``measure``'s
    figures of the trained model), and keep them in ``runs/NAME/result.json``; a finished run is read back."""
    folder = out / "runs" / run.name
    result_path = folder / "result.json"
    if result_path.is_file():
        return read_json(result_path, "a study result")
    model_config = size_config(run.size, tokenizer.vocab_size, config.seq_len)
    torch.manual_seed(config.seed)
    model = DecoderLM(model_config)
    train = train_config(config, run.steps, folder)
    t0 = time.perf_counter()
    resume = (folder / "checkpoint" / "trainer_state.json").is_file()
    result = fit(model, stage, train, tokenizer=tokenizer, resume=resume)
    runtime = Runtime.resolve(config.device, config.dtype)
    final = stage.evaluate(model, runtime, config.eval_tokens, config.batch_size)
    row = {"name": run.name, "size": run.size, "flops": run.flops, "parameters": run.parameters,
           "all_parameters": model.num_parameters(), "tokens": run.tokens, "steps": run.steps,
           "loss": final["val_loss"], "bpb": final.get("val_bpb"), "holdout": run.holdout,
           "seconds": time.perf_counter() - t0, "tokens_per_second": result.tokens_per_second}
    if measure is not None:
        row.update(measure(model.eval()))
    write_json_atomic(result_path, row)
    return row


