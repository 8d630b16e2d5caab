"""CPU kernels for integer and 16-bit weights: a small C++ extension, built on first use, with a pure-PyTorch
fallback.

Decoding at batch 1 reads every weight once per token and does two FLOPs with each: the
step is bound by the bytes it reads. int8 weights are a quarter of fp32's bytes, int4 an
eighth. PyTorch has no CPU kernel that multiplies fp32 activations by int8 or packed int4
weights while reading them as they are (its ``_weight_int8pack_mm`` and what Inductor
writes were measured slow on AVX2), so ``csrc/int_linear.cpp`` does it: each group of
codes is loaded, widened to fp32 in registers, its zero point subtracted in integers,
multiplied into fp32 accumulators, and the group's scale applied once to the sum. The
same body is compiled for AVX-512, AVX2 + FMA and plain C++; the CPU picks at run time.
For layers with int8 activations (W8A8, W4A8) a second kernel rounds the activations to
int8 too and sums products of bytes in 32-bit integers (AVX2's byte multiply-add: 32
products per instruction; AVX-512 VNNI's ``vpdpbusd``: 64, for int8 and int4 weights in
groups of a multiple of 32), as llama.cpp does for its q8_0 and q4_0 files; on AVX-512 VNNI these
layers keep a second copy of their codes with 16 rows interleaved (:func:`interleave`), which one
``vpdpbusd`` multiplies 4 inputs at a time into 16 rows' sums. A third runs the
first kernel's body over fp16 or bf16 weights (``half_linear``, for ``--weights fp16``):
each weight widened to fp32 as it is read, no scale or zero. A fourth multiplies bf16 activations by bf16
weights with AVX-512 BF16's ``vdpbf16ps`` (:func:`bf16_linear`, over weights laid out in pairs by
:func:`bf16_pairs`): the eager and compiled products of bf16 models on CPUs with those instructions and no
AMX (:mod:`lmforge.model.packed`), 1.3-1.7x oneDNN's at 1-8 rows on a 2-core Zen 4, 1.1-1.2x at 16-32. A fifth
multiplies fp32 activations by fp32 weights laid out 16 rows side by side (:func:`f32_linear` over
:func:`f32_blocks`, AVX-512 or AVX2): fp32 models' products where :func:`f32_dots`, 1.3-3.5x less time than
PyTorch's (MKL's) at 1-256 rows on a 2-core Zen 4. A sixth does a decoder's masked attention in bf16 or fp32 on
AVX-512 (:func:`grouped_attention`: the engine's decode steps over their cached keys, prompts, multiple-choice
passes), 3.5-6x (bf16) and 2.3x (fp32) less time than PyTorch's fused kernel for decode steps there.

The extension is built with ``torch.utils.cpp_extension`` the first time an integer layer
runs, or a model is laid out for inference (``lmforge.load``; fp32 packing asks :func:`f32_dots`) or a bf16 one
attends with a mask on a CPU with AVX-512 BF16 (about a minute on 2 cores; cached afterwards under ``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``). Without a C++ compiler, or with
``LMFORGE_INT_KERNELS=off``, integer layers use the reference (dequantize, then multiply)
and 16-bit layers widen their weight for PyTorch's matrix kernels.
The op is ``torch.ops.lmforge.int_linear``, with a fake implementation so that
``torch.compile`` (the compiled decode step) calls it as an opaque kernel.

    from lmforge.quant import kernels
    kernels.available(), kernels.isa()        # True, "avx2"
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_HEAD_SIZES", "KERNEL_MAX_ROWS", "attends", "available", "best_isa", "bf16_dots",
           "grouped_attention", "bf16_linear", "bf16_pairs", "dequantize", "f32_blocks", "f32_dots", "f32_linear",
           "half_linear", "int_linear_a8",
           "int_linear_a8_interleaved", "int_linear", "interleave", "interleaves", "isa", "serves", "set_isa"]

# Up to this many activation rows an integer layer uses the kernels; above it (a long prompt)
# it dequantizes the weight and calls the usual matrix kernels, which win once the weights
# are reused across many rows. Measured on SmolLM2-135M, 2 AVX2 cores, one forward pass:
# dequantizing with PyTorch ops cost 300-500 ms whatever the rows (the dequantize kernel
# since: about 2.8x less); the kernels 24 ms at 1 row and 176 (int8), 214 (W8A8) and 497 ms
# (W4A8) at 64. The interleaved codes of W8A8 / W4A8 layers on a VNNI CPU (:func:`interleave`) take
# their kernel at every number of rows: four int8 products an instruction beat the fp32 ones of
# the reference, SmolLM2's prompt passes 2.1-4.5x faster at 100-2,000 tokens (2-core Zen 4).
KERNEL_MAX_ROWS = 64

_SOURCE = Path(__file__).parent / "csrc" / "int_linear.cpp"
_module = None  # the loaded extension, False after a failed build, None before trying
_vnni: bool | None = None  # whether the extension built and the CPU has AVX-512 VNNI (None: not asked yet)
_bf16: bool | None = None  # whether the extension built and the CPU has AVX-512 BF16 (None: not asked yet)
_f32_cpu: bool | None = None  # whether the CPU is one the fp32 kernel serves by default (None: not asked yet)


def _load():
    global _module
    if _module is not None:
        return _module
    if os.environ.get("LMFORGE_INT_KERNELS", "").lower() in ("0", "off", "no", "false"):
        _module = False
        return _module
    try:
        from torch.utils import cpp_extension

        try:  # the `ninja` package's binary, for environments that are not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        name = extension_name()
        build = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build.glob("*.so")):
            print("[lmforge] building the CPU kernels for integer and bf16 layers (once; about a minute)", file=sys.stderr)
        with _building(build):
            _module = cpp_extension.load(name=name, sources=[str(_SOURCE)],
                                         extra_include_paths=[str(_SOURCE.parent)], extra_cflags=["-O3", "-fopenmp"],
                                         extra_ldflags=["-fopenmp"],
                                         verbose=False)
        _register_fake()
    except Exception as error:  # no compiler, no ninja, a failed build: the reference still works
        print(f"[lmforge] integer kernels unavailable ({type(error).__name__}: {str(error).splitlines()[0]}); "
              "integer layers dequantize then multiply", file=sys.stderr)
        _module = False
    return _module


def extension_name() -> str:
    """The extension's name: it carries a digest of the sources (the body is an included file, which the
    extension builder does not hash), so an edited kernel builds anew, never a stale one."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(_SOURCE.parent.iterdir())))
    return f"lmforge_int_linear_{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _building(build: Path) -> Iterator[None]:
    """Hold the build folder while the extension builds or loads. torch's own guard is a plain file
    (``lock``) made at the start and deleted at the end: a process killed in between (SIGKILL runs no
    clean-up; a kill test found it) leaves it, and every later load waits for it forever. This guard is
    the kernel's (``flock``), released however its process ends; whoever holds it knows that no other
    lmforge process is inside the build, so a ``lock`` file it finds is a dead one's, and removes it."""
    build.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(build / "lmforge.flock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        yield
    finally:
        os.close(descriptor)


def _register_fake() -> None:
    @torch.library.register_fake("lmforge::int_linear")
    def _(x, qweight, scale, zero, bits, offset):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake("lmforge::half_linear")
    def _(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("lmforge::dequantize")
    def _(qweight, scale, zero, bits, offset):
        return scale.new_empty((qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)))

    @torch.library.register_fake("lmforge::int_linear_a8")
    def _(x, qweight, scale, zero, act_scale, bits, offset, act_group):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake("lmforge::int_linear_a8_interleaved")
    def _(x, codes, scale, zero, act_scale, bits, offset, act_group, N):
        return x.new_empty((*x.shape[:-1], N))

    @torch.library.register_fake("lmforge::bf16_linear")
    def _(x, pairs, bias, N):
        return x.new_empty((*x.shape[:-1], N))

    @torch.library.register_fake("lmforge::f32_linear")
    def _(x, blocks, bias, N):
        return x.new_empty((*x.shape[:-1], N))

    @torch.library.register_fake("lmforge::grouped_attention")
    def _(q, k, v, mask):
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.compiler.assume_constant_result  # traced as its value: the build never happens inside a graph
def available() -> bool:
    """True when the extension is built (or builds now) and loads."""
    return bool(_load())


def serves(x: torch.Tensor) -> bool:
    """Whether a layer takes the kernels for input ``x`` (..., K): on a CPU, at most :data:`KERNEL_MAX_ROWS`
    rows, the extension built."""
    return x.device.type == "cpu" and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1] and available()


