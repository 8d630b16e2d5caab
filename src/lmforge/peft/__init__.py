"""Parameter-efficient fine-tuning: LoRA adapters (and, over a 4-bit base, QLoRA)."""

from lmforge.peft.lora import (
    LoraConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)

__all__ = ["LoRALinear", "LoraConfig", "adapters_disabled", "apply_lora", "load_adapter", "lora_layers", "merge_lora", "save_adapter"]
