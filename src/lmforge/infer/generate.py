"""Autoregressive decoding: prefill the prompt once, then one token per step.

The fast path keeps a :class:`KVCache`: the prompt goes through the model in one
forward pass that fills the cache, and each later step feeds only the newest token.
``use_cache=False`` recomputes the whole sequence every step; it is slow on purpose
and is the reference the tests compare the cached path against.

Prompts of different lengths are not padded: :func:`generate` decodes each group of
equal-length prompts as one batch and puts the rows back in their order. (Left
padding would need an attention mask in the model, which it does not take; grouping
gives the same tokens as decoding each prompt alone.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from lmforge.infer.sampling import SamplingConfig, make_generator, sample_next
from lmforge.model import DecoderLM, KVCache
from lmforge.runtime import Runtime

DecodeStep = Callable[[torch.Tensor, KVCache], torch.Tensor]  # e.g. a CompiledDecodeStep of the model


def forward_last(model: DecoderLM, input_ids: torch.Tensor, cache: KVCache | None, runtime: Runtime | None,
                 step: DecodeStep | None = None) -> torch.Tensor:
    """The logits at the last position, in fp32. input_ids (B, T) -> (B, V).

    ``step`` (a compiled version of ``model``), when given, runs instead of the model.
    A prompt's pass puts only its last position through the output layer, the largest
    matrix of a small model: SmolLM2's 49k-token layer for 15 more positions of a 16-token
    prompt was an eighth of that pass with int4 weights.
    """
    with torch.inference_mode(), autocast_for(model, runtime):
        if step is None and input_ids.shape[1] > 1 and isinstance(model, DecoderLM) and \
                model.config.head not in ("score", "hidden"):
            return model.logits(model(input_ids, cache, return_hidden=True)[:, -1]).float()
        return (step or model)(input_ids, cache)[:, -1].float()


def cache_for(model: DecoderLM, batch_size: int, length: int, step: DecodeStep | None) -> KVCache:
    """A cache for ``length`` positions; for a compiled step always ``max_seq_len``, so its shape never changes.
    A model that keeps more than keys and values (an encoder-decoder's decoder) makes its own (``new_cache``)."""
    if hasattr(model, "new_cache"):
        return model.new_cache(batch_size, length)
    return KVCache.for_model(model, batch_size, model.config.max_seq_len if step is not None else length)


def autocast_for(model: DecoderLM, runtime: Runtime | None) -> contextlib.AbstractContextManager:
    """Autocast only when the weights are not already in the runtime's dtype.

    Weights cast to bf16 run bf16 matmuls without autocast, and autocast's per-op
    dispatch would only add overhead to every decode step.
    """
    if runtime is None or next(model.parameters()).dtype == runtime.dtype:
        return contextlib.nullcontext()
    return runtime.autocast()


@contextlib.contextmanager
def eval_mode(model: DecoderLM) -> Iterator[None]:
    """Switch off dropout while decoding; restore the model's mode afterwards (e.g. mid-training)."""
    was_training = model.training
    if was_training:  # eval()/train() walk every module: 11% of a SmolLM2 decode step when done each step
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def check_request(model: DecoderLM, prompt_ids: list[list[int]], max_new_tokens: int, use_cache: bool = True,
                  decode_step: DecodeStep | None = None) -> None:
    """Raise ValueError for an empty prompt, one that cannot fit max_new_tokens more tokens,
    or a compiled step without the cache."""
    if decode_step is not None and not use_cache:
        raise ValueError("a compiled decode step needs the KV cache (use_cache=True)")
    limit = model.config.max_seq_len
    for row, prompt in enumerate(prompt_ids):
        if not prompt:
            raise ValueError(f"prompt {row} is empty: give at least one token (e.g. the BOS token)")
        if len(prompt) + max_new_tokens > limit:
            raise ValueError(f"prompt {row} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                             f"that exceeds the model's max_seq_len={limit}")


def decode_steps(model: DecoderLM, prompt: torch.Tensor, config: SamplingConfig, runtime: Runtime | None = None,
                 use_cache: bool = True, decode_step: DecodeStep | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), for ``config.max_new_tokens`` steps.

    prompt (B, T) long, every row the same length. No stopping here: callers decide
    when a row is done. The tokens so far are kept in one preallocated (B, T + N)
    buffer, which also feeds the repetition penalty and the no-cache path.
    ``decode_step`` replaces the model for the one-token steps after the prefill.
    Callers check the request first (:func:`check_request`).
    """
    batch, prompt_len = prompt.shape
    total = prompt_len + config.max_new_tokens
    generator = make_generator(config.seed, prompt.device)
    with torch.inference_mode():
        tokens = torch.empty(batch, total, dtype=torch.long, device=prompt.device)  # (B, T + N)
        tokens[:, :prompt_len] = prompt
        cache = cache_for(model, batch, total, decode_step) if use_cache else None
    logits = forward_last(model, prompt, cache, runtime)  # (B, V)
    length = prompt_len
    for step in range(config.max_new_tokens):
        with torch.inference_mode():
            seen = tokens[:, :length] if config.repetition_penalty != 1.0 else None
            next_token = sample_next(logits, config, generator, seen)  # (B,)
            tokens[:, length] = next_token
        length += 1
        yield next_token
        if step + 1 < config.max_new_tokens:
            # The new token as its own contiguous (B, 1) tensor: a view into `tokens` would
            # have strides that change with the request length, and a compiled step guards on them.
            new_input = next_token[:, None] if use_cache else tokens[:, :length]
            logits = forward_last(model, new_input, cache, runtime, decode_step)


def generate(model: DecoderLM, prompt_ids: list[list[int]], config: SamplingConfig, runtime: Runtime | None = None,
             use_cache: bool = True, decode_step: DecodeStep | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each row (prompt not included).

    A row ends at ``config.max_new_tokens`` tokens or at its first token in
    ``config.stop_token_ids`` (that stop token is not returned). With
    ``config.num_beams > 1`` each prompt is decoded by beam search instead.
    ``runtime`` gives the autocast dtype when the weights are in another one;
    ``decode_step`` (a :class:`CompiledDecodeStep` of ``model``) runs the steps after the prefill.
    """
    check_request(model, prompt_ids, config.max_new_tokens, use_cache, decode_step)
    if config.num_beams > 1:
        from lmforge.infer.beam import beam_search  # beam.py builds on this module

        return [beam_search(model, prompt, config, runtime, decode_step).tokens for prompt in prompt_ids]
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompt_ids):
        by_length.setdefault(len(prompt), []).append(row)
    with eval_mode(model):
        for rows in by_length.values():
            batch = _generate_batch(model, [prompt_ids[r] for r in rows], config, runtime, use_cache, decode_step)
            for row, new_tokens in zip(rows, batch):
                outputs[row] = new_tokens
    return outputs


def _generate_batch(model: DecoderLM, prompt_ids: list[list[int]], config: SamplingConfig,
                    runtime: Runtime | None, use_cache: bool, decode_step: DecodeStep | None) -> list[list[int]]:
    """Decode equal-length prompts as one batch until every row has stopped."""
    device = next(model.parameters()).device
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (B, T)
    stop_ids = set(config.stop_token_ids)
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    running = set(range(len(prompt_ids)))
    for next_token in decode_steps(model, prompt, config, runtime, use_cache, decode_step):
        for row, token in enumerate(next_token.tolist()):
            if row not in running:
                continue  # a stopped row keeps decoding with the batch; its tokens are dropped
            if token in stop_ids:
                running.discard(row)
            else:
                outputs[row].append(token)
        if not running:
            break
    return outputs


def generate_tokens(model: DecoderLM, prompt_ids: list[int], config: SamplingConfig, runtime: Runtime | None = None,
                    use_cache: bool = True, decode_step: DecodeStep | None = None) -> Iterator[int]:
    """An iterator over the new tokens of one prompt, yielded as they are made (for streaming).

    It ends after ``config.max_new_tokens`` tokens or before the first stop token (which
    is not yielded). Closing it early stops the decoding. Bad settings raise here, not
    at the first ``next``.
    """
    if config.num_beams > 1:
        raise ValueError("streaming decodes one token at a time; it cannot use beam search (set num_beams=1)")
    check_request(model, [prompt_ids], config.max_new_tokens, use_cache, decode_step)
    return _stream_tokens(model, prompt_ids, config, runtime, use_cache, decode_step)


def _stream_tokens(model: DecoderLM, prompt_ids: list[int], config: SamplingConfig, runtime: Runtime | None,
                   use_cache: bool, decode_step: DecodeStep | None) -> Iterator[int]:
    device = next(model.parameters()).device
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    stop_ids = set(config.stop_token_ids)
    with eval_mode(model):
        for next_token in decode_steps(model, prompt, config, runtime, use_cache, decode_step):
            token = int(next_token[0])
            if token in stop_ids:
                return
            yield token
