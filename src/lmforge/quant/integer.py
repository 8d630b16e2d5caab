"""Integer weights: int8 and int4, symmetric (absmax) or with a zero point, per tensor, channel or group.

The notes' recipe: map a tensor by its largest magnitude onto the integers and round.

- **symmetric (absmax)**: ``scale = max|w| / qmax`` (qmax = 127 for int8, 7 for int4),
  ``q = clamp(round(w / scale), -qmax, qmax)``; back: ``w' = q * scale``. Zero stays
  exactly zero, half of the int4 codes' range (-8) is left unused.
- **asymmetric (zero point)**: the range [min, max] onto [0, 2^bits - 1]:
  ``scale = (max - min) / (2^bits - 1)``, ``zero = round(-min / scale)``,
  ``q = clamp(round(w / scale) + zero, 0, 2^bits - 1)``; back: ``w' = (q - zero) * scale``.
  A range that is not centred on zero wastes no codes.

One scale (and zero) covers a **tensor**, an output **channel** (a row of the weight
matrix), or a **group** of ``group_size`` consecutive inputs within a row: the smaller
the span, the closer the scale fits the weights it covers, and the more scales there are
to store (one fp32 scale per 128 int4 weights adds 0.25 bits per weight). The rounding
error of one weight is at most scale / 2.

:class:`IntLinear` replaces an ``nn.Linear``: integer codes (int4 packed two to a byte),
fp32 scales and zeros. Its forward pass runs the C++ kernels of :mod:`lmforge.quant.kernels`
for a few rows (decoding), which read the codes as they are; for many rows (a prompt), or
without the kernels, it dequantizes the weight and multiplies (:meth:`IntLinear.reference`,
which the kernels are tested against). Weight-only: activations stay in the model's dtype.

On disk (``lmforge quantize``): the usual checkpoint, where each quantized layer's
``weight`` is replaced by ``qweight`` (int8, or uint8 for asymmetric int8 and for
int4, whose two 4-bit codes share a byte: the even input in the low half), ``scale``
(fp32, (out, groups)) and, asymmetric, ``zero`` (fp32, same shape); and
``quantization.json`` says the method and which layers (:data:`QUANT_FILE`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import InputError
from lmforge.files import read_json
from lmforge.quant import kernels

QUANT_FILE = "quantization.json"
SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("tensor", "channel", "group")
ACTIVATIONS = ("none", "group", "dynamic", "static")
INTERLEAVED = ("il_codes", "il_scale", "il_zero")  # IntLinear's buffers of the VNNI layout (IntLinear.interleave)
ACT_GROUP = 32  # inputs that share an activation scale with activations="group" (llama.cpp's q8_0 blocks)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: bits (8 or 4), scheme, granularity and, per group, the group's width."""

    bits: int = 8
    scheme: str = "symmetric"
    granularity: str = "channel"
    group_size: int = 128
    # int8 activations too (W8A8, W4A8): "group" (each 32 inputs of a row by their absmax), "dynamic" (each
    # row by its absmax) or "static" (one calibrated scale a layer)
    activations: str = "none"

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise InputError(f"unknown activation quantization {self.activations!r}; choose one of "
                             f"{', '.join(ACTIVATIONS)}")
        if self.activations != "none" and self.bits == 8 and self.scheme != "symmetric":
            raise InputError("int8 activations go with symmetric int8 weights (or int4 weights): --scheme symmetric")
        if self.bits not in (4, 8):
            raise InputError(f"bits must be 8 or 4, got {self.bits}")
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown quantization scheme {self.scheme!r}; choose {' or '.join(SCHEMES)}")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and self.group_size < 2:
            raise InputError(f"group_size must be at least 2, got {self.group_size}")

    @property
    def name(self) -> str:
        span = f"group {self.group_size}" if self.granularity == "group" else self.granularity
        acts = {"none": "", "group": f"; int8 activations, per {ACT_GROUP} inputs", "dynamic": "; int8 activations, per row",
                "static": "; int8 activations, calibrated"}
        return f"int{self.bits} {self.scheme}, per {span}{acts[self.activations]}"

    @property
    def act_group(self) -> int:
        """Inputs an activation scale covers: :data:`ACT_GROUP` with ``activations="group"``, else 0 (a row's)."""
        return ACT_GROUP if self.activations == "group" else 0

    def groups(self, in_features: int) -> int:
        """Scales per row of a weight with ``in_features`` inputs."""
        if self.act_group and in_features % self.act_group:
            raise InputError(f"int8 activations in groups of {self.act_group} need layers whose inputs are a multiple "
                             f"of {self.act_group}; one has {in_features} (use --activations int8-row)")
        if self.granularity != "group":
            return 1
        if in_features % self.group_size:
            fits = [size for size in (16, 32, 64, 128, 256) if in_features % size == 0]
            raise InputError(f"group_size {self.group_size} does not divide a layer's {in_features} inputs; "
                             f"choose one that does ({', '.join(map(str, fits)) or 'per channel instead'})")
        return in_features // self.group_size


