"""Device and dtype choice, shared by training, generation and chat; CPU memory reuse for training."""

from __future__ import annotations

import ctypes
import platform

import torch

from gptrain.errors import GptrainError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise GptrainError(f"unknown device {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptrainError(f"device {name!r} asked for, but CUDA is not available")
    return device


def has_native_bf16(device_type: str) -> bool:
    """Whether bf16 matrix multiplications run in hardware here, so that bf16 is faster than fp32.

    CUDA: Ampere and newer. CPU: x86 with AVX512-BF16 or AMX tiles (Cooper Lake, Sapphire Rapids,
    AMD Zen 4 and newer); elsewhere oneDNN emulates bf16 and it is slower than fp32.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        # torch exposes these CPUID checks only under private names; a torch without them gets fp32.
        checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(check is not None and check() for check in checks)
    return False


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """'auto' means bf16 where the device computes it natively, else fp32; None keeps what is loaded."""
    if name is None:
        return None
    if name == "auto":
        return torch.bfloat16 if has_native_bf16(device.type) else torch.float32
    if name not in DTYPES:
        raise GptrainError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# glibc's mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of returning it to
    the kernel; returns whether it could (glibc only). What CUDA's caching allocator does on GPUs.

    A training step on the CPU frees and reallocates the same large buffers every step
    (activations, logits, gradients). By default glibc maps each block over 32 MiB afresh and
    trims the heap's free top, so each step faults those pages in again and the kernel zeroes
    them: GPT-2 124M at context 256, batch 2 on two cores took 37,000-117,000 minor faults a step
    (150-450 MiB), and its step time rose with them, from 0.80 s to 0.96 s. With every block in
    the heap and no trimming, later steps fault 0-1,300 pages. Process-wide,
    like torch.set_num_threads; the process keeps its peak heap until it exits.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already uses
    # The threshold is a C int: 2 GiB, far above what a step frees at once.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
