"""The peak FLOP/s that `gptrain bench` states MFU against.

CUDA: the dense bf16 tensor-core peak of the GPU from gptrain.train.metrics' table, for every
rung (fp32 rungs included), as the reference and nanoGPT's estimate_mfu count it. CPU: no
vendor table covers CPUs (the peak depends on cores, clocks and vector units), so it is
measured: the best rate of MATMUL_SIZE-square matmuls, in bf16 and in fp32, over the
benchmark's threads, whichever precision is faster. That is an attainable peak, not a
theoretical one: CPU MFU reads "fraction of what this machine's matmul kernels reach".
"""

from __future__ import annotations

import time

from gptrain.errors import GptrainError

MATMUL_SIZE = 2048
MEASURE_S = 1.0  # per precision


def peak_for(device: str, threads: int, peak_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s per device, where it comes from)."""
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise GptrainError(f"--peak-tflops must be positive, got {peak_tflops}")
        return peak_tflops * 1e12, "given by --peak-tflops"
    if device == "cuda":
        import torch

        from gptrain.train.metrics import gpu_peak_flops

        peak = gpu_peak_flops(torch.cuda.get_device_name(0), "bf16")
        if peak.flops is None:
            raise GptrainError(f"{peak.source}: pass --peak-tflops with the GPU's dense bf16 peak")
        return peak.flops, peak.source
    rates = {dtype: measured_matmul_flops(dtype, threads) for dtype in ("bf16", "fp32")}
    best = max(rates, key=rates.get)
    measured = ", ".join(f"{dtype} {rate / 1e12:.3f}" for dtype, rate in rates.items())
    return rates[best], (
        f"measured on this CPU: best {MATMUL_SIZE}x{MATMUL_SIZE} matmul rate over {threads} thread(s), "
        f"TFLOP/s {measured}; the faster ({best}) is the peak"
    )


def measured_matmul_flops(dtype: str, threads: int) -> float:
    """The best FLOP/s of one MATMUL_SIZE-square matmul on the CPU, over about MEASURE_S seconds."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=torch_dtype)
        b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=torch_dtype)
        a @ b  # first call: kernel selection, allocation
        best, deadline = float("inf"), time.perf_counter() + MEASURE_S
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return 2 * MATMUL_SIZE**3 / best
    finally:
        torch.set_num_threads(previous)