def isa() -> str:
    """The instruction set the kernel runs on: ``avx512``, ``avx2``, ``scalar``, or ``reference`` without one."""
    return _load().isa() if available() else "reference"


def best_isa() -> str:
    """The best instruction set this CPU offers the kernel."""
    return _load().best_isa() if available() else "reference"


def set_isa(name: str) -> None:
    """Run the kernel on ``name`` (``avx512``, ``avx2``, ``scalar``) or ``best``; tests compare the paths so."""
    if not available():
        raise RuntimeError("the integer kernels are not available")
    _load().set_isa(name)


def int_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               bits: int, offset: int) -> torch.Tensor:
    """``x (..., K) @ W.T`` in fp32 for the integer weight W that ``qweight``, ``scale`` and ``zero`` store
    (:mod:`lmforge.quant.integer`'s layout); ``offset`` is the zero every group shares (int4 symmetric: 8)."""
    return torch.ops.lmforge.int_linear(x.float(), qweight, scale, zero, bits, offset)


def int_linear_a8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  act_scale: torch.Tensor | None, bits: int, offset: int, act_group: int = 0) -> torch.Tensor:
    """W8A8 and W4A8: ``x (..., K)`` rounded to int8 (every ``act_group`` = 32 inputs by their own absmax / 127;
    with ``act_group=0`` each row by its own, or all by ``act_scale``), times the integer weight (symmetric
    int8, or int4 of either scheme), summed in integers; fp32 out.
    :func:`lmforge.quant.integer.quantize_activations` is the reference."""
    return torch.ops.lmforge.int_linear_a8(x.float(), qweight, scale, zero, act_scale, bits, offset, act_group)


