"""``lmforge quantize``: post-training quantization of a model into an integer checkpoint, with a report.

    report = quantize_checkpoint("smollm2-135m-instruct", "runs/smollm2-int8", QuantSpec(bits=8))

1. Load the model in fp32 and measure bits per byte on held-out text (the language
   reference, which every Python has, or ``eval_text``).
2. Quantize its layers (:func:`lmforge.quant.integer.quantize_model`), recording each
   layer's weight error: mean squared and largest absolute.
3. Measure bits per byte again with the integer weights, and write the checkpoint
   (``quantization.json`` beside the usual files) with ``report.md`` and
   ``weight_error.png`` in it.

Bits per byte: the model's summed negative log-likelihood of the text, in bits, over its
UTF-8 bytes (every token scored once, in windows of the model's context): comparable
across tokenizers, and the number that says what quantizing cost.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmforge.errors import InputError
from lmforge.files import holds_output, write_json_atomic, write_text_atomic
from lmforge.quant.gptq import input_hessians
from lmforge.quant.integer import (
    QUANT_FILE,
    QuantSpec,
    check_group_size,
    quantizable_layers,
    quantize_model,
    unfuse,
)
from lmforge.quant.integer import calibrate as calibrate_layers

REPORT, PLOT = "report.md", "weight_error.png"
METHODS = ("rtn", "gptq")  # round to nearest; GPTQ (lmforge.quant.gptq)


@dataclass
class QuantReport:
    spec: QuantSpec
    method: str = "rtn"  # how weights were rounded: rtn (to nearest) or gptq
    act_order: bool = False  # gptq: columns by decreasing H[i, i]
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {"mse", "max"}
    bpb_before: float = float("nan")
    bpb_after: float = float("nan")
    eval_bytes: int = 0
    memory_before: int = 0  # bytes of the weights in memory, fp32
    memory_after: int = 0
    disk_after: int = 0  # bytes of model.safetensors as written
    task: str = ""  # a held-out multiple-choice task (lmforge eval's built-in), scored zero-shot
    task_items: int = 0
    accuracy_before: float = float("nan")
    accuracy_after: float = float("nan")
    seconds: float = 0.0

    @property
    def bpb_change(self) -> float:
        """Relative change of bits per byte (0.01: 1% more)."""
        return self.bpb_after / self.bpb_before - 1

    def table(self) -> str:
        method = f", rounded by GPTQ{' (act-order)' if self.act_order else ''}" if self.method == "gptq" else ""
        lines = [f"# Quantization: {self.spec.name}{method}", "",
                 "| | before (fp32) | after | change |", "|---|---:|---:|---:|"]
        if self.eval_bytes:
            lines.append(f"| bits per byte ({self.eval_bytes:,} bytes of held-out text) | {self.bpb_before:.4f} | "
                         f"{self.bpb_after:.4f} | {self.bpb_change:+.2%} |")
        if self.task_items:
            stderr = math.sqrt(max(self.accuracy_before * (1 - self.accuracy_before), 1e-12) / self.task_items)
            lines.append(f"| {self.task} accuracy ({self.task_items} held-out items, ±{stderr:.3f} each) | "
                         f"{self.accuracy_before:.3f} | {self.accuracy_after:.3f} | "
                         f"{self.accuracy_after - self.accuracy_before:+.3f} |")
        lines.append(f"| weights in memory | {self.memory_before / 2**20:.1f} MiB | {self.memory_after / 2**20:.1f} MiB "
                     f"| {self.memory_after / self.memory_before:.2f}x |")
        lines.append(f"| model.safetensors on disk | | {self.disk_after / 2**20:.1f} MiB | |")
        worst = sorted(self.layers.items(), key=lambda item: -item[1]["mse"])
        lines += ["", f"Weight error of the {len(self.layers)} quantized layers (largest mean squared first):", "",
                  "| layer | mean squared | largest absolute |", "|---|---:|---:|"]
        lines += [f"| {name} | {e['mse']:.3e} | {e['max']:.3e} |" for name, e in worst]
        return "\n".join(lines)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (each stored tensor once), the RoPE tables left out."""
    seen, total = set(), 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor is None or tensor.data_ptr() in seen or name.endswith(("cos", "sin", "inv_freq", "table")):
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def held_out_text(chars: int) -> str:
    """The first ``chars`` characters of the language reference's topics, in name order."""
    from lmforge.data.builtin import iter_language_reference

    return "\n\n".join(document.text for document in iter_language_reference())[:chars]


def bits_per_byte(lm, text: str) -> float:
    """Summed negative log-likelihood of ``text`` in bits over its UTF-8 bytes (rolling windows)."""
    from lmforge.eval.harness import LocalModel

    scored = LocalModel(lm, progress=False).loglikelihood_rolling([text])[0]
    return -scored.logprob / math.log(2) / len(text.encode("utf-8"))


