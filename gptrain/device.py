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


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """'auto' means bf16 on CUDA devices that support it, else fp32; None keeps what is loaded."""
    if name is None:
        return None
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise GptrainError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
