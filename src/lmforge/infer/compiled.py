"""A compiled one-token decode step: the fast path on CPUs.

At batch 1 a decode step multiplies a single vector by every weight matrix; the eager
bf16 kernels for that shape reach only a fraction of the memory bandwidth. Inductor
with ``freezing`` (weights become constants it may prepack) and ``max_autotune``
(it benchmarks its own C++ GEMM micro-kernels against oneDNN) generates much faster
ones: 2.5-3x fewer ms per token than eager bf16 for llama-42m at batch 1 on a 2-core
AVX-512 BF16 CPU (benchmarks/decode.py).

The steps of one new token (and the batched engine's speculative steps of 1 + k) are
compiled; a prefill runs eagerly, since its length changes with every prompt, unless the
step is made with ``prefill=True``: then the batched engine's packed pass, which admits
new prompts beside the decoding rows, runs as one more graph whose every size is symbolic
(:meth:`CompiledDecodeStep.packed`). The cache is then always allocated at the model's
``max_seq_len``, so its shape, and the compiled graph, stay the same across calls.

Frozen means frozen: the compiled step keeps the weights it saw when it compiled.
Compile again after changing the model (e.g. after more training).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from lmforge.model import DecoderLM, KVCache

RECOMPILE_LIMIT = 64  # graphs kept for DecoderLM.forward: one per model, batch size and step width
# The cache position, symbolic from the first compile: Dynamo would otherwise compile once for
# the position it first sees, then again, symbolic, at the next one (twice the warm-up).
CACHE_LENGTH = "L['cache'].length,L['cache'].kv_len"


# Inductor's settings for every compiled step and packed pass:
# - freezing: the weights become constants it may prepack;
# - the autotuner's tables of kernel timings are not printed;
# - emulate_precision_casts: where the eager code rounds to bf16 (or fp16), so does the graph. Left alone,
#   Inductor fused a residual add with the RMSNorm after it and, in a one-token graph, squared the fp32 sum
#   before its rounding, while in a (1, 5) graph it stored the rounded sum first and squared that (as eager
#   code does). The rows of a speculative check then rounded otherwise than the one-token steps they stand
#   for: on SmolLM2 in bf16, keys parted from layer 4 on at every row, and greedy replies with prompt lookup
#   parted from plain ones in 3 of 12 prompts (12 of 12 the same with it; docs/BENCHMARKS.md). No effect in fp32.
INDUCTOR = {"freezing": True, "autotune_num_choices_displayed": 0, "emulate_precision_casts": True}


# Guards Dynamo keeps on the model's modules: which weights (by identity), the config
# values the graph was specialized on, and aliasing between inputs.
_MODULE_GUARDS_KEPT = {"ID_MATCH", "EQUALS_MATCH", "DUPLICATE_INPUT"}


def _guards_worth_checking(entries) -> list[bool]:
    """Which of Dynamo's guards to check on every call.

    Dynamo guards each submodule's type, attribute dicts and (empty) hook dicts, about a
    thousand checks for a 30-layer model: 1.5 ms per token, 8% of its step. A frozen
    step cannot follow changes to the model anyway (compile again after one), so those
    go. What stays: every guard on the cache and the input; the identity of each weight,
    because every DecoderLM shares one code object and without it a second model of the
    same shape would run the first one's graph (tested); the config values used.
    """
    return [not entry.orig_guard.source.is_unspecialized_nn_module() or entry.guard_type in _MODULE_GUARDS_KEPT
            for entry in entries]


def _default_stance() -> bool:
    """Whether Dynamo runs under its default stance (no caller has set another one). Read from Dynamo's private
    ``eval_frame._stance`` (torch 2.13 has no public getter): where a later torch lacks it, this says no and every
    call takes :meth:`CompiledDecodeStep._run`'s patched path, slower by ~0.25 ms but the same."""
    from torch._dynamo import eval_frame

    stance = getattr(eval_frame, "_stance", None)
    return stance is not None and stance.stance == "default" and not stance.skip_guard_eval_unsafe