@torch.compiler.assume_constant_result
def interleaves() -> bool:
    """Whether the VNNI kernel over interleaved codes (:func:`interleave`) runs here: the extension built, a CPU
    with AVX-512 VNNI, and the kernels on AVX-512 (not moved to a lower instruction set by :func:`set_isa`)."""
    global _vnni
    if _vnni is None:
        _vnni = available() and _load().vnni()
    return _vnni and _load().isa() == "avx512"


def interleave(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
               offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An integer layer's codes (N, K) one per weight (:meth:`~lmforge.quant.integer.IntLinear.codes`), scales
    and zeros in the layout of :func:`int_linear_a8_interleaved`: 16 weight rows side by side, four bytes of
    each at a time, the codes as unsigned bytes (int8 + 128; int4 + ``offset``, the codes of inputs 8c .. 8c + 3
    in the low halves and of 8c + 4 .. 8c + 7 in the high halves); scales and zeros (N / 16, G, 16). Rows
    padded to a multiple of 16."""
    rows, inputs = codes.shape
    blocks = -(-rows // 16)
    unsigned = F.pad((codes.to(torch.int16) + (128 if bits == 8 else offset)).to(torch.uint8),
                     (0, 0, 0, blocks * 16 - rows))
    if bits == 8:
        packed = unsigned.reshape(blocks, 16, inputs // 4, 4)
    else:
        halves = unsigned.reshape(blocks, 16, inputs // 8, 2, 4)
        packed = halves[..., 0, :] | (halves[..., 1, :] << 4)
    packed = packed.permute(0, 2, 1, 3).contiguous()

    def side_by_side(values: torch.Tensor) -> torch.Tensor:
        full = F.pad(values.float().expand(rows, -1), (0, 0, 0, blocks * 16 - rows))
        return full.reshape(blocks, 16, -1).transpose(1, 2).contiguous()

    return packed, side_by_side(scale), None if zero is None else side_by_side(zero)


def int_linear_a8_interleaved(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                              act_scale: torch.Tensor | None, bits: int, offset: int, act_group: int,
                              outputs: int) -> torch.Tensor:
    """:func:`int_linear_a8` over codes that :func:`interleave` made: the same rounding of the activations and
    the same integer sums, added in another order (fp32 outputs equal within rounding); ``outputs`` is N."""
    return torch.ops.lmforge.int_linear_a8_interleaved(x.float(), codes, scale, zero, act_scale, bits, offset,
                                                       act_group, outputs)


@torch.compiler.assume_constant_result
def bf16_dots() -> bool:
    """Whether bf16 products take :func:`bf16_linear` here: a CPU with AVX-512 BF16 and without AMX, the
    extension built, the kernels on AVX-512 (not moved lower by :func:`set_isa`). ``LMFORGE_BF16_KERNEL=off``
    keeps oneDNN's products; ``=on`` takes the kernel on AMX CPUs too, where oneDNN runs its bf16 products on
    AMX tiles and the kernel has not been measured against them."""
    global _bf16
    choice = os.environ.get("LMFORGE_BF16_KERNEL", "auto").lower()
    if choice == "off":
        return False
    if _bf16 is None:  # the CPU's flags first: no build on a CPU that could not run the kernel
        _bf16 = torch.cpu._is_avx512_bf16_supported() and available() and _load().bf16_dots()
    return _bf16 and (choice == "on" or not torch.cpu._is_amx_tile_supported()) and _load().isa() == "avx512"


def bf16_pairs(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight (N, K) in the layout of :func:`bf16_linear`: 16 rows side by side, each row's inputs
    2p and 2p + 1 next to each other, (N / 16, K / 2, 16) pairs as int32; rows padded to a multiple of 16 and
    an odd K to an even one with zeros."""
    rows, inputs = weight.shape
    blocks, pairs = -(-rows // 16), -(-inputs // 2)
    padded = F.pad(weight.detach().to(torch.bfloat16), (0, 2 * pairs - inputs, 0, 16 * blocks - rows))
    return padded.reshape(blocks, 16, pairs, 2).transpose(1, 2).contiguous().view(torch.int32).squeeze(-1)


def bf16_linear(x: torch.Tensor, pairs: torch.Tensor, bias: torch.Tensor | None, outputs: int) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for bf16 ``x (..., K)`` and the weight ``W (outputs, K)`` that :func:`bf16_pairs`
    laid out: each product exact in fp32, summed in fp32 in input order (then the bias), rounded to bf16 once.
    Equal to ``F.linear`` up to the order of the sums; a row's bits do not depend on the rows beside it."""
    return torch.ops.lmforge.bf16_linear(x, pairs, bias, outputs)


@torch.compiler.assume_constant_result
def f32_dots() -> bool:
    """Whether fp32 products take :func:`f32_linear` here: the extension built, its calls on AVX-512, a CPU
    without AMX (measured on AMD Zen 4, where it took 1.3-3.5x less time than PyTorch's MKL products at 1-256
    rows; Intel CPUs with AMX, whose MKL runs Intel's own code paths, not measured). ``LMFORGE_F32_KERNEL=off``
    keeps PyTorch's products; ``=on`` takes the kernel on any CPU with AVX-512 or AVX2 (its AVX2 body: 1.5-2.9x
    faster at 1-8 rows on Zen 4's AVX2 units, slower from 32 rows; not measured on an AVX2-only CPU)."""
    global _f32_cpu
    choice = os.environ.get("LMFORGE_F32_KERNEL", "auto").lower()
    if choice == "off":
        return False
    if _f32_cpu is None:  # asked once (every eager fp32 product asks)
        _f32_cpu = torch.backends.cpu.get_cpu_capability() == "AVX512" and not torch.cpu._is_amx_tile_supported()
    if choice != "on" and not _f32_cpu:
        return False  # the CPU's flags first: no build where the default would not use the kernel
    if not available():
        return False
    return _load().isa() in (("avx512", "avx2") if choice == "on" else ("avx512",))


def f32_blocks(weight: torch.Tensor) -> torch.Tensor:
    """An fp32 weight (N, K) in the layout of :func:`f32_linear`: 16 rows side by side, (N / 16, K, 16), the 16
    outputs' weights of input k in 64 bytes; rows padded with zeros to a multiple of 16."""
    rows, inputs = weight.shape
    blocks = -(-rows // 16)
    padded = F.pad(weight.detach().float(), (0, 0, 0, 16 * blocks - rows))
    return padded.reshape(blocks, 16, inputs).transpose(1, 2).contiguous()


def f32_linear(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None, outputs: int) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for fp32 ``x (..., K)`` and the weight ``W (outputs, K)`` that :func:`f32_blocks`
    laid out: each output one chain of FMAs in input order, then the bias. AVX-512 and AVX2 give the same bits;
    a row's bits do not depend on the rows beside it."""
    return torch.ops.lmforge.f32_linear(x, blocks, bias, outputs)


ATTENTION_HEAD_SIZES = (32, 64, 96, 128)  # the head sizes grouped_attention is compiled for


@torch.compiler.assume_constant_result
def _avx512() -> bool:
    return available() and _load().isa() == "avx512"


def attends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`grouped_attention` serves this attention: on a CPU, a head size it knows, nothing that needs
    gradients (the kernel has no backward), queries, keys and values of one dtype (not bf16 autocast's queries
    over an fp32 cache), and bf16 where :func:`bf16_dots` or fp32 where :func:`f32_dots`, the calls on AVX-512
    (the kernel has no AVX2 body)."""
    if q.device.type != "cpu" or q.shape[-1] not in ATTENTION_HEAD_SIZES or q.requires_grad or k.requires_grad \
            or v.requires_grad or k.dtype != q.dtype or v.dtype != q.dtype:  # (autocast: bf16 queries, fp32 cache)
        return False
    if q.dtype == torch.bfloat16:
        return bf16_dots()
    return q.dtype == torch.float32 and f32_dots() and _avx512()


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), where ``mask``) v of ``q (B, H, T, D)`` over ``k, v (B, Hkv, Tk, D)``, all bf16 or
    all fp32, each kv head serving H / Hkv query heads; ``mask (B, 1, T, Tk)`` boolean, True where a query may look
    -> (B, H, T, D) in q's dtype. Scores 16 keys at a time (bf16: ``vdpbf16ps``; fp32: FMAs), the softmax and the
    values' sums in fp32, bf16 rounded once at the end; a row that may see no key gives 0. Each row's bits are its
    own, whatever the rows beside it (a speculative check's first token equals the one-token step's).
    :func:`lmforge.model.attention.sdpa_attention` calls it for a decoder's masked inference attention; key blocks a
    row may not see (a prompt's future, a shorter slot) cost nothing."""
    return torch.ops.lmforge.grouped_attention(q, k, v, mask)


def half_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x (..., K) @ weight.T`` in fp32 for an fp16 or bf16 weight (N, K), each weight widened to fp32 as it
    is read (:mod:`lmforge.quant.weight_only`); ``x @ weight.float().T`` is the reference."""
    return torch.ops.lmforge.half_linear(x.float(), weight)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
               offset: int) -> torch.Tensor:
    """The fp32 weight the codes stand for, in one parallel pass; bit for bit what
    :func:`lmforge.quant.integer.dequantize` gives."""
    return torch.ops.lmforge.dequantize(qweight, scale, zero, bits, offset)
