"""The Transformer in its three forms (decoder-only, encoder-only, encoder-decoder), its config and
presets, its KV cache and FLOP counts."""

from lmforge.model.config import PRESETS, ModelConfig, preset
from lmforge.model.flops import forward_flops_per_token, matmul_parameters, train_flops_per_token
from lmforge.model.kv_cache import KVCache
from lmforge.model.seq2seq import EncoderDecoderLM
from lmforge.model.transformer import DecoderLM, Transformer


def build_model(config: ModelConfig, attention: str = "sdpa") -> Transformer:
    """The model a config describes: an :class:`EncoderDecoderLM` when it has decoder layers, else a
    :class:`DecoderLM` (a decoder, or an encoder with ``causal=False``)."""
    if config.is_encoder_decoder:
        return EncoderDecoderLM(config, attention=attention)
    return DecoderLM(config, attention=attention)


__all__ = ["PRESETS", "DecoderLM", "EncoderDecoderLM", "KVCache", "ModelConfig", "Transformer", "build_model",
           "forward_flops_per_token", "matmul_parameters", "preset", "train_flops_per_token"]
