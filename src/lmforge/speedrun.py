"""The speedrun: raw text to a model that writes, in one command, on a CPU.

    data (built-in corpus) -> BPE tokenizer -> token shards -> pretraining under a
    time budget -> validation loss and bits per byte -> samples
    -> instruction fine-tuning on the built-in tasks (loss on answers only) -> base vs
       chat accuracy on held-out tasks, forgetting (validation loss before and after)
    -> alignment of the chat model (GRPO with the tasks' checker as the reward, or DPO on the
       built-in preference pairs) -> accuracy on the same held-out tasks, reward and KL curves
    -> report.md

Each later stage is the recipe its own command runs (``lmforge sft``, ``lmforge grpo``,
``lmforge dpo``): the speedrun only fills in their configs.

Everything goes into one run folder (``runs/<name>``):
    data/  tokenizer.json  shards/  train/ (metrics.jsonl, loss.png, checkpoint/)
    sft/ (metrics.jsonl, loss.png, model/)  align/ (metrics.jsonl, rewards.png, model/)  report.md
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data import DataConfig, iter_prepared, prepare_data, read_manifest, write_shards
from lmforge.data.shards import load_shard, read_meta
from lmforge.eval.report import write_report
from lmforge.eval.samples import sample_texts
from lmforge.files import output_lock, write_json_atomic
from lmforge.model import DecoderLM, preset
from lmforge.runtime import Runtime, measure_matmul_peak
from lmforge.settings import field, to_dict
from lmforge.tokenizer import bytes_per_token, train_tokenizer
from lmforge.train import PretrainStage, TrainConfig, fit

ALIGN_METHODS = ("grpo", "dpo", "none")


@dataclass
class SpeedrunConfig:
    """The whole pipeline's settings; each stage's finer knobs have their own commands."""

    name: str = field("speedrun", "run name: everything is written under <runs-dir>/<name>")
    runs_dir: str = field("runs", "parent folder of runs")
    inputs: list[str] = field(["builtin"], "data to train on (files, folders, globs, builtin, hf:NAME)")
    minutes: float = field(15.0, "wall-clock budget for the whole run, in minutes")
    preset: str = field("cpu-small", "model shape (see `lmforge model info --list`)")
    vocab_size: int = field(8192, "BPE vocabulary size")
    seq_len: int = field(256, "training sequence length")
    batch_size: int = field(16, "sequences per step")
    lr: float = field(3e-3, "peak learning rate")
    max_bytes: int = field(0, "cap on prepared corpus size in bytes (0 = all)")
    device: str = field("auto", "auto, cpu, cuda, mps")
    dtype: str = field("auto", "auto (bf16 where fast), bf16, fp32")
    compile: bool = field(False, "torch.compile the model")
    sft_share: float = field(0.25, "share of the training time for instruction fine-tuning (0 skips it)")
    sft_tasks: int = field(6000, "built-in task conversations to fine-tune on")
    align: str = field("grpo", "third stage on the chat model: grpo (the tasks' checker as reward), dpo (built-in "
                               "preference pairs) or none")
    align_share: float = field(0.15, "share of the training time for the alignment stage")
    align_lr: float = field(1e-4, "learning rate of the alignment stage (full fine-tuning)")
    eval_tasks: int = field(200, "held-out built-in tasks for the accuracy of base and chat model")
    leaderboard_items: int = field(50, "items per task when the base and chat models join the leaderboard "
                                        "(<runs-dir>/leaderboard.sqlite); 0 skips it")
    seed: int = field(1337, "seed for everything")
    progress: bool = field(True, "show progress bars")

    def __post_init__(self) -> None:
        if self.align not in ALIGN_METHODS:
            raise ValueError(f"align={self.align!r}; choose one of {', '.join(ALIGN_METHODS)}")
        if self.sft_share < 0 or self.align_share < 0 or self.sft_share + self.align_share >= 1:
            raise ValueError("sft_share and align_share must be non-negative and leave time for pretraining")


def speedrun(config: SpeedrunConfig) -> Path:
    """Run every stage; returns the path of report.md. The run's folder is held while it runs
    (:func:`lmforge.files.output_lock`): a second speedrun with the same name is refused."""
    with output_lock(Path(config.runs_dir) / config.name):
        return _speedrun(config)


def _speedrun(config: SpeedrunConfig) -> Path:
    t0 = time.perf_counter()
    run = Path(config.runs_dir) / config.name
    run.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str, start: float) -> None:
        timings[name] = time.perf_counter() - start
        print(f"[speedrun] {name}: {timings[name]:.1f}s", flush=True)

    t = time.perf_counter()
    data_config = DataConfig(seed=config.seed, max_bytes=config.max_bytes or None)
    prepare_data(config.inputs, run / "data", data_config, progress=config.progress)
    stage("data", t)

    t = time.perf_counter()
    tokenizer = train_tokenizer(iter_prepared(run / "data", "train"), config.vocab_size, progress=config.progress)
    tokenizer.save(run / "tokenizer.json")
    val_texts = list(iter_prepared(run / "data", "val"))
    tokenizer_stats = {"vocab_size": tokenizer.vocab_size, "bytes_per_token_val": bytes_per_token(tokenizer, val_texts)}
    stage("tokenizer", t)

    t = time.perf_counter()
    write_shards(run / "data", tokenizer, run / "shards", progress=config.progress)
    stage("shards", t)

    torch.manual_seed(config.seed)
    model_config = preset(config.preset, vocab_size=tokenizer.vocab_size, max_seq_len=config.seq_len)
    model = DecoderLM(model_config)
    stage_data = PretrainStage(load_shard(run / "shards", "train"), config.seq_len, config.seed,
                               val_tokens=load_shard(run / "shards", "val"),
                               token_bytes=tokenizer.token_byte_lengths())
    runtime = Runtime.resolve(config.device, config.dtype)
    # Leave time for the final evaluation, samples and the report, and for asking the base and
    # the chat model every held-out task (about 0.2 s a task each on 2 cores).
    reserve = min(0.5, 0.1 * config.minutes)
    aligning = config.sft_share > 0 and config.align != "none" and config.align_share > 0
    if config.sft_share > 0:
        reserve += (4 if aligning else 2) * 0.2 * config.eval_tasks / 60
    reserve += 5 * LEADERBOARD_SECONDS_PER_ITEM * config.leaderboard_items / 60  # 2 tasks of the base, 3 of the chat
    left = max(0.1, config.minutes - (time.perf_counter() - t0) / 60 - reserve)
    align_share = config.align_share if aligning else 0.0
    train_minutes = left * (1 - config.sft_share - align_share)
    sft_minutes, align_minutes = left * config.sft_share, left * align_share
    train_config = TrainConfig(out_dir=str(run / "train"), batch_size=config.batch_size, seq_len=config.seq_len,
                               minutes=train_minutes, lr=config.lr, warmup_steps=30, eval_every=100,
                               eval_tokens=32768, save_every=200, log_every=10, sample_every=0,
                               device=config.device, dtype=config.dtype, compile=config.compile,
                               seed=config.seed, progress=config.progress)
    t = time.perf_counter()
    result = fit(model, stage_data, train_config, tokenizer=tokenizer)
    stage("pretrain", t)

    t = time.perf_counter()
    final_eval_tokens = max(0, min(262144, len(stage_data.val_tokens) - 1))
    final_eval = stage_data.evaluate(model, runtime, max_tokens=final_eval_tokens, batch_size=16)
    samples = sample_texts(model, tokenizer, runtime)
    stage("evaluate", t)

    sft = None
    if config.sft_share > 0:
        t = time.perf_counter()
        sft = _finetune_on_tasks(config, run, result.checkpoint, stage_data, runtime, minutes=max(0.05, sft_minutes))
        stage("sft", t)

    aligned = None
    if aligning:
        t = time.perf_counter()
        aligned = _align(config, run, sft["model"], minutes=max(0.05, align_minutes))
        stage("align", t)

    leaderboard = None
    if config.leaderboard_items > 0:
        t = time.perf_counter()
        leaderboard = _join_leaderboard(config, run, result.checkpoint, sft["model"] if sft else None)
        stage("leaderboard", t)

    summary = {
        "config": to_dict(config),
        "runtime": runtime.describe(),
        "timings": timings,
        "total_seconds": time.perf_counter() - t0,
        "manifest": read_manifest(run / "data"),
        "tokenizer": tokenizer_stats,
        "shards": read_meta(run / "shards"),
        "model": {"config": model_config.to_dict(), "parameters": model.num_parameters(),
                  "non_embedding_parameters": model.num_parameters(embeddings=False)},
        "training": {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
                     "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
                     "last_window_tokens_per_second": result.tokens_per_second, "mfu": result.mfu,
                     "peak_flops": measure_matmul_peak(str(runtime.device), runtime.dtype)},
        "final_eval": final_eval,
        "final_eval_tokens": final_eval_tokens,
        "samples": samples,
        "sft": sft,
        "align": aligned,
        "leaderboard": leaderboard,
    }
    write_json_atomic(run / "summary.json", summary)
    report = write_report(run, summary)
    print(f"[speedrun] done in {summary['total_seconds'] / 60:.1f} min: {report}", flush=True)
    return report



# seconds per item and task, model loading included: 4.1 s for 50 items each of pyref_mc and pyref_ppl
# with a cpu-small model on a 2-core AMD EPYC (Zen 4); 0.05 leaves some room
LEADERBOARD_SECONDS_PER_ITEM = 0.05


def _join_leaderboard(config: SpeedrunConfig, run: Path, base: Path, chat: str | None) -> dict:
    """`lmforge eval` of the base model (multiple choice, perplexity) and the chat model (the same and
    the held-out verifiable tasks, in its chat format), added to <runs-dir>/leaderboard.sqlite."""
    from lmforge.eval.run import EvalConfig, run_eval

    out = {}
    models = {"base": (base, "pyref_mc,pyref_ppl")}
    if chat:
        models["chat"] = (chat, "pyref_mc,pyref_ppl,verifiable")
    for role, (path, tasks) in models.items():
        eval_config = EvalConfig(tasks=tasks, limit=config.leaderboard_items, seed=config.seed,
                                 out=str(run / "eval" / role), bootstrap=200, device=config.device,
                                 dtype=config.dtype, leaderboard=str(Path(config.runs_dir) / "leaderboard.sqlite"))
        results = run_eval(eval_config, str(path), progress=config.progress, name=f"{config.name}/{role}")
        out[role] = {task: {label: {k: v["value"] for k, v in entry["metrics"].items()
                                    if isinstance(v["value"], float)}
                            for label, entry in strategies.items()}
                     for task, strategies in results["tasks"].items()}
    return out


def _finetune_on_tasks(config: SpeedrunConfig, run: Path, checkpoint: Path, pretrain: PretrainStage,
                       runtime: Runtime, minutes: float) -> dict:
    """Full fine-tuning of the pretrained model on the built-in tasks; accuracy before and after,
    and the pretraining validation loss of the tuned model (what instruction tuning costs)."""
    from lmforge.checkpoint import load_model
    from lmforge.finetune import BUILTIN_TASKS, FinetuneConfig, finetune

    sft_config = FinetuneConfig(model=str(checkpoint), data=[BUILTIN_TASKS], method="full",
                                tasks=config.sft_tasks, eval_tasks=config.eval_tasks, val_fraction=0.02)
    train_config = TrainConfig(out_dir=str(run / "sft"), batch_size=config.batch_size, seq_len=config.seq_len,
                               minutes=minutes, lr=1e-3, warmup_steps=20, weight_decay=0.0, eval_every=100,
                               eval_tokens=16384, save_every=100000, log_every=10, device=config.device,
                               dtype=config.dtype, compile=config.compile, seed=config.seed,
                               progress=config.progress)
    summary = finetune(sft_config, train_config)
    tuned = load_model(summary["model"], device=runtime.device)
    after = pretrain.evaluate(tuned, runtime, max_tokens=max(0, min(262144, len(pretrain.val_tokens) - 1)),
                              batch_size=16)
    return {**summary, "pretrain_val_after_sft": after}


def _align(config: SpeedrunConfig, run: Path, chat_model: str, minutes: float) -> dict:
    """The chat model aligned by the recipe of ``lmforge grpo`` (rewarded by the built-in tasks' checker, with
    a KL penalty to a frozen copy) or of ``lmforge dpo`` (built-in preference pairs), full fine-tuning; the
    held-out tasks are drawn as the sft stage draws them, so the accuracies line up."""
    train_config = TrainConfig(out_dir=str(run / "align"), batch_size=8, seq_len=config.seq_len, minutes=minutes,
                               lr=config.align_lr, warmup_steps=0, weight_decay=0.0, eval_every=0,
                               save_every=100000, log_every=1, device=config.device, dtype=config.dtype,
                               seed=config.seed, progress=config.progress)
    if config.align == "grpo":
        from lmforge.grpo import GRPOConfig, train_grpo

        recipe = GRPOConfig(model=chat_model, method="full", tasks=config.sft_tasks, eval_tasks=config.eval_tasks,
                            group_size=8, max_new_tokens=24, beta=0.04)
        summary = train_grpo(recipe, train_config)
    else:
        from lmforge.dpo import DPOConfig, train_dpo

        recipe = DPOConfig(model=chat_model, method="full", eval_tasks=config.eval_tasks)
        summary = train_dpo(recipe, train_config)
    return {"method": config.align, **summary}
