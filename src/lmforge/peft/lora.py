"""LoRA: train two small matrices beside each frozen weight (Hu et al., 2021, arXiv:2106.09685).

A linear layer's update during fine-tuning has low rank in practice, so LoRA learns
it as a product: W x + (alpha / r) * B A x, with A (r, in) and B (out, r). B starts
at zero, so training starts from the base model exactly; only A and B train, a few
tenths of a percent of the weights. Afterwards B A can be merged into W (no cost at
inference) and unmerged again.

In lmforge LoRA is a different ``nn.Linear``, not a different model: :func:`apply_lora`
swaps the targeted projections for :class:`LoRALinear` in place, and the one training
loop trains whatever still requires gradients. Adapters are saved in Hugging Face
PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``), which PEFT
loads onto the exported base model.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lmforge.errors import InputError
from lmforge.files import read_json
from lmforge.settings import field

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """Where LoRA goes and how big it is."""

    rank: int = field(8, "rank r of the update B A")
    alpha: float = field(16.0, "scale: the update is multiplied by alpha / rank")
    dropout: float = field(0.0, "dropout on the LoRA branch's input")
    targets: list[str] = field(list(ALL_PROJECTIONS), "names of the linear layers that get an adapter")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(dropout(x)))`` with ``base`` frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)
        out_features, in_features = base.out_features, base.in_features
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self.enabled = True  # off: the layer is its base alone (the reference model of DPO, PPO, GRPO)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta(self) -> torch.Tensor:
        """The update B A * scale, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or not self.enabled:
            return out
        a = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        return out + F.linear(a, self.lora_B.to(x.dtype)) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Add B A into the base weight (inference without the extra matmuls)."""
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze ``model`` and put a LoRA adapter on every linear layer named in ``config.targets``."""
    for param in model.parameters():
        param.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in config.targets and not isinstance(module, LoRALinear)
               and hasattr(module, "in_features")]
    if not targets:
        raise InputError(f"no layer named {', '.join(config.targets)} in the model")
    for name, module in targets:
        model.set_submodule(name, LoRALinear(module, config.rank, config.alpha, config.dropout))
    model.lora_config = config
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model`` computes as its base: every adapter is switched off.

    Preference and RL training need a frozen reference model beside the one that learns; with
    LoRA the reference is the same weights without the adapters, so no second copy is held.
    """
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters are merged into the base weights; unmerge them before switching them off")
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain base layers back."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        model.set_submodule(name, layer.base)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _plain_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s state under a plain :class:`~lmforge.model.DecoderLM`'s keys, one tensor at a time: each
    LoRA adapter merged into its weight (in fp32, computed as it is reached), each NF4 weight dequantized."""
    from lmforge.quant.nf4 import NF4Linear

    dense: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, NF4Linear)) and not any(name.startswith(p + ".") for p in dense):
            dense[name] = module  # a LoRA layer over an NF4 base is made dense as one
    for key, value in model.state_dict().items():
        if not any(key.startswith(prefix + ".") for prefix in dense):
            yield key, value
    for name, module in dense.items():
        if isinstance(module, LoRALinear):
            adapted = module.enabled and not module.merged
            weight = module.base.weight.float() + module.delta() if adapted else module.base.weight
            bias = module.base.bias
        else:
            weight, bias = module.weight, module.bias
        yield name + ".weight", weight
        if bias is not None:
            yield name + ".bias", bias


@torch.no_grad()
def merged_copy(model: nn.Module, dtype: torch.dtype, into: nn.Module | None = None) -> nn.Module:
    """A plain copy of ``model`` (a :class:`~lmforge.model.DecoderLM`) in ``dtype``, every LoRA adapter merged
    into its weight and every 4-bit (NF4) weight dequantized; ``model`` itself is not changed.

    What sampling from a policy in training needs: the copy decodes without the adapters' extra matmuls
    and, in bf16, without autocast casting every fp32 weight at every step. ``into``, an earlier copy of
    the same model, is refreshed in place instead (one pass over the weights, one layer merged at a time)."""
    from lmforge.model import DecoderLM
    from lmforge.model.fused import fuse_projections

    tied = model.config.tie_embeddings
    if into is not None:
        targets = into.state_dict()
        for key, value in _plain_state(model):
            if key in targets and not (tied and key == "lm_head.weight"):
                targets[key].copy_(value)  # cast to the copy's dtype on the way
        return into
    device = next(model.parameters()).device
    state = {key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value
             for key, value in _plain_state(model)}
    with torch.device("meta"):
        copy = DecoderLM(model.config, attention=model.blocks[0].attn.backend)
    if tied:
        state["lm_head.weight"] = state["embed.weight"]
    copy.load_state_dict(state, strict=True, assign=True)
    if tied:
        copy.lm_head.weight = copy.embed.weight
    copy.init_buffers(device)
    fuse_projections(copy)  # a sampling copy: q/k/v and gate/up as one product each (refreshing writes through)
    return copy.eval().requires_grad_(False)


def _peft_module_name(name: str, config) -> str:
    """lmforge module name -> the HF module name PEFT keys use (Llama's; T5's for an encoder-decoder)."""
    if config.is_encoder_decoder:
        from lmforge.interop.t5 import t5_names

        return t5_names(config)[name + ".weight"].removesuffix(".weight")
    from lmforge.interop.llama import llama_names

    return llama_names(config)[name + ".weight"].removesuffix(".weight")


