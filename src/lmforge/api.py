"""The small Python API: ``lmforge.load(checkpoint).generate("prompt")``.

    lm = lmforge.load("runs/small")              # device and dtype: "auto"
    print(lm.generate("def fib(n):", max_new_tokens=64, temperature=0.8, stop=["\\n\\n"]))
    for piece in lm.stream("Once upon a time", temperature=0.7):
        print(piece, end="", flush=True)

Keyword arguments are :class:`SamplingConfig` fields. The tokenizer's end-of-text
token always stops generation; stop strings are matched on the decoded text and
are not part of what is returned.

An encoder-decoder (T5's form) reads the prompt with its encoder and writes the reply
with its decoder: ``generate``, ``stream`` and ``chat`` work the same way, through
:mod:`lmforge.infer.seq2seq`, and ``generate_batch`` through the batched engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import CONFIG, load_model, load_tokenizer
from lmforge.errors import InputError
from lmforge.infer.beam import beam_search
from lmforge.infer.compiled import CompiledDecodeStep
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate_tokens
from lmforge.infer.request import Completion, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.seq2seq import (
    ConditionedDecoder,
    beam_search_seq2seq,
    decode_text,
    encode_sources,
    encode_text,
    sentinels_above,
)
from lmforge.infer.speculative import (
    DraftModel,
    FirstGuesses,
    PromptLookup,
    SpeculativeStats,
    check_speculative,
)
from lmforge.infer.stream import StopStrings, TextStream, cut_at_stop
from lmforge.interop.packaged import resolve_model
from lmforge.model import DecoderLM, EncoderDecoderLM
from lmforge.model.fused import inference_layout
from lmforge.quant.weight_only import quantize_weights
from lmforge.runtime import Runtime
from lmforge.tokenizer.chat import end_of_turn_ids, render_chat


@dataclass
class LanguageModel:
    """A model with its tokenizer and runtime, ready to generate text."""

    model: DecoderLM | EncoderDecoderLM
    tokenizer: Any  # lmforge.tokenizer.Tokenizer or anything with encode/decode/bos_id/eos_id
    runtime: Runtime
    decode_step: CompiledDecodeStep | None = None  # the compiled fast path, when loaded with compile=True
    drafter: Any = None  # speculative decoding (generate, stream, chat): a DraftModel or PromptLookup
    draft_tokens: int = 4  # tokens the drafter guesses per pass
    speculative_stats: SpeculativeStats = dataclasses.field(default_factory=SpeculativeStats)  # summed over calls

    def new_tokens(self, prompt_ids: list[int], config: SamplingConfig) -> Iterator[int]:
        """The new tokens of one prompt as they are decoded: speculatively when the model has a drafter
        (the same tokens greedy, the same distribution sampled), else one pass per token."""
        if self.drafter is not None:
            check_speculative(config)
        if self.drafter is not None or (self.encoder_decoder and self.decode_step is not None):
            return self._engine_tokens(prompt_ids, config)  # (an encoder-decoder's compiled step is the engine's)
        if self.encoder_decoder:  # the prompt is the encoder's source; the decoder starts from its start token
            decoder = ConditionedDecoder(self.model, *encode_sources(self.model, [prompt_ids], self.runtime))
            return generate_tokens(decoder, [self.model.config.decoder_start_id], config, self.runtime)
        return generate_tokens(self.model, prompt_ids, config, self.runtime, decode_step=self.decode_step)

    @property
    def encoder_decoder(self) -> bool:
        return self.model.config.is_encoder_decoder

    def _engine_tokens(self, prompt_ids: list[int], config: SamplingConfig) -> Iterator[int]:
        """One request through the batched engine at batch 1: speculative decoding's production path, whose
        checking steps the compiled step runs (:func:`speculative_tokens` is the same on its own, eager), and
        a compiled encoder-decoder's (the engine holds its compiled step)."""
        engine = self.engine(1)
        request = self.request(prompt_ids, config)
        engine.validate(request)  # raises before the generator starts, like generate_tokens
        return self.run_request(engine, request)

    @property
    def draft_width(self) -> int:
        """The guesses a speculative step checks (what ``Engine.warm_up`` compiles for): 0 without a drafter."""
        return self.draft_tokens if self.drafter is not None else 0

    def run_request(self, engine: Engine, request: Request) -> Iterator[int]:
        """The new tokens of ``request`` as ``engine`` (empty of other work) decodes them; its passes and
        guesses are added to :attr:`speculative_stats`. Stopping early aborts the request."""
        stats, before = self.speculative_stats, (engine.stats.decode_steps, engine.stats.drafted, engine.stats.accepted)
        engine.add(request)
        finished = False
        try:
            while not finished:
                for output in engine.step():
                    if output.request_id == request.request_id:
                        finished = output.finished
                        stats.tokens += len(output.token_ids)
                        yield from output.token_ids
        finally:
            if not finished:  # the caller stopped early (a stop string, a closed stream): free the slot
                engine.abort(request.request_id)
                engine.step()
            stats.passes += engine.stats.decode_steps - before[0] + 1  # the prefill gives the first token
            stats.drafted += engine.stats.drafted - before[1]
            stats.accepted += engine.stats.accepted - before[2]

    def sampling_config(self, **sampling: Any) -> SamplingConfig:
        """A SamplingConfig from keyword arguments, with the tokenizer's end-of-text as a stop token."""
        names = {f.name for f in dataclasses.fields(SamplingConfig)}
        unknown = set(sampling) - names
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(names))}")
        config = SamplingConfig(**sampling)
        eos = getattr(self.tokenizer, "eos_id", None)
        if eos is not None and eos not in config.stop_token_ids:
            config.stop_token_ids = [*config.stop_token_ids, eos]
        return config

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Prompt token ids, starting with BOS when the tokenizer has one (an encoder-decoder's source: ending
        with EOS instead, as T5 and span corruption frame it); a list of ids is taken as is."""
        if isinstance(prompt, list):
            return prompt
        if self.encoder_decoder:
            ids, eos = encode_text(self.tokenizer, self.model, prompt), getattr(self.tokenizer, "eos_id", None)
            return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids
        add_bos = getattr(self.tokenizer, "bos_id", None) is not None
        return self.tokenizer.encode(prompt, add_bos=add_bos)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of a conversation in the model's chat format, opening the assistant's turn."""
        return render_chat(self.tokenizer, messages, add_generation_prompt=True).ids

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> str:
        """The assistant's reply to ``messages`` ([{"role", "content"}, ...]); it ends at the end of its turn."""
        return self.generate(self.chat_prompt(messages), **self.chat_sampling(sampling))

    def stream_chat(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """The assistant's reply as text pieces, as :meth:`stream` yields them."""
        return self.stream(self.chat_prompt(messages), **self.chat_sampling(sampling))

    def chat_sampling(self, sampling: dict) -> dict:
        """``sampling`` with the chat format's end-of-turn tokens added to the stop tokens."""
        stops = list(sampling.get("stop_token_ids") or [])
        return {**sampling, "stop_token_ids": stops + [i for i in end_of_turn_ids(self.tokenizer) if i not in stops]}

    def engine(self, max_batch_size: int = 8, context: int | None = None,
               decode_buckets: tuple[int, ...] | None = None, prefix_caching: bool = True) -> Engine:
        """The batched engine over this model (made once per batch size, context, buckets and prefix caching,
        then kept). ``context``: positions per slot (default: the model's ``max_seq_len``); ``decode_buckets``:
        the decode step's batch sizes; ``prefix_caching=False``: every request prefills its whole prompt (see
        :class:`Engine`)."""
        engines = self.__dict__.setdefault("_engines", {})
        key = (max_batch_size, context, decode_buckets, prefix_caching)
        if key not in engines:
            limit = getattr(self.tokenizer, "vocab_size", None)
            if self.encoder_decoder and limit is not None:  # sentinels above the tokenizer's ids may be written
                limit += sentinels_above(self.tokenizer, self.model)
            engines[key] = Engine(self.model, self.runtime, max_batch_size=max_batch_size, context=context,
                                  decode_step=self.decode_step, vocab_limit=limit, decode_buckets=decode_buckets,
                                  prefix_caching=prefix_caching)
        return engines[key]

    def generate_batch(self, prompts: Sequence[str | list[int] | dict[str, Any]], max_batch_size: int = 8,
                       **sampling: Any) -> list[Completion]:
        """Continue many prompts at once through the batched engine; one :class:`Completion` each, in order.

        A prompt is text, token ids, or a dict with ``"prompt"`` (text or ids) or ``"messages"``
        (a chat, answered in the model's chat format) plus any :class:`SamplingConfig` fields
        of its own, which override ``sampling``. Each completion has ``.text`` (cut before any
        stop string), ``.token_ids``, ``.finish_reason`` and token counts.
        """
        items = []
        for index, item in enumerate(prompts):
            own = dict(item) if isinstance(item, dict) else {"prompt": item}
            messages, prompt = own.pop("messages", None), own.pop("prompt", None)
            if (messages is None) == (prompt is None):
                raise ValueError(f"prompt {index}: give either 'prompt' or 'messages'")
            settings = {**sampling, **own}
            if messages is not None:
                ids, settings = self.chat_prompt(messages), self.chat_sampling(settings)
            else:
                ids = self.encode_prompt(prompt)
            items.append((ids, self.sampling_config(**settings)))
        return self.engine(max_batch_size).generate([self.request(ids, config) for ids, config in items])

    def request(self, prompt_ids: list[int], config: SamplingConfig, **fields: Any) -> Request:
        """An engine request for ``prompt_ids``, speculative with a drafter of its own when this model has
        one and ``config`` allows it (no penalties, no beams; else it decodes plainly)."""
        drafter = None
        if self.drafter is not None and fields.get("constraint") is None:
            try:
                check_speculative(config)
                drafter = self.drafter.fork()
            except ValueError:
                pass
        return Request(prompt_ids, config, drafter=drafter, draft_tokens=self.draft_tokens,
                       decode=fields.pop("decode", self.reply_text), **fields)

    def reply_text(self, ids: list[int]) -> str:
        """Generated text without special tokens (a sampled reply may hold one); an encoder-decoder's
        sentinels as ``<extra_id_i>``."""
        if self.encoder_decoder and sentinels_above(self.tokenizer, self.model):
            return decode_text(self.tokenizer, self.model, ids, self._decode)
        return self._decode(ids)

    def _decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special=True)
        except TypeError:  # a minimal tokenizer without the option
            return self.tokenizer.decode(ids)

    def generate(self, prompt: str | list[int], **sampling: Any) -> str:
        """The generated continuation of ``prompt`` (prompt not included), cut before any stop string."""
        config = self.sampling_config(**sampling)
        prompt_ids = self.encode_prompt(prompt)
        if self.drafter is not None:
            check_speculative(config)
        if config.num_beams > 1 and self.encoder_decoder:
            tokens = beam_search_seq2seq(self.model, prompt_ids, config, self.runtime).tokens
            return cut_at_stop(self.reply_text(tokens), config.stop)
        if config.num_beams > 1:
            tokens = beam_search(self.model, prompt_ids, config, self.runtime, self.decode_step).tokens
            return cut_at_stop(self.reply_text(tokens), config.stop)
        tokens: list[int] = []
        detector = _StopDetector(self.reply_text, config.stop)
        for token in self.new_tokens(prompt_ids, config):
            tokens.append(token)
            if detector.push(token):
                break
        return cut_at_stop(self.reply_text(tokens), config.stop)

    def stream(self, prompt: str | list[int], **sampling: Any) -> Iterator[str]:
        """Yield the continuation as text pieces as they are decoded.

        A piece is only yielded once its characters are complete (never half a UTF-8
        character) and once it cannot be the start of a stop string. The pieces
        concatenate to ``generate(prompt, **sampling)`` for the same settings and seed.
        """
        config = self.sampling_config(**sampling)
        text_stream, stops = TextStream(self.reply_text), StopStrings(config.stop)
        tokens = self.new_tokens(self.encode_prompt(prompt), config)
        try:
            for token in tokens:
                piece, stopped = stops.push(text_stream.push(token))
                if piece:
                    yield piece
                if stopped:
                    return
        finally:
            tokens.close()
        piece, stopped = stops.push(text_stream.flush())
        tail = piece if stopped else piece + stops.flush()
        if tail:
            yield tail


