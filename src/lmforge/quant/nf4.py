"""4-bit NormalFloat (NF4) weight quantization with double quantization (QLoRA, arXiv:2305.14314).

The method in a few lines:

* **Why normal quantiles.** Pretrained weights are roughly zero-centred normal. If each block of
  weights is divided by its absolute maximum, the values lie in [-1, 1] and still look normal, so
  the 16 code values that waste the fewest codes are quantiles of N(0, 1) rescaled to [-1, 1]:
  each code then covers about the same share of the weights, where uniform int4 levels spend
  codes on the sparse tails and too few near zero. NF4 is asymmetric (8 positive levels,
  7 negative, and an exact zero) so that zero, which padding and sparse weights need, is exact.
* **Why blocks.** One outlier would stretch a whole-tensor scale and crush every other value
  onto a few levels; a scale per block of 64 weights confines its damage to that block.
* **Double quantization.** A fp32 scale per 64 weights costs 32/64 = 0.5 bits per parameter.
  The scales are themselves quantized: their mean is subtracted, then they are stored as int8
  in blocks of 256 with one fp32 scale per such block, which costs 8/64 + 32/(64*256) ~ 0.127
  bits per parameter and so saves ~0.373 bits per parameter (4.127 instead of 4.5 in all).
  The paper stores the second level as 8-bit floats; here it is symmetric int8 after removing
  the mean, which is what keeps its relative error well below 1% (measured in the tests).

Everything is plain PyTorch (no custom kernels), so it runs wherever torch runs; `NF4Linear`
dequantizes its whole weight on every forward call, trading compute for memory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NF4_LEVELS", "NF4Linear", "NF4Tensor", "nf4_levels_from_normal", "quantize_model_nf4"]

# The 16 NF4 code values, ascending (code i means NF4_LEVELS[i]); code 7 is the exact zero.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# Largest magnitude of a second-level (scale) code: symmetric int8 in [-127, 127].
_SCALE_CODE_MAX = 127


def nf4_levels_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """Derive the 16 NF4 levels from quantiles of N(0, 1), as in the QLoRA paper (Appendix E).

    The quantiles at probability 1 and 0 are infinite, so the outermost ones are taken at
    `offset` = 1 - (1/30 + 1/32) / 2 instead. The positive side is the quantiles of 8 equally
    spaced probabilities from `offset` down to (not including) 0.5, the negative side the negated
    quantiles of 7 such probabilities, and zero is added exactly; all are divided by the largest
    magnitude so that the levels span [-1, 1]. Computed in float64; agrees with `NF4_LEVELS` to
    about 1.2e-7 (float32 rounding).
    """
    zero = torch.zeros(1, dtype=torch.float64)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # (8,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    levels = torch.cat([negative, zero, positive]).sort().values  # (16,) ascending
    return (levels / levels.abs().max()).to(torch.float32)


@functools.lru_cache(maxsize=16)
def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: for every packed byte, the levels of its high and low 4-bit codes."""
    byte = torch.arange(256)
    levels = NF4_LEVELS
    return torch.stack([levels[byte >> 4], levels[byte & 0xF]], dim=1).to(device)


