"""Greedy decoding speed: lmforge's engine against transformers' ``generate()``, same weights.

Builds the ``llama-42m`` preset with random weights (or loads ``--model``) and a transformers
``LlamaForCausalLM`` of the same shape, copies the weights across (our RoPE uses the
rotate-half layout of HF Llama, so every matrix copies as is), checks that the two
give the same logits and the same greedy tokens in fp32, then times greedy decoding
of N new tokens after a short prompt, at batch 1 and batch 8. On a CPU without native
bf16 it also times weights stored in 16 bits (``lmforge.quant.weight_only``) against a
transformers model cast to fp16; with ``--llama-cpp-python`` it times llama.cpp on the
same weights (f32 and f16 GGUF files) at batch 1, interleaved with the rest. ``--integer`` times
lmforge's integer decode steps (int8, int4, W8A8: lmforge.quant) against its 16-bit one and,
with ``--llama-cpp-python``, llama.cpp's f16, q8_0 and q4_0 files of the same weights. Each dtype is
also timed eager in the layout ``lmforge.load`` gives (fused projections, packed weights); bf16 on a
CPU with AVX-512 BF16 both with oneDNN's products and with lmforge's dot-product kernel
(``LMFORGE_BF16_KERNEL=on`` adds the kernel on an AMX CPU, where it is not the default).

    python benchmarks/decode.py            # 128 new tokens, 3 repeats
    python benchmarks/decode.py --quick    # 32 new tokens, 1 repeat, no torch.compile
    python benchmarks/decode.py --llama-cpp-python ../llama-cpp-env/bin/python

ms/token = wall time of the whole call (prefill included) / new tokens, median of
the repeats. Variants run interleaved (each repeat runs every variant once), so that
a noisy machine slows them alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import fast_dtypes, llama_twin, machine  # noqa: E402

from lmforge.checkpoint import load_model
from lmforge.infer import CompiledDecodeStep, SamplingConfig, generate
from lmforge.model import PRESETS, DecoderLM, KVCache, preset
from lmforge.quant import kernels
from lmforge.quant.integer import QuantSpec, quantize_model
from lmforge.quant.weight_only import quantize_weights
from lmforge.runtime import Runtime

Runner = Callable[[torch.Tensor], list[list[int]]]  # prompt (B, T) -> new tokens per row


def check_same_model(model: DecoderLM, hf, prompt: torch.Tensor, new_tokens: int) -> None:
    """fp32 logits within 1e-4 and identical greedy tokens, or raise."""
    with torch.inference_mode():
        ours, theirs = model(prompt), hf(prompt).logits
    diff = (ours - theirs).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"logits differ by {diff:.2e}: the weight copy or the model is wrong")
    a = lmforge_runner(model, None)(prompt)
    b = hf_runner(hf)(prompt)
    if a != b:
        raise SystemExit("greedy tokens differ between lmforge and transformers in fp32")
    print(f"fp32 check: max |logit diff| = {diff:.1e}; greedy tokens identical ({len(a[0])} x {len(a)} rows)")


def lmforge_runner(model: DecoderLM, runtime: Runtime | None, new_tokens: int = 16,
                   decode_step: CompiledDecodeStep | None = None) -> Runner:
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
    return lambda prompt: generate(model, prompt.tolist(), config, runtime, decode_step=decode_step)


def hf_runner(hf, new_tokens: int = 16, **generate_kwargs) -> Runner:
    def run(prompt: torch.Tensor) -> list[list[int]]:
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, **generate_kwargs)
        return out[:, prompt.shape[1]:].tolist()
    return run


def hf_compile_kwargs() -> dict:
    """Static cache and torch.compile for transformers' generate(), which compiles only on GPUs by default.

    max-autotune as for lmforge; Inductor's weight freezing, which lmforge's compiled
    step also uses, makes transformers' compiled graph fail here ("index out of bounds").
    """
    from transformers import CompileConfig

    compile_config = CompileConfig(mode="max-autotune", dynamic=False)
    compile_config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=compile_config)


def variants(model: DecoderLM, new_tokens: int, use_compile: bool) -> dict[str, Runner]:
    """Every configuration timed: name -> runner, for each dtype this machine runs natively.

    bf16 is timed only where the CPU has AVX-512 BF16 or AMX; elsewhere it is emulated
    (about 1 GFLOP/s on an AVX2 CPU) and neither library would be run that way.
    Each dtype gets its own copies of the weights.
    """
    runners: dict[str, Runner] = {}
    for dtype_name in fast_dtypes():
        runtime = Runtime.resolve("cpu", dtype_name)
        ours = copy.deepcopy(model).to(runtime.dtype)
        runners[f"lmforge {dtype_name}"] = lmforge_runner(ours, runtime, new_tokens)
        layouts = load_layouts(ours, runtime.dtype)
        for name, laid_out in layouts.items():
            runners[f"lmforge {dtype_name}, {name}"] = lmforge_runner(laid_out, runtime, new_tokens)
        if dtype_name == "bf16":
            runners["lmforge fp32 weights + bf16 autocast"] = lmforge_runner(model, runtime, new_tokens)
        runners[f"transformers {dtype_name}"] = hf_runner(llama_twin(model).to(runtime.dtype), new_tokens)
        if use_compile:
            step = CompiledDecodeStep(ours)
            runners[f"lmforge {dtype_name} + compiled decode step"] = lmforge_runner(ours, runtime, new_tokens, step)
            print(f"compiling the lmforge {dtype_name} decode step for batch 1: {step.warm_up(1):.0f}s")
            check_compiled_step(model, ours, step, prompt_len=16)
            if "load layout, bf16 dot kernel" in layouts:  # what `lmforge generate --compile` runs on such a CPU
                laid_out = layouts["load layout, bf16 dot kernel"]
                step = CompiledDecodeStep(laid_out)
                runners[f"lmforge {dtype_name}, load layout, bf16 dot kernel + compiled decode step"] = \
                    lmforge_runner(laid_out, runtime, new_tokens, step)
                print(f"compiling the same with the bf16 dot kernel: {step.warm_up(1):.0f}s")
                check_compiled_step(model, laid_out, step, prompt_len=16)
            hf_static = llama_twin(model).to(runtime.dtype)
            runners[f"transformers {dtype_name} static cache + compile"] = hf_runner(
                hf_static, new_tokens, **hf_compile_kwargs())
    if "bf16" not in fast_dtypes():
        # Without native bf16, 16-bit weights can still halve the bytes a step reads:
        # stored in 16 bits, widened to fp32 in the compiled step (lmforge.quant.weight_only).
        # transformers' nearest configuration is a model cast to fp16, whose CPU matmuls
        # take fp16 inputs (emulated bf16 would be far slower).
        runners["transformers fp16 weights and arithmetic"] = hf_runner(llama_twin(model).half(), new_tokens)
        if use_compile:
            for weights in ("fp16", "bf16"):
                small = quantize_weights(copy.deepcopy(model), weights)
                step = CompiledDecodeStep(small)
                runners[f"lmforge fp32 + {weights} weights + compiled decode step"] = lmforge_runner(
                    small, None, new_tokens, step)
                print(f"compiling the lmforge {weights}-weight decode step for batch 1: {step.warm_up(1):.0f}s")
                check_compiled_step(model, small, step, prompt_len=16)
    return runners


def load_layouts(model: DecoderLM, dtype: torch.dtype) -> dict[str, DecoderLM]:
    """Copies of ``model`` in the layout ``lmforge.load`` gives it (fused q/k/v and gate/up, packed weights:
    lmforge.model.fused.inference_layout), eager; bf16 on a CPU with AVX-512 BF16 both ways, oneDNN's packed
    products and lmforge's dot-product kernel (lmforge.quant.kernels.bf16_linear), side by side."""
    from lmforge.model.fused import inference_layout

    if not (dtype == torch.bfloat16 and kernels.bf16_dots()):
        return {"load layout": inference_layout(copy.deepcopy(model), dtype, "cpu")}
    copies = {}
    for name, choice in (("load layout, oneDNN products", "off"), ("load layout, bf16 dot kernel", "on")):
        with mock.patch.dict(os.environ, LMFORGE_BF16_KERNEL=choice):  # read when the weights are laid out
            copies[name] = inference_layout(copy.deepcopy(model), dtype, "cpu")
    return copies