def _peft_scale(name: str, config) -> float:
    """What an adapter's B is multiplied by in PEFT's layout: T5's query weights are lmforge's divided by
    sqrt(head_dim) (lmforge.interop.t5), and so is the update B A of a query adapter; 1 elsewhere."""
    return config.head_dim ** -0.5 if config.is_encoder_decoder and name.endswith("attn.q_proj") else 1.0


def _t5_targets(config) -> dict[str, str]:
    """T5's projection names -> lmforge's (``q`` -> ``q_proj``, ``wi_0`` -> ``gate_proj``, ...)."""
    from lmforge.interop.t5 import t5_names

    def last(name: str) -> str:
        return name.removesuffix(".weight").rsplit(".", 1)[-1]
    return {last(theirs): last(ours) for ours, theirs in t5_names(config).items() if "_proj" in ours}


def save_adapter(model: nn.Module, out: str | Path, base_model: str = "") -> Path:
    """Write the adapters in PEFT's layout: ``adapter_config.json`` and ``adapter_model.safetensors``; a reward
    model's (``head="score"``) as a sequence-classification adapter that carries its score head. The folder
    is replaced whole (:func:`lmforge.files.new_folder`)."""
    from lmforge.files import new_folder

    config: LoraConfig = model.lora_config
    out = Path(out)
    tensors = {}
    for name, layer in lora_layers(model).items():
        key = "base_model.model." + _peft_module_name(name, model.config)
        tensors[key + ".lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[key + ".lora_B.weight"] = (layer.lora_B.detach() * _peft_scale(name, model.config)).contiguous()
    reward_model = model.config.head == "score"
    seq2seq = model.config.is_encoder_decoder
    targets = sorted(config.targets)
    if seq2seq:  # PEFT names T5's own projections
        ours = {name.rsplit(".", 1)[-1] for name in lora_layers(model)}
        targets = sorted(theirs for theirs, name in _t5_targets(model.config).items() if name in ours)
    if reward_model:  # the score head is new and trained in full: PEFT keeps it as a module to save
        tensors["base_model.model.score.weight"] = model.score.weight.detach().contiguous()
    task = "SEQ_CLS" if reward_model else "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    peft_config = {"peft_type": "LORA", "task_type": task, "r": config.rank,
                   "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                   "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
                   "base_model_name_or_path": base_model, "inference_mode": True,
                   "modules_to_save": ["score"] if reward_model else None, "use_rslora": False, "use_dora": False,
                   "init_lora_weights": True}
    with new_folder(out, "the adapter (the previous one, if any, is kept)", marker=ADAPTER_CONFIG) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    return out


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the adapters saved in ``folder`` (PEFT layout) onto ``model``."""
    folder = Path(folder)
    peft_config, tensors = read_adapter(folder)
    targets = peft_config["target_modules"]
    targets = list(targets) if isinstance(targets, list) else [targets]
    if model.config.is_encoder_decoder:
        names = _t5_targets(model.config)
        targets = [names.get(target, target) for target in targets]
    try:
        config = LoraConfig(rank=peft_config["r"], alpha=peft_config["lora_alpha"],
                            dropout=peft_config.get("lora_dropout", 0.0), targets=targets)
        apply_lora(model, config)
    except (ValueError, InputError) as err:  # a rank or dropout out of range, a target the model lacks
        raise InputError(f"{folder / ADAPTER_CONFIG}: {err}") from err
    for name, layer in lora_layers(model).items():
        key = "base_model.model." + _peft_module_name(name, model.config)
        for part in ("lora_A", "lora_B"):
            weight, target = tensors.get(f"{key}.{part}.weight"), getattr(layer, part)
            if weight is None or weight.shape != target.shape or not weight.is_floating_point():
                found = "nothing" if weight is None else f"{weight.dtype} {list(weight.shape)}"
                raise InputError(f"{folder / ADAPTER_WEIGHTS}: {key}.{part}.weight should be a float tensor of "
                                 f"shape {list(target.shape)}, found {found}")
            scale = _peft_scale(name, model.config) if part == "lora_B" else 1.0
            target.data.copy_(weight / scale)
    return model


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked ``adapter_config.json`` and the tensors of an adapter folder (PEFT layout)."""
    from lmforge.interop.hf import mmap_safetensors

    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"{folder}: no LoRA adapter (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    peft_config = read_json(folder / ADAPTER_CONFIG)
    if peft_config.get("peft_type") != "LORA" or peft_config.get("use_dora") or peft_config.get("use_rslora"):
        raise InputError(f"{folder}: only plain LoRA adapters are read")
    targets = peft_config.get("target_modules")
    rank, alpha, dropout = (peft_config.get(key) for key in ("r", "lora_alpha", "lora_dropout"))
    if not (isinstance(targets, str) or isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)) \
            or not (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank < 2**16) \
            or not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)) \
            or not (dropout is None or isinstance(dropout, (int, float)) and not isinstance(dropout, bool)):
        raise InputError(f"{folder / ADAPTER_CONFIG}: needs target_modules (names), r (a whole number from 1), "
                         f"lora_alpha (a number) and lora_dropout (a number, if given)")
    return peft_config, mmap_safetensors(folder / ADAPTER_WEIGHTS)
