"""Throughput and hardware metrics: model FLOPs utilisation (MFU) and peak memory.

MFU = achieved model FLOP/s / peak FLOP/s (PaLM paper, appendix B): FLOPs per token come
from the model config (6N + attention), tokens/s from the trainer, and the peak from the
table below: the vendors' dense (no sparsity) tensor-core numbers for the precision the
trainer computes in. fp32 training on CUDA runs its matmuls in TF32 (enabled by the trainer).
CPUs have no table entry: their peak depends on the core count, clock and vector units,
and a guessed number would make MFU look precise when it is not, so MFU is reported as n/a.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

# (substring of torch.cuda.get_device_name(), {precision: dense peak FLOP/s per device}).
# "fp32" is the TF32 tensor-core peak on Ampere and later (the trainer enables TF32), and
# the plain fp32 peak on GPUs without TF32. Names that contain another come first ("GH200" before "H200").
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989e12, "fp32": 494e12}),
    ("H200", {"bf16": 989e12, "fp32": 494e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp32": 378e12}),
    ("H100 NVL", {"bf16": 835e12, "fp32": 418e12}),
    ("H100", {"bf16": 989e12, "fp32": 494e12}),  # SXM
    ("A100", {"bf16": 312e12, "fp32": 156e12}),
    ("A10G", {"bf16": 70e12, "fp32": 35e12}),
    ("A10", {"bf16": 125e12, "fp32": 62.5e12}),
    ("L40S", {"bf16": 362e12, "fp32": 183e12}),
    ("L40", {"bf16": 181e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp32": 60e12}),
    ("RTX 4090", {"bf16": 165e12, "fp32": 82.6e12}),
    ("V100", {"fp32": 15.7e12}),  # no bf16 and no TF32
    ("T4", {"fp32": 8.1e12}),
]


@dataclass(frozen=True)
class PeakFlops:
    """The per-device peak used for MFU, and where it came from (stated in the log)."""

    flops: float | None
    source: str

    def describe(self) -> str:
        if self.flops is None:
            return f"MFU n/a: {self.source}"
        return f"MFU against {self.flops / 1e12:.1f} TFLOP/s per device ({self.source})"


def peak_flops(device: torch.device, dtype: str) -> PeakFlops:
    """Dense peak FLOP/s of one `device` computing in `dtype` ('bf16' or 'fp32')."""
    if device.type != "cuda":
        return PeakFlops(None, f"no peak FLOP/s is known for {device.type} devices")
    return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)


def gpu_peak_flops(name: str, dtype: str) -> PeakFlops:
    """The table's peak for the GPU called `name` (as torch.cuda.get_device_name says)."""
    precision = "bf16" if dtype == "bf16" else "fp32"
    for key, peaks in PEAK_FLOPS:
        if key in name:
            if precision not in peaks:
                return PeakFlops(None, f"the table has no {precision} peak for {name}")
            what = "dense bf16" if precision == "bf16" else "fp32 matmuls (TF32 where supported)"
            return PeakFlops(peaks[precision], f"{name}, {what}")
    return PeakFlops(None, f"{name} is not in the peak table (gptrain/train/metrics.py)")


def mfu(flops_per_token: float, tokens_per_s: float, peak: PeakFlops, world_size: int) -> float | None:
    """Fraction of the devices' combined peak used; `tokens_per_s` counts all ranks."""
    if peak.flops is None:
        return None
    return flops_per_token * tokens_per_s / (peak.flops * world_size)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the most memory tensors held on the device. CPU: the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return max_rss / (2**30 if sys.platform == "darwin" else 2**20)


def memory_kind(device: torch.device) -> str:
    return "peak CUDA memory allocated" if device.type == "cuda" else "peak resident memory of the process"
