"""Parameter-efficient fine-tuning: LoRA adapters (and, over a 4-bit base, QLoRA)."""

from lmforge.peft.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)

__all__ = ["LoRALinear", "LoraConfig", "apply_lora", "load_adapter", "lora_layers", "merge_lora", "save_adapter"]