class CompiledDecodeStep:
    """``step(input_ids (B, T), cache) -> logits (B, T, V)``, the model's forward compiled: T = 1 for a
    decode step, 1 + k for the batched engine's speculative steps (k guesses a row).

    ``max_autotune=False`` compiles in half the time and gains less (1.6x rather than
    2.5-3x for llama-42m). ``cpp_wrapper=True`` has Inductor call the graph's kernels from
    C++ instead of a generated Python function: with int4 weights (W4A8) 5-8% fewer ms a step
    for llama-42m and 11% for SmolLM2-135M, whose first compile took 51 s against 22 (2 cores,
    Intel AMX; benchmarks/decode.py --integer). Each new batch size compiles one more graph (the cache position
    is symbolic from the start): SmolLM2-135M in bf16 at batch 16 without autotuning, 62 s
    on a 2-core CPU (112 s when the position was first compiled as a constant).
    """

    def __init__(self, model: DecoderLM | nn.Module, max_autotune: bool = True, prefill: bool = False, cpp_wrapper: bool = False):
        self.model, self.prefill, self.cpp_wrapper, self.max_autotune = model, prefill, cpp_wrapper, max_autotune
        # (torch.compile takes a mode or options, not both: the mode goes in as its options.)
        from torch._inductor import list_mode_options

        options = dict(list_mode_options("max-autotune" if max_autotune else "default"))
        options["guard_filter_fn"] = _guards_worth_checking
        self.compiled = torch.compile(model, options=options)
        self._compiled_before = False  # whether a call has compiled (or run) a graph: see _run

    def around(self, module) -> CompiledDecodeStep:
        """The same step (same options) compiling ``module`` instead: the batched engine's decoder of an
        encoder-decoder (:class:`lmforge.infer.seq2seq.SlotDecoder`), which it makes for its slots."""
        return CompiledDecodeStep(module, self.max_autotune, self.prefill, self.cpp_wrapper)

    def __call__(self, input_ids: torch.Tensor, cache: KVCache, **ragged: torch.Tensor) -> torch.Tensor:
        """``ragged``: the batched engine's ``positions`` (B, T) and ``mask`` (B, 1, T, Tk), and an
        encoder-decoder's ``memory_mask`` (B, 1, 1, W), passed on."""
        if cache is None:
            raise ValueError("the compiled step decodes after a prefill: it needs the KV cache")

        def mark() -> None:
            torch._dynamo.mark_static(input_ids, 0)  # a new batch size or width compiles anew, never a dynamic one
            torch._dynamo.mark_static(input_ids, 1)
            if "mask" in ragged:  # the engine's steps: the keys read are symbolic from the first compile, as is
                torch._dynamo.maybe_mark_dynamic(ragged["mask"], 3)  # the cache's kv_len (CACHE_LENGTH)
            if "memory_mask" in ragged:  # the source columns read: symbolic too, so every source length
                torch._dynamo.maybe_mark_dynamic(ragged["memory_mask"], 3)  # runs the same graph

        return self._run(mark, CACHE_LENGTH, input_ids, cache, **ragged)

    def packed(self, input_ids: torch.Tensor, cache, positions: torch.Tensor) -> torch.Tensor:
        """The batched engine's packed pass (new prompts beside the decode rows, :meth:`SlotKVCache.attend`)
        compiled: input_ids and positions (1, N) -> final hidden states (1, N, dim). Every size in it
        (tokens, decode rows, prompts, their lengths, keys read) is symbolic from the first compile, so one
        graph serves every pass that has decode rows (the engine gives each pass at least 2). The engine
        calls it when the step was made with ``prefill=True``.

        Measured (SmolLM2 bf16, 2 cores, Intel AMX, 16 slots): an admission pass of 30-50 new tokens
        beside 16 decode rows 40-58 ms against 63-71 eager, most of what is left the products; the
        graph took 85-120 s to compile, 2-2.5x the decode step's (symbolic sizes cost the tracer)."""

        def mark() -> None:
            for tensor in (input_ids, positions):
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
            cache.mark_dynamic()

        return self._run(mark, None, input_ids, cache, return_hidden=True, positions=positions)

    def _run(self, mark: Callable[[], None], dynamic_sources: str | None, *args, **kwargs) -> torch.Tensor:
        """The compiled model on ``args``, compiling under lmforge's settings when Dynamo must.

        Compilation happens lazily inside a call, and Inductor's settings (INDUCTOR) are only read
        from the global config there (passed in torch.compile's options, freezing is ignored).
        Dynamo keeps its compiled graphs per code object, so every model compiled in this process
        shares DecoderLM.forward's limit (8 by default; each model and batch size takes one): past
        it Dynamo would silently run the step eagerly. ``mark`` marks the inputs' sizes static or
        dynamic, ``dynamic_sources`` names the sources symbolic from the first compile
        (CACHE_LENGTH for a decode step): both matter only when Dynamo compiles.

        Patching those settings cost about 0.2 ms a call and the marks 0.06 ms, together a fifth of
        a W4A8 llama-42m step (docs/BENCHMARKS.md). So once this step has compiled, a call runs its
        graphs under Dynamo's "fail_on_recompile" stance, which raises where Dynamo would compile (a
        new batch size or width, a new model) before the frame runs; only then is the call made
        again, marked, with the settings patched. (A frame run in pieces, around a graph break,
        could be stopped after a piece: lmforge's models trace as one graph.) The stance, like the
        settings, is process-wide (``lmforge serve`` runs every engine from one thread); a stance of the
        caller's own (e.g. ``torch.compiler.set_stance("force_eager")``) is left in force.
        """
        import torch._inductor.config as inductor_config

        if self._compiled_before and _default_stance():
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    return self.compiled(*args, **kwargs)
            except RuntimeError as error:  # the stance's own error (torch 2.13 raises a plain RuntimeError)
                if "Detected recompile" not in str(error):
                    raise
        mark()
        with contextlib.ExitStack() as settings:
            settings.enter_context(inductor_config.patch(cpp_wrapper=self.cpp_wrapper, **INDUCTOR))
            settings.enter_context(torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT))
            if dynamic_sources is not None:
                settings.enter_context(torch.compiler.config.patch(dynamic_sources=dynamic_sources))
            out = self.compiled(*args, **kwargs)
        self._compiled_before = True
        return out

    def warm_up(self, batch_size: int = 1) -> float:
        """Compile for ``batch_size`` now (not in the first generate call); returns the seconds it took.

        Two steps at two cache positions: the first compiles (the position is symbolic from
        the start), the second runs the same graph. An encoder-decoder's step compiles in the
        batched engine that runs it (``Engine.warm_up``; the engine makes it again around its slot
        decoder, :meth:`around`): ValueError here.
        """
        if getattr(self.model.config, "is_encoder_decoder", False):
            raise ValueError("an encoder-decoder's decode step compiles in the batched engine that runs it: "
                             "call Engine.warm_up (e.g. lm.engine(batch_size).warm_up())")
        start = time.perf_counter()
        with torch.inference_mode():
            cache = KVCache.for_model(self.model, batch_size, self.model.config.max_seq_len)
            cache.advance(1)  # as if a one-token prompt had been prefilled
            token = torch.zeros(batch_size, 1, dtype=torch.long, device=cache.keys[0].device)
            for _ in range(2):
                self(token, cache)
        return time.perf_counter() - start