def quantize_tensor(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes (N, K) int16, scale (N or 1, G) fp32, zero (same) fp32 or None) of a (N, K) weight."""
    w = weight.detach().float()
    rows, cols = w.shape
    groups = spec.groups(cols)
    spans = w.reshape(rows, groups, cols // groups) if spec.granularity != "tensor" else w.reshape(1, 1, -1)
    if spec.scheme == "symmetric":
        scale = spans.abs().amax(-1) / (2 ** (spec.bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero span: any scale works
        zero = None
    else:
        low, high = spans.amin(-1).clamp(max=0), spans.amax(-1).clamp(min=0)  # zero stays representable
        scale = (high - low) / (2 ** spec.bits - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-low / scale)
    codes = round_to_grid(spans, scale[..., None], None if zero is None else zero[..., None], spec.bits)
    return codes.reshape(rows, cols).to(torch.int16), scale, zero


def round_to_grid(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The codes of ``values`` on the grid ``scale`` (and ``zero``), shapes broadcasting: symmetric codes in
    [-(2^(bits-1) - 1), 2^(bits-1) - 1], codes with a zero point in [0, 2^bits - 1] (float tensor)."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(values / scale), -qmax, qmax)
    return torch.clamp(torch.round(values / scale) + zero, 0, 2 ** bits - 1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The fp32 weight (N, K) that integer ``codes`` (N, K) stand for."""
    rows, cols = codes.shape
    groups = scale.shape[-1]
    spans = codes.float().reshape(rows if scale.shape[0] == rows else 1, groups, -1)
    if zero is not None:
        spans = spans - zero[..., None]
    return (spans * scale[..., None]).reshape(rows, cols)


def quantize_activations(x: torch.Tensor, act_scale: torch.Tensor | None,
                         group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8's activations: ``(round(x / s) clamped to [-127, 127], s)``, where s is ``act_scale`` (calibrated),
    each ``group`` inputs' own ``max|x| / 127`` (``group`` > 0, dividing the row), or each row's own; the first
    as fp32 values, the second one per input (``act_scale``: one for all, shaped to broadcast)."""
    if act_scale is not None:
        scale = act_scale.float().reshape(*[1] * x.dim())
    else:  # each span's largest magnitude: groups of inputs, or the whole row (one span)
        spans = x.unflatten(-1, (-1, group or x.shape[-1]))
        scale = (spans.abs().amax(-1, keepdim=True) / 127).expand_as(spans).flatten(-2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x / scale), -127, 127), scale


def int4_offset(spec: QuantSpec) -> int:
    """What int4 codes are shifted by to fit [0, 15]: symmetric codes run from -7, asymmetric from 0."""
    return 8 if spec.scheme == "symmetric" else 0


def pack_int4(codes: torch.Tensor, offset: int) -> torch.Tensor:
    """(N, K) codes in [-offset, 15 - offset] -> (N, K / 2) uint8, the even column in the low 4 bits."""
    shifted = (codes + offset).to(torch.uint8)
    return shifted[:, 0::2] | (shifted[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, offset: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: (N, K / 2) uint8 -> (N, K) int16."""
    low, high = (packed & 0x0F).to(torch.int16), (packed >> 4).to(torch.int16)
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1) - offset