INTEGER_SPECS = {"int8": QuantSpec(8), "int4 (symmetric, group 32)": QuantSpec(4, "symmetric", "group", 32),
                 "int8 W8A8 (activations per 32 inputs)": QuantSpec(8, activations="group"),
                 "int4 W4A8 (symmetric, group 32, activations per 32 inputs)": QuantSpec(4, "symmetric", "group", 32,
                                                                                         activations="group")}


def integer_variants(model: DecoderLM, new_tokens: int) -> dict[str, Runner]:
    """lmforge's compiled decode step with 16-bit weights (the path integer weights must beat) and with
    each integer method of INTEGER_SPECS (lmforge.quant.integer, the C++ kernels of lmforge.quant.kernels)."""
    from lmforge.model.fused import fuse_projections, interleave_integer_layers

    print(f"integer kernels: {kernels.isa()} (best on this CPU: {kernels.best_isa()})")
    runners: dict[str, Runner] = {}
    small = quantize_weights(copy.deepcopy(model), "fp16")
    variants = [("lmforge fp16 weights + compiled decode step", small, False)]
    for name, spec in INTEGER_SPECS.items():
        quantized = copy.deepcopy(model)
        quantize_model(quantized, spec)
        fuse_projections(quantized)
        if spec.activations != "none":  # the fastest two: also their kernels called from C++ (--compile-cpp),
            # and, where the CPU has AVX-512 VNNI, with codes interleaved as lmforge.load gives them
            variants.append((f"lmforge {name} + compiled decode step, C++ wrapper", copy.deepcopy(quantized), True))
            if interleave_integer_layers(quantized):
                variants.append((f"lmforge {name} interleaved + compiled decode step, C++ wrapper",
                                 copy.deepcopy(quantized), True))
        variants.append((f"lmforge {name} + compiled decode step", quantized, False))
    for name, candidate, cpp_wrapper in variants:
        step = CompiledDecodeStep(candidate, max_autotune=False, cpp_wrapper=cpp_wrapper)
        print(f"compiling {name}: {step.warm_up(1):.0f}s", flush=True)
        check_compiled_step(model, candidate, step, prompt_len=16)
        runners[name] = lmforge_runner(candidate, None, new_tokens, step)
    return runners


