"""Weight quantization: 4-bit NormalFloat (NF4) with double quantization, as in QLoRA."""

from lmforge.quant.nf4 import (
    NF4_LEVELS,
    NF4Linear,
    NF4Tensor,
    dequantize_model,
    nf4_levels_from_normal,
    quantize_model_nf4,
)

__all__ = ["NF4_LEVELS", "NF4Linear", "NF4Tensor", "dequantize_model", "nf4_levels_from_normal",
           "quantize_model_nf4"]
