"""Device and dtype choice, shared by training, generation and chat."""

from __future__ import annotations

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