def unpacked(qweight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Stored codes (int8, uint8 or packed int4 rows) as int16 codes, one per weight."""
    return unpack_int4(qweight, int4_offset(spec)) if spec.bits == 4 else qweight.to(torch.int16)


class IntLinear(nn.Module):
    """An ``nn.Linear`` with integer weights (see the module docstring); ``forward`` dequantizes and multiplies."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        if spec.bits == 4 and in_features % 2:
            raise InputError(f"int4 packs two weights a byte: a layer's {in_features} inputs must be even")
        groups = spec.groups(in_features)
        scale_rows = 1 if spec.granularity == "tensor" else out_features
        code_dtype = torch.int8 if spec.bits == 8 and spec.scheme == "symmetric" else torch.uint8
        width = in_features // 2 if spec.bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=code_dtype, device=device))
        self.register_buffer("scale", torch.ones(scale_rows, groups, device=device))
        self.register_buffer("zero", torch.zeros(scale_rows, groups, device=device)
                             if spec.scheme == "asymmetric" else None)
        # W8A8 with calibrated scales: the one scale that maps this layer's inputs onto int8
        self.register_buffer("act_scale", torch.ones(1, device=device) if spec.activations == "static" else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        # W8A8 / W4A8 on a CPU with AVX-512 VNNI: the codes again in the VNNI kernel's layout (`interleave`);
        # not saved, dropped when the codes change or the layer leaves the CPU
        for name in INTERLEAVED:
            self.register_buffer(name, None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> IntLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, spec, linear.weight.device)
        codes, scale, zero = quantize_tensor(linear.weight, spec)
        layer.set_codes(codes, scale, zero)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        self._drop_interleaved()
        if self.spec.bits == 4:
            self.qweight = pack_int4(codes, int4_offset(self.spec))
        else:
            self.qweight = codes.to(self.qweight.dtype)
        self.scale = scale.float().contiguous()
        if zero is not None:
            self.zero = zero.float().contiguous()

    @property
    def offset(self) -> int:
        """The zero every group's stored codes share: int4 symmetric 8, otherwise 0 (see :func:`int4_offset`)."""
        return int4_offset(self.spec) if self.spec.bits == 4 else 0

    def codes(self) -> torch.Tensor:
        """The integer codes (N, K), unpacked."""
        return unpacked(self.qweight, self.spec)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (N, K) the codes stand for (on CPUs in one pass of the C++ kernels, which give the
        same bits as :func:`dequantize`)."""
        if self.qweight.device.type == "cpu" and kernels.available():
            return kernels.dequantize(self.qweight, self.scale, self.zero, self.spec.bits, self.offset)
        return dequantize(self.codes(), self.scale, self.zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        interleaved = self.il_codes is not None and kernels.interleaves() and x.device.type == "cpu"
        if interleaved or kernels.serves(x):  # the interleaved codes' kernel at any number of rows (a prompt too)
            if interleaved:
                y = kernels.int_linear_a8_interleaved(x, self.il_codes, self.il_scale, self.il_zero, self.act_scale,
                                                      self.spec.bits, self.offset, self.spec.act_group,
                                                      self.out_features)
            elif self.spec.activations != "none":
                y = kernels.int_linear_a8(x, self.qweight, self.scale, self.zero, self.act_scale, self.spec.bits,
                                          self.offset, self.spec.act_group)
            else:
                y = kernels.int_linear(x, self.qweight, self.scale, self.zero, self.spec.bits, self.offset)
            y = y.to(x.dtype)
            return y if bias is None else y + bias
        return self.reference(x)

    def interleave(self) -> bool:
        """Keep a second copy of the codes in the layout of the VNNI kernel for int8 activations
        (:func:`lmforge.quant.kernels.interleave`: 16 rows' codes side by side, read about twice as fast at a
        decode step); its bytes are as many as the codes'. Only W8A8 / W4A8 layers on a CPU with AVX-512 VNNI
        whose groups hold whole 32-input activation groups; returns whether the layer has the copy now."""
        K, groups = self.in_features, self.scale.shape[1]
        if (self.spec.activations == "none" or self.qweight.device.type != "cpu" or K % ACT_GROUP
                or (K // groups) % ACT_GROUP or not kernels.interleaves()):
            return False
        self.il_codes, self.il_scale, self.il_zero = kernels.interleave(self.codes(), self.scale, self.zero,
                                                                        self.spec.bits, self.offset)
        return True

    def _drop_interleaved(self) -> None:
        for name in INTERLEAVED:
            self._buffers[name] = None

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The product by dequantizing and multiplying (W8A8: the activations rounded first, see
        :func:`quantize_activations`): what the kernels must equal."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.spec.activations != "none":
            rounded, scale = quantize_activations(x.float(), self.act_scale, self.spec.act_group)
            y = F.linear(rounded * scale, self.dequantized())
            return (y if bias is None else y + bias.float()).to(x.dtype)
        return F.linear(x, self.dequantized().to(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        """Moves between devices with the model, but a cast of the model (``model.to(torch.bfloat16)``)
        leaves the codes, scales and zeros as they are: fp32 scales, whatever the activations' dtype."""
        for name in ("qweight", "scale", "zero", "act_scale"):
            tensor = self._buffers.get(name)
            if tensor is not None:
                device = fn(torch.empty(0, device=tensor.device)).device
                self._buffers[name] = tensor.to(device)
        if self.qweight.device.type != "cpu":
            self._drop_interleaved()
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.data), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.name}"


