#!/usr/bin/env bash
# The benchmark on a GPU machine, in one call of under 5 minutes:
#
#   OUT=/some/dir PYTHONPATH=. bash benchmarks/gpu.sh [extra python -m benchmarks flags]
#
# Installs nothing: it uses the machine's own jax (CUDA build). The harness first
# checks every contender's value and VJP against the naive definition in float64
# on the CPU, and times nothing (exit 1) if one is wrong. Then it times every
# suite at every size, interleaved, with 20 back-to-back calls per sample (to hide
# dispatch latency), and writes <platform>-<date>.json/.md/.png under $OUT.
# Cells that would start after $BUDGET seconds are skipped and listed, so the
# call ends in time. PyTorch (CPU) is left out on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-200}
mkdir -p "$OUT"

{ nvidia-smi || echo "nvidia-smi not available"; } >"$OUT/nvidia-smi.txt" 2>&1
backend=$("$PY" -c 'import jax; print(jax.default_backend())')
if [ "$backend" != gpu ] && [ -z "${ALLOW_CPU:-}" ]; then
  echo "gpu.sh: jax sees no GPU (default backend: $backend); set ALLOW_CPU=1 to run anyway" >&2
  exit 2
fi

"$PY" -m benchmarks --out "$OUT" --budget "$BUDGET" "$@" 2>&1 | tee "$OUT/benchmark-$backend.log"
# Pallas kernels (issue 7): correctness vs float64 on the CPU, then Pallas vs XLA timings and copy bandwidth.
"$PY" benchmarks/gpu_pallas.py --out "$OUT" 2>&1 | tee "$OUT/gpu_pallas-$backend.log"