@functools.lru_cache(maxsize=16)
def _midpoints(device: torch.device) -> torch.Tensor:
    """(15,) fp32 decision boundaries between neighbouring levels: nearest level by bucketize."""
    return ((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).to(device)


def _check_sizes(numel: int, block_size: int, scale_block_size: int) -> None:
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number (two codes per byte), got {block_size}")
    if scale_block_size <= 0:
        raise ValueError(f"scale_block_size must be positive, got {scale_block_size}")
    if numel == 0 or numel % block_size:
        raise ValueError(
            f"NF4 quantization needs the weight's number of elements to be a positive multiple of "
            f"block_size={block_size}, got {numel} elements"
        )


def _block_scales(
    absmax_codes: torch.Tensor, absmax_scales: torch.Tensor, absmax_mean: torch.Tensor, scale_block_size: int
) -> torch.Tensor:
    """Dequantize the block scales: (nb,) int8 codes, (ns,) group scales, () mean -> (nb,) fp32."""
    group_scales = absmax_scales.repeat_interleave(scale_block_size)[: absmax_codes.numel()]  # (nb,)
    return absmax_mean + absmax_codes.to(torch.float32) * (group_scales / _SCALE_CODE_MAX)


@dataclass
class NF4Tensor:
    """A weight quantized to NF4 in blocks, with double-quantized block scales.

    Storage, for a weight of n elements, block size B and scale block size S (nb = n / B blocks):

    * `packed`: (n/2,) uint8, two 4-bit codes per byte, the even-indexed element in the high nibble;
    * `absmax_codes`: (nb,) int8, each block's absmax minus `absmax_mean`, quantized in groups of S;
    * `absmax_scales`: (ceil(nb/S),) fp32, one scale per group of S block scales (code 127 maps to it);
    * `absmax_mean`: () fp32, the mean of the block absmax values, subtracted before quantizing.

    A weight element dequantizes to NF4_LEVELS[code] * scale of its block, where the block scale is
    absmax_mean + absmax_codes * absmax_scales / 127.
    """

    packed: torch.Tensor
    absmax_codes: torch.Tensor
    absmax_scales: torch.Tensor
    absmax_mean: torch.Tensor
    shape: torch.Size
    block_size: int = 64
    scale_block_size: int = 256

    @classmethod
    def quantize(cls, weight: torch.Tensor, block_size: int = 64, scale_block_size: int = 256) -> NF4Tensor:
        """Quantize a floating-point tensor (any shape, numel divisible by block_size) to NF4.

        Block scales are double-quantized first, and the weights are then normalised by the
        scales that dequantization will use, so the choice of nearest level accounts for the
        scale's own rounding. Peak extra memory is about 3 fp32 copies of the weight.
        """
        if not weight.is_floating_point():
            raise ValueError(f"NF4 quantization needs a floating-point weight, got {weight.dtype}")
        _check_sizes(weight.numel(), block_size, scale_block_size)
        device = weight.device
        blocks = weight.detach().reshape(-1, block_size).to(torch.float32)  # (nb, B)
        num_blocks = blocks.shape[0]
        absmax = blocks.abs().amax(dim=1)  # (nb,)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError("NF4 quantization needs finite weights; got inf or nan")

        # Second level: centre the block scales, then symmetric int8 in groups of scale_block_size.
        absmax_mean = absmax.mean()  # ()
        centred = absmax - absmax_mean  # (nb,)
        num_scale_blocks = math.ceil(num_blocks / scale_block_size)
        padded = F.pad(centred, (0, num_scale_blocks * scale_block_size - num_blocks))  # zeros change no max
        groups = padded.view(num_scale_blocks, scale_block_size)  # (ns, S)
        absmax_scales = groups.abs().amax(dim=1)  # (ns,)
        divisor = torch.where(absmax_scales > 0, absmax_scales, torch.ones_like(absmax_scales))
        codes = torch.round(groups / divisor[:, None] * _SCALE_CODE_MAX)  # (ns, S)
        absmax_codes = codes.clamp(-_SCALE_CODE_MAX, _SCALE_CODE_MAX).to(torch.int8).reshape(-1)[:num_blocks]

        # First level: normalise by the (dequantized) block scale and pick the nearest NF4 level.
        scales = _block_scales(absmax_codes, absmax_scales, absmax_mean, scale_block_size)  # (nb,)
        safe = torch.where(scales != 0, scales, torch.ones_like(scales))
        normalised = blocks / safe[:, None]  # (nb, B), in [-1, 1] up to the scale's rounding
        nibbles = torch.bucketize(normalised, _midpoints(device), out_int32=True).to(torch.uint8)  # (nb, B)
        nibbles = nibbles.reshape(-1)  # (n,)
        return cls(
            packed=(nibbles[0::2] << 4) | nibbles[1::2],  # (n/2,)
            absmax_codes=absmax_codes,
            absmax_scales=absmax_scales,
            absmax_mean=absmax_mean,
            shape=torch.Size(weight.shape),
            block_size=block_size,
            scale_block_size=scale_block_size,
        )

    @property
    def num_blocks(self) -> int:
        return self.absmax_codes.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.packed.numel() * 2

    def scales(self) -> torch.Tensor:
        """(nb,) fp32: the dequantized absmax scale of every block."""
        return _block_scales(self.absmax_codes, self.absmax_scales, self.absmax_mean, self.scale_block_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight, shape `self.shape`, computed in fp32 and returned as `dtype`."""
        pairs = _pair_table(self.device).index_select(0, self.packed.to(torch.int32))  # (n/2, 2) levels
        values = pairs.view(self.num_blocks, self.block_size) * self.scales()[:, None]  # (nb, B)
        return values.view(self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of quantized storage (codes, scale codes, scale scales, mean)."""
        tensors = (self.packed, self.absmax_codes, self.absmax_scales, self.absmax_mean)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes / self.numel()

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy on `device` (the same object's tensors if already there)."""
        return NF4Tensor(
            packed=self.packed.to(device),
            absmax_codes=self.absmax_codes.to(device),
            absmax_scales=self.absmax_scales.to(device),
            absmax_mean=self.absmax_mean.to(device),
            shape=self.shape,
            block_size=self.block_size,
            scale_block_size=self.scale_block_size,
        )


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 (`NF4Tensor` fields held as buffers).

    Buffers (moved by `.to(device)`, saved in `state_dict`): `packed`, `absmax_codes`,
    `absmax_scales`, `absmax_mean` and, if the layer has one, `bias`. Nothing is a trainable
    parameter; gradients still flow to the input, so LoRA adapters can be trained on top.
    `module.to(dtype)` casts the bias and the compute dtype reported by `.weight`, but keeps the
    fp32 scale buffers in fp32.

    `forward(x)` dequantizes the weight to `x.dtype` (the compute dtype) and calls `F.linear`.
    """

    _FP32_BUFFERS = ("absmax_scales", "absmax_mean")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: int = 64,
        scale_block_size: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        numel = in_features * out_features
        _check_sizes(numel, block_size, scale_block_size)
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.scale_block_size = scale_block_size
        num_blocks = numel // block_size
        num_scale_blocks = math.ceil(num_blocks / scale_block_size)
        self.register_buffer("packed", torch.zeros(numel // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_codes", torch.zeros(num_blocks, dtype=torch.int8, device=device))
        self.register_buffer(
            "absmax_scales", torch.zeros(num_scale_blocks, dtype=torch.float32, device=device)
        )
        self.register_buffer("absmax_mean", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # Empty, not saved: its dtype follows module.to(dtype) and is the dtype `.weight` returns.
        self.register_buffer("_dtype_marker", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, scale_block_size: int = 256) -> NF4Linear:
        """Quantize an `nn.Linear` (its weight and bias are copied, not shared)."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=block_size,
            scale_block_size=scale_block_size,
            device=weight.device,
            dtype=weight.dtype,
        )
        module.load_quantized(NF4Tensor.quantize(weight, block_size, scale_block_size))
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def load_quantized(self, quantized: NF4Tensor) -> None:
        """Replace the stored weight by `quantized`, which must have this layer's shape and blocks."""
        expected = (self.out_features, self.in_features, self.block_size, self.scale_block_size)
        got = (*quantized.shape, quantized.block_size, quantized.scale_block_size)
        if got != expected:
            raise ValueError(
                f"NF4Tensor (out, in, block, scale block) {got} does not match the layer's {expected}"
            )
        for name in ("packed", "absmax_codes", "absmax_scales", "absmax_mean"):
            setattr(self, name, getattr(quantized, name))

    @property
    def quantized(self) -> NF4Tensor:
        """The stored weight as an `NF4Tensor` (shares the buffers, no copy)."""
        return NF4Tensor(
            packed=self.packed,
            absmax_codes=self.absmax_codes,
            absmax_scales=self.absmax_scales,
            absmax_mean=self.absmax_mean,
            shape=torch.Size((self.out_features, self.in_features)),
            block_size=self.block_size,
            scale_block_size=self.scale_block_size,
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out_features, in_features) weight in the module's dtype.

        For code that reads `.weight.shape` / `.weight.dtype` / `.weight.device`: every access
        dequantizes the whole weight (time and a full-precision copy in memory), and writing to the
        returned tensor changes nothing.
        """
        return self.quantized.dequantize(self._dtype_marker.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _NF4Matmul.apply(x, self.quantized, bias)  # (..., in) -> (..., out)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would cast every floating buffer; the fp32 scales must stay fp32
        # (they are part of the quantized format), so only the device change is kept for them.
        kept = {name: self._buffers[name] for name in self._FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            self._buffers[name] = tensor.to(self.packed.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, scale_block_size={self.scale_block_size}"
        )


class _NF4Matmul(torch.autograd.Function):
    """x @ dequantize(W).T (+ bias), keeping only the 4-bit W for the backward pass.

    With a plain ``F.linear`` autograd would keep every layer's dequantized fp32 weight
    alive until backward, undoing QLoRA's memory saving; here backward dequantizes
    again (the weight is frozen: only the input's gradient is needed).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.quantized = quantized
        return F.linear(x, quantized.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.quantized.dequantize(grad_out.dtype)  # (out, in)
        return grad_out @ weight, None, None  # (..., out) @ (out, in) -> (..., in)


def _default_skip(name: str) -> bool:
    return name.endswith("lm_head")


def quantize_model_nf4(
    model: nn.Module,
    skip: Callable[[str], bool] | None = None,
    block_size: int = 64,
    scale_block_size: int = 256,
) -> nn.Module:
    """Replace every `nn.Linear` in `model` by an `NF4Linear`, in place, and return the model.

    `skip(name)` (name as in `model.named_modules()`) keeps a layer in full precision; by default
    names ending in "lm_head" are kept, because in lmforge models the output head may share its
    weight with the token embedding (tied), and quantizing it would untie the two. A `model` that
    is itself an `nn.Linear` cannot be replaced in place; the new `NF4Linear` is returned instead.
    A layer whose weight size is not divisible by `block_size` raises ValueError naming the layer.
    """
    skip = _default_skip if skip is None else skip
    targets = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, nn.Linear) and not skip(name)
    ]
    replacements: dict[int, NF4Linear] = {}  # a Linear reachable under two names is quantized once
    for name, linear in targets:
        if id(linear) not in replacements:
            try:
                replacements[id(linear)] = NF4Linear.from_linear(linear, block_size, scale_block_size)
            except ValueError as error:
                raise ValueError(f"cannot quantize layer {name or '<root>'!r}: {error}") from error
        replacement = replacements[id(linear)]
        if not name:
            return replacement
        model.set_submodule(name, replacement)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every `NF4Linear` in `model` by a plain, trainable `nn.Linear` holding its dequantized weight.

    After QLoRA this gives a model that merges its adapters and saves as an ordinary checkpoint.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, NF4Linear):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.packed.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(module.quantized.dequantize(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        model.set_submodule(name, linear)
    return model