class IntEmbedding(IntLinear):
    """A token embedding whose table is stored as integer codes, one row per token: the same storage as
    an :class:`IntLinear` with ``vocab_size`` outputs, so a tied output head shares it (:func:`tie_head`).
    A lookup dequantizes only the rows it needs."""

    def __init__(self, num_embeddings: int, dim: int, spec: QuantSpec, device: torch.device | str | None = None):
        super().__init__(dim, num_embeddings, False, spec, device)
        self.act_scale = None  # lookups have no inputs to round (the tied head keeps its own)
        self.out_dtype = torch.float32  # follows the model's casts (see _apply)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantSpec) -> IntEmbedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, spec, embedding.weight.device)
        layer.set_codes(*quantize_tensor(embedding.weight, spec))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = unpacked(self.qweight[flat], self.spec)
        per_row = self.scale.shape[0] > 1
        scale = self.scale[flat] if per_row else self.scale
        zero = None if self.zero is None else self.zero[flat] if per_row else self.zero
        return dequantize(codes, scale, zero).to(self.out_dtype).reshape(*ids.shape, self.in_features)

    def _apply(self, fn, recurse=True):
        dtype = fn(torch.empty(0)).dtype
        if dtype.is_floating_point:
            self.out_dtype = dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, {self.spec.name}"


def tie_head(model: nn.Module) -> None:
    """Make the output head an :class:`IntLinear` over the integer embedding table's own tensors."""
    embed = model.embed
    head = IntLinear(embed.in_features, embed.out_features, False, embed.spec, embed.qweight.device)
    head.qweight, head.scale, head.zero = embed.qweight, embed.scale, embed.zero
    if isinstance(model.lm_head, IntLinear) and model.lm_head.act_scale is not None:
        head.act_scale = model.lm_head.act_scale  # (W8A8: the head's calibrated input scale stays)
    model.lm_head = head


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers :func:`quantize_model` quantizes: every ``nn.Linear`` of the Transformer blocks,
    and the output layer; when the output layer shares the token embeddings, the table (``embed``),
    which then serves both."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
             and name.startswith("blocks.")]
    config = getattr(model, "config", None)
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.append("embed" if getattr(config, "tie_embeddings", True) else "lm_head")
    return names


def check_group_size(model: nn.Module, spec: QuantSpec) -> None:
    """InputError, naming sizes that fit, when ``spec``'s group size does not divide a quantizable layer's inputs."""
    for name in quantizable_layers(model):
        module = model.get_submodule(name)
        spec.groups(module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features)


def input_layer(name: str) -> str:
    """The layer whose inputs a quantized layer's activations are: itself, or for a tied table the head."""
    return "lm_head" if name == "embed" else name


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def unfuse(model: nn.Module) -> None:
    """Send each block's stacked q/k/v and gate/up products (:mod:`lmforge.model.fused`) back to the separate
    layers, which are what gets quantized and calibrated."""
    for block in getattr(model, "blocks", []):
        for owner, attribute in ((block.attn, "qkv"), (getattr(block, "ffn", None), "gate_up")):
            if owner is not None and getattr(owner, attribute, None) is not None:
                setattr(owner, attribute, None)