class _StopDetector:
    """True once the text decoded so far contains a stop string (complete characters only)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.text_stream, self.stops = TextStream(decode), StopStrings(stops)

    def push(self, token: int) -> bool:
        if not self.stops.stops:
            return False
        return self.stops.push(self.text_stream.push(token))[1]


def load(path: str | Path, device: str = "auto", dtype: str = "auto", attention: str = "sdpa",
         compile: bool = False, weights: str = "fp32", autotune: bool = True, draft: str | Path | None = None,
         prompt_lookup: int = 0, draft_layers: int = 0, draft_tokens: int = 4,
         compile_prefill: bool = False, compile_cpp: bool = False) -> LanguageModel:
    """Load a checkpoint directory (or a file inside one) for inference.

    ``device``/``dtype`` as in :meth:`Runtime.resolve`. When the dtype is not fp32 the
    weights themselves are cast to it: on a CPU with AVX-512 BF16, decoding with bf16
    weights is faster than fp32 weights and than fp32 weights under bf16 autocast
    (see benchmarks/decode.py). ``compile=True`` compiles the decode step
    (:class:`CompiledDecodeStep`): 2.45x fewer ms per token than eager fp32 for llama-42m
    on a 2-core AVX2 CPU, after a compilation of 44-90 s on the first call of each batch
    size (docs/BENCHMARKS.md). ``weights="fp16"`` or ``"bf16"`` stores the weights in 16
    bits and keeps the arithmetic in fp32 (:mod:`lmforge.quant.weight_only`): half the
    memory, and with ``compile=True`` fewer ms per token on CPUs without native bf16.
    ``autotune=False`` compiles each batch size in about half the time and gains less
    (what `lmforge serve --compile` and `lmforge eval --compile` use: they compile every
    batch bucket of the engine before the first request). ``compile_prefill=True`` (with
    ``compile``) also compiles the batched engine's pass that admits new prompts beside the
    decoding rows: one more graph, every size in it symbolic (SmolLM2 on 2 cores: 1-2 minutes
    more), and each admission about a third cheaper; for servers and long evaluations. An
    encoder-decoder compiles its decode steps (the batched engine's; ``generate`` and ``stream``
    then run through the engine at batch 1, beam search stays eager); its encoder and the passes
    that admit new sources run eagerly.
    ``compile_cpp=True`` (with ``compile``) runs the compiled step's kernels from C++ rather than
    Python (:class:`CompiledDecodeStep` ``cpp_wrapper``): 5-11% fewer ms a token where the step is
    short (small models, int4 weights), twice the compile time.

    Speculative decoding (:mod:`lmforge.infer.speculative`) for ``generate``, ``stream``
    and ``chat``: ``draft`` a smaller model with the same tokenizer that guesses
    ``draft_tokens`` tokens per pass (with ``compile``, its one-token steps are compiled too);
    ``draft_layers`` > 0, the model's own first ``draft_layers`` layers as the draft; and/or
    ``prompt_lookup`` > 0 to guess from matches of the last ``prompt_lookup`` tokens (then
    fewer) earlier in the prompt and output (with a draft: lookup first, the draft where it
    finds no match; :class:`FirstGuesses`).
    """
    if compile_prefill and not compile:
        raise InputError("compile_prefill (--compile-prefill) compiles the engine's prefill pass beside the decode "
                         "step: it needs compile (--compile)")
    if compile_cpp and not compile:
        raise InputError("compile_cpp (--compile-cpp) changes how the compiled step runs: it needs compile (--compile)")
    path = resolve_model(path)
    if path.suffix != ".gguf" and (path.is_file() or (not (path / CONFIG).exists() and path.suffix)):
        path = path.parent  # a file inside a checkpoint folder
    if weights != "fp32" and dtype == "auto":
        dtype = "fp32"  # 16-bit storage means fp32 arithmetic, even where "auto" would pick bf16
    runtime = Runtime.resolve(device, dtype, attention)
    model = load_model(path, device=runtime.device, attention=runtime.attention)
    if not model.config.causal:
        raise InputError(f"{path} is an encoder (every token sees the whole text): it does not generate; "
                         "load it with lmforge.embed.load for embeddings")
    if model.config.is_encoder_decoder and (compile_prefill or draft is not None or prompt_lookup or draft_layers
                                            or weights != "fp32"):
        raise InputError(f"{path} is an encoder-decoder: it generates with fp32 or --dtype weights, its decode "
                         "steps compiled or eager; 16-bit weight storage, speculative decoding and a compiled "
                         "prefill (--compile-prefill) are for decoder-only models")
    if model.config.head != "lm":
        raise InputError(f"{path} has the {model.config.head!r} head (a reward model), not next-token logits: "
                         "load it with lmforge.checkpoint.load_model and score with lmforge.model.heads")
    if weights != "fp32":
        if runtime.dtype != torch.float32:
            raise InputError(f"weights={weights!r} keeps the arithmetic in fp32; it does not combine with "
                             f"dtype {runtime.dtype} (use dtype='fp32', or the dtype alone)")
        quantize_weights(model, weights)
    elif runtime.dtype != torch.float32:
        model = model.to(runtime.dtype)
    model.eval()
    inference_layout(model, runtime.dtype, runtime.device)  # fused projections, packed weights (model/fused.py)
    decode_step = CompiledDecodeStep(model, max_autotune=autotune, prefill=compile_prefill,
                                     cpp_wrapper=compile_cpp) if compile else None
    lm = LanguageModel(model, load_tokenizer(path), runtime, decode_step, draft_tokens=draft_tokens)
    if draft is not None and draft_layers:
        raise InputError("choose one draft: a draft model or the model's first layers")
    if draft_tokens < 1:
        raise InputError(f"draft_tokens must be at least 1, got {draft_tokens}")
    guessers = [PromptLookup(ngram=prompt_lookup)] if prompt_lookup else []
    if draft_layers:
        try:
            guessers.append(DraftModel.first_layers(model, draft_layers, runtime))
        except ValueError as err:
            raise InputError(str(err)) from err
    elif draft is not None:
        guessers.append(load_draft(draft, lm.tokenizer, path, device=device, dtype=dtype, attention=attention,
                                   weights=weights, compile=compile, autotune=autotune))
    if guessers:  # prompt lookup and a draft: lookup's guesses where it has some, the draft's elsewhere
        lm.drafter = guessers[0] if len(guessers) == 1 else FirstGuesses(guessers)
    return lm


def load_draft(path: str | Path, tokenizer, target: str | Path, **options: Any) -> DraftModel:
    """A draft model for speculative decoding: ``path`` loaded as :func:`load` does (``options``: its device,
    dtype, weights, compile ...; with ``compile`` its one-token steps are compiled), after checking that it
    has ``tokenizer``, the one of the model it drafts for (``target``, named in the error)."""
    helper = load(path, **options)
    check_same_tokenizer(tokenizer, helper.tokenizer, target, path)
    return DraftModel(helper.model, helper.runtime, helper.decode_step)


PROBE = "Speculative decoding needs one tokenizer: 123 + 4.5 = ?\n 中文 ünïcode <|im_start|>"


def check_same_tokenizer(ours, theirs, path, draft) -> None:
    """A draft model must cut text into the same ids as the model it drafts for (InputError if not)."""
    def signature(tokenizer):
        return (getattr(tokenizer, "vocab_size", None), getattr(tokenizer, "eos_id", None),
                tokenizer.encode(PROBE))

    if signature(ours) != signature(theirs):
        raise InputError(f"the draft model {draft} has another tokenizer than {path}: speculative decoding needs "
                         "both to use the same token ids")