def calibration_batches(tokenizer, path: str | Path, tokens: int = 4096, window: int = 512) -> list[torch.Tensor]:
    """Token windows (1, <= window) of a calibration file's first ``tokens`` tokens: plain text, or JSONL
    whose lines have a "text" field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such calibration file (give a text or JSONL file with a \"text\" field)")
    try:
        raw = path.read_text(encoding="utf-8")
        texts = [json.loads(line).get("text", "") for line in raw.splitlines() if line.strip()] \
            if path.suffix == ".jsonl" else [raw]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise InputError(f"{path}: cannot read calibration text: {err}") from err
    ids = tokenizer.encode("\n\n".join(texts))[:tokens]
    if not ids:
        raise InputError(f"{path}: the calibration file holds no text")
    return [torch.tensor([ids[start:start + window]]) for start in range(0, len(ids), window)]


def task_accuracy(lm, task) -> float:
    """Zero-shot accuracy (the likeliest choice) of ``lm`` on a multiple-choice :class:`~lmforge.eval.task.Task`."""
    from lmforge.eval.harness import LocalModel
    from lmforge.eval.run import Prompting, score_multiple_choice

    records = score_multiple_choice(LocalModel(lm, progress=False), task, task.test, Prompting("zero"), 0)
    return sum(record["acc"] for record in records) / len(records)


def held_out_task(name: str, items: int):
    """The built-in multiple-choice task ``name`` (lmforge eval's), its first ``items`` test items."""
    from lmforge.eval.tasks_builtin import BUILTIN_TASKS, builtin_task

    if name not in BUILTIN_TASKS:
        raise InputError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    task = builtin_task(name, limit=items, seed=0)
    if task.kind != "multiple_choice":
        raise InputError(f"the quantization report scores a multiple-choice task; {name} is {task.kind}")
    return task


@holds_output("out")
def quantize_checkpoint(source: str | Path, out: str | Path, spec: QuantSpec, device: str = "cpu",
                        eval_chars: int = 20000, eval_text: str | None = None,
                        calibrate: str | Path | None = None, calibrate_tokens: int = 4096,
                        eval_task: str = "pyref_mc", eval_items: int = 100, method: str = "rtn",
                        act_order: bool = True) -> QuantReport:
    """Quantize ``source`` (anything ``lmforge.load`` loads) into the checkpoint ``out``; see the module doc.
    W8A8 with static scales (``spec.activations == "static"``) and ``method="gptq"`` (the Transformer blocks'
    layers rounded by :mod:`lmforge.quant.gptq`; the embedding table and head to nearest) read ``calibrate``,
    a text or JSONL file."""
    from lmforge.api import load
    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.quant.integer import spec_json

    start = time.perf_counter()
    if spec.activations == "static" and calibrate is None:
        raise InputError("static int8 activations need calibration text: --calibrate DATA")
    if method not in METHODS:
        raise InputError(f"unknown rounding method {method!r}; choose {' or '.join(METHODS)}")
    if method == "gptq" and calibrate is None:
        raise InputError("GPTQ rounds against the inputs each layer sees: give calibration text, --calibrate DATA")
    task = held_out_task(eval_task, eval_items) if eval_items else None
    lm = load(source, device=device, dtype="fp32")
    if lm.encoder_decoder:  # bits per byte and the task scores read a decoder's next-token logits
        raise InputError(f"{source} is an encoder-decoder: lmforge quantize takes decoder-only models")
    check_group_size(lm.model, spec)  # a group size that does not divide: said before any evaluation
    absmax = hessians = None
    if calibrate is not None:
        window = min(512, lm.model.config.max_seq_len)
        batches = [ids.to(device) for ids in calibration_batches(lm.tokenizer, calibrate, calibrate_tokens, window)]
        if spec.activations == "static":
            absmax = calibrate_layers(lm.model, batches)
        if method == "gptq":
            unfuse(lm.model)
            hessians = input_hessians(lm.model, [n for n in quantizable_layers(lm.model) if n.startswith("blocks.")],
                                      batches)
    report = QuantReport(spec, method=method, act_order=method == "gptq" and act_order,
                         memory_before=weight_bytes(lm.model))
    text = eval_text if eval_text is not None else held_out_text(eval_chars) if eval_chars else ""
    if text:
        report.eval_bytes = len(text.encode("utf-8"))
        report.bpb_before = bits_per_byte(lm, text)
    if task is not None:
        report.task, report.task_items = task.name, len(task.test)
        report.accuracy_before = task_accuracy(lm, task)
    layers = quantizable_layers(lm.model)
    report.layers = quantize_model(lm.model, spec, absmax, hessians, act_order)
    lm.__dict__.pop("_engines", None)  # engines made for the float model
    report.memory_after = weight_bytes(lm.model)
    if text:
        report.bpb_after = bits_per_byte(lm, text)
    if task is not None:
        report.accuracy_after = task_accuracy(lm, task)
    out = Path(out)
    write_checkpoint(out, lm.model.config, model_state(lm.model), lm.tokenizer,
                     files={QUANT_FILE: spec_json(spec, layers)})
    report.disk_after = (out / "model.safetensors").stat().st_size
    report.seconds = time.perf_counter() - start
    write_text_atomic(out / REPORT, report.table() + f"\n\n![weight error by layer]({PLOT})\n")
    write_json_atomic(out / "report.json", asdict(report))
    plot_errors(report, out / PLOT)
    return report


def plot_errors(report: QuantReport, path: Path) -> None:
    """Mean squared weight error of each quantized layer, in the model's order, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.layers)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    kinds = sorted({name.rsplit(".", 1)[-1] for name in names})
    for kind in kinds:
        points = [(i, report.layers[n]["mse"]) for i, n in enumerate(names) if n.rsplit(".", 1)[-1] == kind]
        ax.plot(*zip(*points), marker="o", markersize=3, linestyle="none", label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("mean squared weight error")
    ax.set_title(f"{report.spec.name}: weight error per layer")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
