"""Encoder-decoder speed: lmforge vs transformers' T5ForConditionalGeneration, same shape, weights and batches.

    python benchmarks/seq2seq.py [--preset t5-small] [--batch-size 16] [--seq-len 256] [--steps 12]
                                 [--source-len 128] [--new-tokens 64] [--gen-batch 1 8]

Training: span-corruption batches (lmforge's stage: 15% hidden in runs of 3), a full
optimizer step each (forward, backward, clipping, the same fused AdamW; lmforge's loss is its
span stage's, transformers' cross entropy over its fp32 logits), in each
precision this machine runs natively; the sides' steps interleaved (each round times one
step of every side), medians. Tokens/s counts the text tokens of each window
(batch x seq-len), the same for both sides. Generation: greedy, ``--new-tokens`` target
tokens for sources of ``--source-len`` tokens, KV-cached on both sides (transformers'
``generate``), at each ``--gen-batch``, with lmforge's sampling loop and its batched engine
(continuous batching, slot cache), lmforge's model in the layout ``lmforge.load`` gives it
(q/k/v and gate/up one product each, the weights' packed copies: lmforge.model.packed), the
three interleaved; the targets are checked equal. ``--compile`` adds compiled sides to both
parts: training with ``torch.compile`` on both sides; generation with lmforge's engine running
its compiled decode step (:class:`CompiledDecodeStep`, what ``lmforge.load(..., compile=True)``
gives an encoder-decoder) against transformers' ``generate`` with a static cache, which
compiles its forward (``CompileConfig``, max-autotune without CUDA graphs), each compiled
before the timing (compile seconds printed apart).
Prints each side's figure and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import fast_dtypes, interleaved, logits_loss, machine, training_step  # noqa: E402

from lmforge.infer.compiled import CompiledDecodeStep  # noqa: E402
from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.request import Request  # noqa: E402
from lmforge.infer.sampling import SamplingConfig  # noqa: E402
from lmforge.infer.seq2seq import generate_seq2seq  # noqa: E402
from lmforge.interop.hf import save_hf  # noqa: E402
from lmforge.model import build_model, preset  # noqa: E402
from lmforge.model.fused import inference_layout  # noqa: E402
from lmforge.runtime import Runtime  # noqa: E402
from lmforge.train.optim import build_optimizer  # noqa: E402
from lmforge.train.span import SpanCorruptionStage, sentinel_ids  # noqa: E402


def t5_twin(model, folder: Path):
    """transformers' T5 holding ``model``'s weights (through lmforge's export), fp32."""
    from transformers import T5ForConditionalGeneration

    state = {k: v for k, v in model.state_dict().items() if not (model.config.tie_embeddings and k == "lm_head.weight")}
    save_hf(folder, model.config, state)
    twin = T5ForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
    twin.generation_config.eos_token_id = None  # decode exactly the tokens asked for, as lmforge does
    return twin


def train_step(model, optimizer, batch: dict, stage: SpanCorruptionStage | None, runtime: Runtime):
    """One step on a span-corruption batch. transformers (``stage`` None): its logits for the targets shifted
    right after the start token 0 (span targets hold no padding), cross entropy over them in fp32; lmforge:
    what ``lmforge pretrain --objective span`` runs, the stage's loss (the same decoder inputs, the output
    layer folded into the loss)."""
    if stage is not None:
        return training_step(model, optimizer, runtime, lambda: stage.loss(model, batch))
    inputs, targets = batch["input_ids"], batch["targets"]
    decoder_inputs = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], dim=1)
    return training_step(model, optimizer, runtime,
                         logits_loss(lambda: model(input_ids=inputs, decoder_input_ids=decoder_inputs).logits, targets))


