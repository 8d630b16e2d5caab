"""Other formats in and out: Hugging Face transformers' layouts (and later GGUF)."""

from lmforge.interop.llama import check_llama_compatible, hf_llama_config, hf_llama_state

__all__ = ["check_llama_compatible", "hf_llama_config", "hf_llama_state"]
