"""Where and in what precision things run: decided once, here, and passed down.

``Runtime.resolve("auto", "auto")`` picks CUDA > MPS > CPU, and bf16 autocast where
the hardware runs bf16 matmuls fast (CUDA with bf16 support, CPUs with AVX-512 BF16
or AMX), fp32 elsewhere. Layers never decide this themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
from dataclasses import dataclass

import torch

from lmforge.errors import InputError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX-512 BF16 or AMX)."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc hand blocks of ``threshold`` bytes or more back to the system when torch frees them.

    A training step allocates and frees its activations, tensors of a few megabytes each. glibc
    serves large blocks with ``mmap`` and unmaps them when they are freed, but each time such a
    block is freed it raises its threshold (up to 32 MiB), so from the first step on the activations
    come from the heap, and the heap keeps freed memory in pieces: resident memory climbs over the
    first steps well past what a step needs. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``) stops
    the climb, at the price of fresh pages (page faults) for every big block. Measured for a DPO step
    (LoRA) on SmolLM2-135M, 8 pairs: 2.7 -> 2.1 GiB peak, about 20% more time a step. Process-wide;
    ``TrainConfig.release_memory`` turns it on. Returns False where the C library is not glibc
    (nothing is changed there).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, threshold))


def describe_machine() -> str:
    """CPU model, whether it runs bf16 natively, threads, GPU and torch version: one line for reports."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    bf16 = "native bf16 (AVX-512 BF16/AMX)" if cpu_has_fast_bf16() else "no native bf16 (bf16 is emulated)"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {bf16}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


@dataclass(frozen=True)
class Runtime:
    """Device and compute dtype for one process.

    ``dtype`` is the autocast dtype for matmuls; master weights stay fp32 for
    training. ``attention`` is the attention backend: "sdpa" (fast, fused) or
    "eager" (explicit softmax, the reference).
    """

    device: torch.device
    dtype: torch.dtype
    attention: str = "sdpa"

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto", attention: str = "sdpa") -> Runtime:
        if device == "auto":
            if torch.cuda.is_available():
                device = "cuda"
            elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                device = "mps"
            else:
                device = "cpu"
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise InputError(f"unknown device {device!r}") from err
        if dtype == "auto":
            if dev.type == "cuda":
                dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
            elif dev.type == "cpu":
                dt = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
            else:
                dt = torch.float32
        elif dtype in DTYPES:
            dt = DTYPES[dtype]
        else:
            raise InputError(f"unknown dtype {dtype!r}; choose auto, fp32, bf16 or fp16")
        if attention not in ("sdpa", "eager"):
            raise InputError(f"unknown attention backend {attention!r}; choose sdpa or eager")
        return cls(dev, dt, attention)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for forward passes (a no-op in fp32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        return f"{self.device.type} {str(self.dtype).removeprefix('torch.')} attention={self.attention}"


@functools.cache
def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.bfloat16, max_size: int = 2048,
                        budget_seconds: float = 0.05) -> float:
    """Measured dense matmul throughput in FLOP/s: the denominator of MFU on this machine.

    Square matmuls grow from 256 until one takes ``budget_seconds`` or the size reaches
    ``max_size`` (large enough to saturate a CPU or a small GPU), then the best of four
    rounds of three is kept. The size adapts so that a dtype the hardware only emulates
    (bf16 on a CPU without AVX-512 BF16 runs at about 1 GFLOP/s) costs a fraction of a
    second, not minutes. The matrices come from a generator of its own: a training run's
    first call leaves the global random state (dropout's) as it was, so a run does not
    depend on whether an earlier one in the process measured first (a resumed run did).
    """
    import time

    dev = torch.device(device)

    def seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    size = 256
    generator = torch.Generator(device=dev).manual_seed(0)  # the caller's random state stays as it was
    while True:
        a = torch.randn(size, size, device=dev, generator=generator).to(dtype)
        b = torch.randn(size, size, device=dev, generator=generator).to(dtype)
        seconds(a, b, 1)  # warm-up: kernel selection, packing buffers
        if size >= max_size or seconds(a, b, 1) >= budget_seconds:
            break
        size *= 2
    best = min(seconds(a, b, 3) for _ in range(4))
    return 3 * 2 * size**3 / best
