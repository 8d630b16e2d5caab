"""Greedy decoding speed: lmforge's engine against transformers' ``generate()``, same weights.

Builds the ``llama-42m`` preset with random weights and a transformers
``LlamaForCausalLM`` of the same shape, copies the weights across (our RoPE uses the
rotate-half layout of HF Llama, so every matrix copies as is), checks that the two
give the same logits and the same greedy tokens in fp32, then times greedy decoding
of N new tokens after a short prompt, at batch 1 and batch 8.

    python benchmarks/decode.py            # 128 new tokens, 3 repeats
    python benchmarks/decode.py --quick    # 32 new tokens, 1 repeat, no torch.compile

ms/token = wall time of the whole call (prefill included) / new tokens, median of
the repeats. Variants run interleaved (each repeat runs every variant once), so that
a noisy machine slows them alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lmforge.infer import SamplingConfig, generate
from lmforge.model import DecoderLM, preset
from lmforge.runtime import Runtime

Runner = Callable[[torch.Tensor], list[list[int]]]  # prompt (B, T) -> new tokens per row


def build_hf_llama(model: DecoderLM):
    """A transformers LlamaForCausalLM of the same shape holding a copy of ``model``'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf_config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                            num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                            max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                            tie_word_embeddings=c.tie_embeddings, attention_bias=c.bias, mlp_bias=c.bias,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf


def hf_state_dict(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Our parameter names mapped onto HF Llama's."""
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = block.attn_norm.weight
        state[prefix + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[prefix + f"self_attn.{name}.weight"] = getattr(block.attn, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[prefix + f"mlp.{name}.weight"] = getattr(block.ffn, name).weight
    return {k: v.detach().clone() for k, v in state.items()}


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


def lmforge_runner(model: DecoderLM, runtime: Runtime | None, new_tokens: int = 16) -> Runner:
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
    return lambda prompt: generate(model, prompt.tolist(), config, runtime)


def hf_runner(hf, new_tokens: int = 16, **generate_kwargs) -> Runner:
    def run(prompt: torch.Tensor) -> list[list[int]]:
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, **generate_kwargs)
        return out[:, prompt.shape[1]:].tolist()
    return run


def hf_compile_kwargs() -> dict:
    """Static cache and torch.compile for transformers' generate(), which compiles only on GPUs by default."""
    from transformers import CompileConfig

    compile_config = CompileConfig(mode="default", dynamic=False)
    compile_config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=compile_config)


def variants(model: DecoderLM, hf, new_tokens: int, use_compile: bool) -> dict[str, Runner]:
    """Every configuration timed: name -> runner. Models in bf16 are separate copies."""
    bf16 = Runtime.resolve("cpu", "bf16")
    ours_bf16 = DecoderLM(model.config).eval()
    ours_bf16.load_state_dict(model.state_dict())
    ours_bf16.to(torch.bfloat16)
    hf_bf16 = build_hf_llama(model).to(torch.bfloat16)
    runners = {
        "lmforge fp32": lmforge_runner(model, None, new_tokens),
        "lmforge fp32 weights + bf16 autocast": lmforge_runner(model, bf16, new_tokens),
        "lmforge bf16 weights": lmforge_runner(ours_bf16, bf16, new_tokens),
        "transformers fp32": hf_runner(hf, new_tokens),
        "transformers bf16": hf_runner(hf_bf16, new_tokens),
    }
    if use_compile:
        runners["lmforge bf16 weights + torch.compile"] = lmforge_runner(torch.compile(ours_bf16), bf16, new_tokens)
        hf_static = build_hf_llama(model).to(torch.bfloat16)
        runners["transformers bf16 static cache + compile"] = hf_runner(hf_static, new_tokens, **hf_compile_kwargs())
    return runners


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
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.no_compile = 32, 1, True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DecoderLM(preset("llama-42m")).eval()
    hf = build_hf_llama(model)
    prompt = torch.randint(0, model.config.vocab_size, (2, args.prompt_len))
    check_same_model(model, hf, prompt, 16)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; llama-42m ({model.num_parameters() / 1e6:.1f}M parameters), "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    runners = variants(model, hf, args.new_tokens, use_compile=not args.no_compile)
    results = {}
    for batch in args.batch_sizes:
        print(f"batch {batch}:", flush=True)
        batch_prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len))
        results[batch] = time_variants(runners, batch_prompt, args.new_tokens, args.repeats)
    print_table(results)


def print_table(results: dict[int, dict[str, float]]) -> None:
    names = list(next(iter(results.values())))
    batches = list(results)
    print("\n| configuration | " + " | ".join(f"batch {b} ms/token" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[b][name]:.2f}" for b in batches) + " |")
    for b in batches:
        ours = min((v, k) for k, v in results[b].items() if k.startswith("lmforge"))
        theirs = min((v, k) for k, v in results[b].items() if k.startswith("transformers"))
        print(f"batch {b}: fastest lmforge ({ours[1]}) {ours[0]:.2f} ms/token vs fastest transformers "
              f"({theirs[1]}) {theirs[0]:.2f} ms/token: {theirs[0] / ours[0]:.2f}x")


if __name__ == "__main__":
    main()
