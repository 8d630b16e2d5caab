"""Inference: sampling, KV-cached generation, beam search, streaming detokenization, the batched
engine (continuous batching, prefix cache) and JSON-constrained decoding."""

from lmforge.infer.beam import BeamResult, beam_search
from lmforge.infer.compiled import CompiledDecodeStep
from lmforge.infer.constrain import JsonConstraint, token_bytes
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate, generate_tokens
from lmforge.infer.request import Completion, Request, RequestOutput, TokenLogprob
from lmforge.infer.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from lmforge.infer.stream import StopStrings, TextStream, cut_at_stop

__all__ = ["BeamResult", "CompiledDecodeStep", "Completion", "Engine", "JsonConstraint", "Request", "RequestOutput",
           "SamplingConfig", "StopStrings", "TextStream", "TokenLogprob", "apply_repetition_penalty", "beam_search",
           "cut_at_stop", "generate", "generate_tokens", "sample_next", "token_bytes", "top_k_filter", "top_p_filter"]