def time_generation(ours, twin, sources: torch.Tensor, new_tokens: int, repeats: int, compiled: bool
                    ) -> tuple[dict[str, float], int]:
    """(seconds of each side, rows with the same greedy target on all of them) for one batch of sources:
    lmforge's sampling loop, its batched engine and transformers' ``generate``; with ``compiled`` also the
    engine with its decode step compiled and transformers with a static cache and its forward compiled
    (each compiled before the timing)."""
    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
    rows = sources.tolist()
    engines = {"engine": Engine(ours, max_batch_size=len(rows))}
    if compiled:
        engines["engine + compile"] = Engine(ours, max_batch_size=len(rows), decode_buckets=[len(rows)],
                                             decode_step=CompiledDecodeStep(ours))

    def engine_generate(name):
        return lambda: [c.token_ids for c in engines[name].generate([Request(row, greedy) for row in rows])]

    def hf_generate(static):
        options = {}
        if static:
            from transformers import CompileConfig

            config = CompileConfig(mode="max-autotune-no-cudagraphs")  # lmforge's compile mode, as far as it goes
            config._compile_all_devices = True  # transformers compiles on accelerators only unless told
            options = {"cache_implementation": "static", "compile_config": config}
        def run():
            with torch.inference_mode():
                return twin.generate(input_ids=sources, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, **options)[:, 1:].tolist()  # (their start token first)
        return run

    sides = {"loop": lambda: generate_seq2seq(ours, rows, greedy), **{name: engine_generate(name) for name in engines},
             "transformers": hf_generate(False)}
    if compiled:
        sides["transformers + compile"] = hf_generate(True)
        start = time.perf_counter()
        engines["engine + compile"].warm_up()
        middle = time.perf_counter()
        sides["transformers + compile"]()  # its first call compiles
        print(f"  compiled for batch {len(rows)}: lmforge's decode step {middle - start:.0f}s, "
              f"transformers {time.perf_counter() - middle:.0f}s")
    targets = [side() for side in sides.values()]
    same = sum(all(t[i] == targets[0][i] for t in targets) for i in range(len(rows)))
    return {name: median for name, (median, _) in interleaved(sides, repeats).items()}, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="t5-small")
    parser.add_argument("--vocab-size", type=int, default=8192 + 100, help="a tokenizer's 8192 ids + 100 sentinels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256, help="text tokens per training window")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per configuration, interleaved")
    parser.add_argument("--source-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gen-batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per batch size, interleaved")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd training and generation on both sides (lmforge's engine with "
                             "its decode step compiled; transformers with a static cache, its forward compiled)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = preset(args.preset, vocab_size=args.vocab_size, max_seq_len=max(args.seq_len, args.source_len))
    ours = build_model(config)
    folder = Path(tempfile.mkdtemp(prefix="lmforge-t5-"))
    print(f"machine: {machine()}")
    print(f"model: {args.preset}, {ours.num_parameters() / 1e6:.1f}M parameters ({config.num_layers}+"
          f"{config.decoder_layers} layers, dim {config.dim}, {config.activation}, {config.position} positions)")

    if not args.skip_train:
        tokens = torch.randint(16, 8192, (200_000,)).numpy()
        stage = SpanCorruptionStage(tokens, args.seq_len, 0, sentinel_ids(config.vocab_size))
        batch = stage.batch(0, 0, args.batch_size, args.batch_size, torch.device("cpu"))
        print(f"training: batch {args.batch_size} x {args.seq_len} text tokens -> inputs "
              f"{tuple(batch['input_ids'].shape)}, targets {tuple(batch['targets'].shape)}")
        for dtype_name in fast_dtypes():
            runtime = Runtime.resolve("cpu", dtype_name)
            steps = {}
            for side, compiled in [("lmforge", False), ("transformers", False)] + \
                    [("lmforge", True), ("transformers", True)] * args.compile:
                torch.manual_seed(0)
                model = build_model(config)
                if side == "transformers":
                    model = t5_twin(model, folder / "train")
                model.train()
                optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
                step = train_step(torch.compile(model) if compiled else model, optimizer, batch,
                                  None if side == "transformers" else stage, runtime)
                for _ in range(2):  # warmup (and compilation)
                    step()
                steps[side + (" + compile" if compiled else "")] = step
            speeds = {}
            for name, (median, best) in interleaved(steps, args.steps).items():
                speeds[name] = args.batch_size * args.seq_len / median
                print(f"  {name:>24} {dtype_name}: {speeds[name]:8,.0f} tokens/s "
                      f"(best {args.batch_size * args.seq_len / best:,.0f})")
            ratios = [f"eager {speeds['lmforge'] / speeds['transformers']:.2f}x"]
            if args.compile:
                ratios.append(f"compiled {speeds['lmforge + compile'] / speeds['transformers + compile']:.2f}x")
            ours_best = max(v for k, v in speeds.items() if k.startswith("lmforge"))
            theirs_best = max(v for k, v in speeds.items() if k.startswith("transformers"))
            ratios.append(f"fastest of each {ours_best / theirs_best:.2f}x")
            print(f"  training ratio lmforge / transformers ({dtype_name}): {', '.join(ratios)}")

    ours.eval()
    twin = t5_twin(ours, folder / "generate").eval()
    inference_layout(ours, torch.float32, "cpu")  # what lmforge.load gives: fused projections, packed weights
    for batch_size in args.gen_batch:
        sources = torch.randint(16, 8192, (batch_size, args.source_len))
        seconds, same = time_generation(ours, twin, sources, args.new_tokens, args.repeats, args.compile)
        made = batch_size * args.new_tokens
        print(f"generation, batch {batch_size}, source {args.source_len}, {args.new_tokens} new tokens (fp32): "
              f"lmforge {made / seconds['loop']:,.0f} tokens/s, lmforge's batched engine "
              f"{made / seconds['engine']:,.0f}, transformers {made / seconds['transformers']:,.0f} tokens/s, ratios "
              f"{seconds['transformers'] / seconds['loop']:.2f}x and {seconds['transformers'] / seconds['engine']:.2f}x;"
              f" same targets {same}/{batch_size}")
        if args.compile:
            ours_c, theirs_c = seconds["engine + compile"], seconds["transformers + compile"]
            print(f"  compiled: lmforge's engine {made / ours_c:,.0f} tokens/s, transformers (static cache) "
                  f"{made / theirs_c:,.0f} tokens/s, ratio {theirs_c / ours_c:.2f}x; lmforge compiled against "
                  f"transformers eager {seconds['transformers'] / ours_c:.2f}x")


if __name__ == "__main__":
    main()
