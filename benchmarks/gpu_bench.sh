#!/usr/bin/env bash
# `gptrain bench --device cuda` as one command of at most 8 minutes: GPT-2 124M, context 1024,
# every rung of the ladder (the 2-rank rungs need 2 GPUs and are reported skipped on one).
# The last rung that runs alone is bf16 + fused AdamW + vocabulary padding + torch.compile at
# 4x the micro-batch: its MFU (against the GPU's dense bf16 peak) is the figure to read.
#
#   benchmarks/gpu_bench.sh [OUT_DIR]        # default: $OUT if set (the device machine's), else bench-cuda
#
# Needs a Python with a CUDA build of torch and gptrain's dependencies (.venv/bin/python if
# there, else python3); this checkout's gptrain is imported from here, installed or not.
# No rung starts after 6.5 minutes and none may run more than 4, so the whole command ends
# within 8 minutes (timeout is the backstop); bench.md/.png/.json are rewritten after every
# rung, so a ladder cut short still leaves what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench-cuda}}"
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
status=0
timeout --kill-after=10 480 "$python" -m gptrain bench --device cuda --out "$out" \
    --time-budget-s 390 --rung-timeout-s 240 || status=$?
[ -f "$out/bench.md" ] && cat "$out/bench.md"
exit "$status"
