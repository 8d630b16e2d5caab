"""The decoder-only Transformer, its config and presets, its KV cache and FLOP counts."""

from lmforge.model.config import PRESETS, ModelConfig, preset
from lmforge.model.flops import forward_flops_per_token, matmul_parameters, train_flops_per_token
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import DecoderLM

__all__ = ["PRESETS", "DecoderLM", "KVCache", "ModelConfig", "forward_flops_per_token", "matmul_parameters",
           "preset", "train_flops_per_token"]