def check_compiled_step(model: DecoderLM, fast_model: DecoderLM, step: CompiledDecodeStep, prompt_len: int) -> None:
    """Teacher-force one fp32 greedy sequence through the eager and the compiled step of
    ``fast_model`` (a copy of ``model`` in the dtype timed); print each one's largest logit
    error against the fp32 model and how often its argmax agrees.

    Comparing free-running greedy outputs would say little: one flipped near tie
    changes the rest of a row, and bf16 kernels that round differently flip some.
    """
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    new = generate(model, prompt.tolist(), SamplingConfig(max_new_tokens=64, temperature=0))[0]
    sequence = torch.cat([prompt, torch.tensor([new])], dim=1)  # (1, T + 64)
    with torch.inference_mode():
        reference = model(sequence)[0, prompt_len - 1:-1]  # (64, V): the logits that chose each new token
        for name, run in (("eager", fast_model), ("compiled", step)):
            cache = KVCache.for_model(fast_model, 1, fast_model.config.max_seq_len)
            logits = [fast_model(sequence[:, :prompt_len], cache)[0, -1]]
            for t in range(prompt_len, sequence.shape[1] - 1):
                logits.append(run(sequence[:, t:t + 1], cache)[0, -1])
            got = torch.stack(logits).float()  # (64, V)
            error = (got - reference).abs().max().item()
            same = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
            kind = fast_model.embed.weight.dtype if hasattr(fast_model.embed, "weight") else "integer"
            print(f"  {name} {kind} decode step vs fp32 model: "
                  f"max |logit diff| {error:.2e}, same argmax {same:.0%}")


