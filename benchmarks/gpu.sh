#!/usr/bin/env bash
# The prepared GPU check (one CUDA machine, no network): every strategy on one GPU in bf16 with
# flash attention, torch.compile off and on, igpt-s and igpt-m, ~100 steps each; tokens/s, MFU
# against the dense bf16 peak and a measured matmul, peak memory, largest batch that fits.
# Sized to finish in about 8 minutes on an H100/H200. Records go to $OUT/gpu_bench.json when
# OUT is set. `bash benchmarks/gpu.sh --dry-run` checks the same logic on CPU in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" != "--dry-run" ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
fi
exec "$PY" benchmarks/gpu_bench.py "$@"