def quantize_model(model: nn.Module, spec: QuantSpec, input_absmax: dict[str, float] | None = None,
                   hessians: dict[str, torch.Tensor] | None = None, act_order: bool = True) -> dict[str, dict[str, float]]:
    """Replace the model's quantizable layers by :class:`IntLinear` (a tied embedding by :class:`IntEmbedding`,
    shared with the head) in place, fused projections undone first; returns each layer's weight error:
    ``{"mse": mean squared, "max": largest absolute}``. W8A8 with static scales takes each layer's
    largest input magnitude on calibration data (:func:`calibrate`; the tied head's under ``lm_head``).
    A layer with an input Hessian in ``hessians`` is rounded by GPTQ (:mod:`lmforge.quant.gptq`, with
    ``act_order``), the others to nearest."""
    if spec.activations == "static" and input_absmax is None:
        raise InputError("static int8 activations need calibration: give a calibration file (--calibrate DATA)")
    unfuse(model)
    check_group_size(model, spec)
    errors = {}
    with torch.no_grad():
        for name in quantizable_layers(model):
            module = model.get_submodule(name)
            if isinstance(module, nn.Embedding):
                layer: IntLinear = IntEmbedding.from_embedding(module, spec)
            else:
                layer = IntLinear.from_linear(module, spec)
            if hessians is not None and name in hessians:
                from lmforge.quant.gptq import gptq_quantize

                layer.set_codes(*gptq_quantize(module.weight, hessians[name], spec, act_order=act_order))
            difference = layer.dequantized() - module.weight.detach().float()
            errors[name] = {"mse": float(difference.pow(2).mean()), "max": float(difference.abs().max())}
            _set_module(model, name, layer)
            if name == "embed":
                tie_head(model)
        if spec.activations == "static":
            for name in map(input_layer, errors):
                model.get_submodule(name).act_scale.fill_(max(input_absmax[name], 1e-8) / 127)
    return errors


def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    """The largest input magnitude each quantizable layer sees (the output head's too, under ``lm_head``)
    over ``batches`` of token ids: what static W8A8 scales are made from (``scale = absmax / 127``)."""
    unfuse(model)  # every layer called on its own, so that each one's inputs are seen
    names = [input_layer(name) for name in quantizable_layers(model)]
    largest = dict.fromkeys(names, 0.0)
    watch_inputs(model, names, batches, lambda name, x: largest.__setitem__(name, max(largest[name],
                                                                                      float(x.abs().max()))))
    return largest


def watch_inputs(model: nn.Module, names: list[str], batches: list[torch.Tensor], see) -> None:
    """Run ``model`` over ``batches`` of token ids, calling ``see(name, input)`` with each named layer's input."""
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: see(name, args[0]))
             for name in names]
    try:
        with torch.inference_mode():
            for ids in batches:
                model(ids)
    finally:
        for hook in hooks:
            hook.remove()


def spec_json(spec: QuantSpec, layers: list[str]) -> str:
    """The content of :data:`QUANT_FILE`: the method's fields and the quantized layers' names."""
    return json.dumps({**asdict(spec), "layers": layers}, indent=2) + "\n"


def read_spec(folder: str | Path) -> tuple[QuantSpec, list[str]] | None:
    """The quantization of a checkpoint folder, or None for a float one."""
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    layers = data.pop("layers", None)
    if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers) \
            or len(set(layers)) != len(layers):
        raise InputError(f"{path}: 'layers' must be a list of layer names, each once")
    types = {"bits": int, "scheme": str, "granularity": str, "group_size": int, "activations": str}
    wrong = [key for key, value in data.items() if key not in types or type(value) is not types[key]]
    if wrong:
        raise InputError(f"{path}: unknown or mistyped fields {', '.join(map(repr, wrong))}; a quantization "
                         f"spec holds {', '.join(types)} and layers")
    try:
        return QuantSpec(**data), layers
    except InputError as err:
        raise InputError(f"{path}: {err}") from err


def dequantized_state(state: dict[str, torch.Tensor], spec: QuantSpec, layers: list[str]) -> dict[str, torch.Tensor]:
    """A quantized checkpoint's weights with each integer layer's ``weight`` (fp32) back in place of its
    codes, scales and zeros: what exporters and other tools that know no integers read."""
    state = dict(state)
    for name in layers:
        codes = unpacked(state.pop(f"{name}.qweight"), spec)
        scale, zero = state.pop(f"{name}.scale").float(), state.pop(f"{name}.zero", None)
        state[f"{name}.weight"] = dequantize(codes, scale, None if zero is None else zero.float())
    return state


def prepare_quantized(model: nn.Module, spec: QuantSpec, layers: list[str]) -> None:
    """Put empty :class:`IntLinear` layers where a quantized checkpoint has them, ready for its state dict."""
    unknown = sorted(set(layers) - set(quantizable_layers(model)) - {"embed"})
    if unknown:
        raise InputError(f"{QUANT_FILE}: the model has no quantizable layer {', '.join(map(repr, unknown[:3]))}")
    for name in layers:
        module = model.get_submodule(name)
        device = module.weight.device
        if name == "embed":
            _set_module(model, name, IntEmbedding(module.num_embeddings, module.embedding_dim, spec, device))
            tie_head(model)
        else:
            _set_module(model, name, IntLinear(module.in_features, module.out_features, module.bias is not None,
                                               spec, device))