def time_variants(runners: dict[str, Runner], prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Median ms per new token of each runner; one warm-up call each (compilation happens there)."""
    for name, run in runners.items():
        start = time.perf_counter()
        run(prompt)
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f}s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            out = run(prompt)
            times[name].append((time.perf_counter() - start) * 1000 / new_tokens)
            assert all(len(row) == new_tokens for row in out), name
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat, no torch.compile")
    parser.add_argument("--model", default="llama-42m", help="a preset (random weights) or any model lmforge "
                                                            "loads: checkpoint, HF directory, .gguf, packaged name")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--llama-cpp-python", help="a Python that has llama-cpp-python: also time llama.cpp "
                                                   "at batch 1 on the same weights, exported to GGUF")
    parser.add_argument("--integer", action="store_true", help="batch 1 only: lmforge's int8, int4 and W8A8 "
                        "decode steps against its 16-bit one and llama.cpp's f16, q8_0 and q4_0 files")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.no_compile = 32, 1, True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model in PRESETS:
        model = DecoderLM(preset(args.model)).eval()
    else:
        model = load_model(args.model).eval()
    hf = llama_twin(model)
    prompt = torch.randint(0, model.config.vocab_size, (2, args.prompt_len))
    check_same_model(model, hf, prompt, 16)
    print(f"machine: {machine()}; {args.model} ({model.num_parameters() / 1e6:.1f}M parameters), "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    if args.integer:
        args.batch_sizes = [1]
        runners = integer_variants(model, args.new_tokens)
    else:
        runners = variants(model, args.new_tokens, use_compile=not args.no_compile)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        others = llama_cpp_runners(model, args, Path(tmp)) if args.llama_cpp_python else {}
        for batch in args.batch_sizes:
            print(f"batch {batch}:", flush=True)
            batch_prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len))
            results[batch] = time_variants({**runners, **(others if batch == 1 else {})}, batch_prompt,
                                           args.new_tokens, args.repeats)
    print_table(results)


def llama_cpp_runners(model: DecoderLM, args: argparse.Namespace, folder: Path) -> dict[str, Runner]:
    """llama.cpp on the same weights (f32 and f16 GGUF), batch 1, served by a process in its own environment.

    The prompt goes over a pipe as token ids and the greedy tokens come back, so these
    runners time like the others (prefill included) and interleave with them.
    """
    import json
    import subprocess
    from pydoc_data.topics import topics

    from lmforge.interop.gguf import save_gguf
    from lmforge.tokenizer import train_tokenizer

    # llama.cpp refuses a file without a vocabulary: any byte-level BPE will do (ids
    # above its size are written as unused placeholders), the prompt is token ids.
    tokenizer = train_tokenizer(list(topics.values()), 2048)
    kinds = ("f16", "q8_0", "q4_0") if args.integer else ("f32", "f16")
    paths = []
    for kind in kinds:
        paths.append(folder / f"model-{kind}.gguf")
        save_gguf(paths[-1], model.config, dict(model.state_dict()), tokenizer, kind)
    server = subprocess.Popen([args.llama_cpp_python, str(Path(__file__).parent / "llama_cpp_decode.py"),
                               str(torch.get_num_threads()), str(model.config.max_seq_len), *map(str, paths)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if server.stdout.readline().strip() != "ready":
        raise SystemExit("the llama.cpp process did not start")

    def runner(index: int) -> Runner:
        def run(prompt: torch.Tensor) -> list[list[int]]:
            if prompt.shape[0] != 1:
                raise ValueError("llama.cpp is timed at batch 1")
            server.stdin.write(json.dumps({"model": index, "prompt": prompt[0].tolist(),
                                           "new_tokens": args.new_tokens}) + "\n")
            server.stdin.flush()
            return [json.loads(server.stdout.readline())["tokens"]]
        return run

    runners = {f"llama.cpp, {kind} GGUF": runner(i) for i, kind in enumerate(kinds)}
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
    ours = generate(model, prompt.tolist(), SamplingConfig(max_new_tokens=args.new_tokens, temperature=0))[0]
    for name, run in runners.items():
        theirs = run(prompt)[0]
        agree = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), len(ours))
        print(f"{name}: greedy tokens equal lmforge fp32's for the first {agree} of {len(ours)}")
    return runners


def print_table(results: dict[int, dict[str, float]]) -> None:
    names = list(dict.fromkeys(name for row in results.values() for name in row))
    batches = list(results)
    print("\n| configuration | " + " | ".join(f"batch {b} ms/token" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[b][name]:.2f}" if name in results[b] else ""
                                          for b in batches) + " |")
    for b in batches:
        for label, keep in (("same weights", lambda name: "weights" not in name),
                            ("16-bit weights", lambda name: "weights" in name)):
            ours = [(v, k) for k, v in results[b].items() if k.startswith("lmforge") and keep(k)]
            theirs = [(v, k) for k, v in results[b].items() if k.startswith("transformers") and keep(k)]
            if ours and theirs:
                (ours_ms, ours_name), (theirs_ms, theirs_name) = min(ours), min(theirs)
                print(f"batch {b}, {label}: fastest lmforge ({ours_name}) {ours_ms:.2f} ms/token vs fastest "
                      f"transformers ({theirs_name}) {theirs_ms:.2f} ms/token: {theirs_ms / ours_ms:.2f}x")
        w8a8 = "lmforge int8 W8A8 (activations per 32 inputs) + compiled decode step"
        w4a8 = "lmforge int4 W4A8 (symmetric, group 32, activations per 32 inputs) + compiled decode step"
        w8a8_il = w8a8.replace(") +", ") interleaved +") + ", C++ wrapper"
        w4a8_il = w4a8.replace(") +", ") interleaved +") + ", C++ wrapper"
        for ours_name, theirs_name in ((w8a8_il, "llama.cpp, q8_0 GGUF"), (w4a8_il, "llama.cpp, q4_0 GGUF"),
                                       (w8a8 + ", C++ wrapper", "llama.cpp, q8_0 GGUF"),
                                       (w4a8 + ", C++ wrapper", "llama.cpp, q4_0 GGUF"),
                                       ("lmforge fp32 + compiled decode step", "llama.cpp, f32 GGUF"),
                                       ("lmforge fp32 + fp16 weights + compiled decode step", "llama.cpp, f16 GGUF"),
                                       ("lmforge fp16 weights + compiled decode step", "llama.cpp, f16 GGUF"),
                                       ("lmforge int8 + compiled decode step", "llama.cpp, q8_0 GGUF"),
                                       (w8a8, "llama.cpp, q8_0 GGUF"),
                                       ("lmforge int4 (symmetric, group 32) + compiled decode step",
                                        "llama.cpp, q4_0 GGUF"),
                                       (w4a8, "llama.cpp, q4_0 GGUF")):
            if ours_name in results[b] and theirs_name in results[b]:
                ratio = results[b][theirs_name] / results[b][ours_name]
                print(f"batch {b}: {ours_name} vs {theirs_name}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
