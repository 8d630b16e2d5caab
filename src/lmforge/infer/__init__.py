"""Inference: sampling, KV-cached generation, beam search and streaming detokenization."""

from lmforge.infer.beam import BeamResult, beam_search
from lmforge.infer.compiled import CompiledDecodeStep
from lmforge.infer.generate import generate, generate_tokens
from lmforge.infer.sampling import (
                                    SamplingConfig,
                                    apply_repetition_penalty,
                                    sample_next,
                                    top_k_filter,
                                    top_p_filter,
)
from lmforge.infer.stream import StopStrings, TextStream, cut_at_stop

__all__ = ["BeamResult", "CompiledDecodeStep", "SamplingConfig", "StopStrings", "TextStream", "apply_repetition_penalty", "beam_search",
           "cut_at_stop", "generate", "generate_tokens", "sample_next", "top_k_filter", "top_p_filter"]
