#!/usr/bin/env bash
# The benchmarks on a GPU machine, in one call. On an H100 the Pallas part took
# 8.9 minutes (2026-11-26T1329Z): about 5 minutes of checks and timings, then
# the variants in what is left of its 540 s budget, a cell (shape and dtype,
# all its variants) a minute or so, the cells short of the targets first (a
# cell that hangs is killed after 60 s). The harness takes its --budget plus
# about a minute. On an H200 (T2049Z), PALLAS_BUDGET=530 PARTS=pallas took
# 522 s; with the machine's start, 552 s of a 900 s device budget, which left
# a second call of 258 s on the warm machine (it goes back after 30 s idle,
# so have that call ready): gpu_pallas.py --sizes 4096x1024 --check-cols ""
# --no-losses --budget 270 --variants-timeout 230, for more variants. On an
# H100 (T0116Z, T0125Z) the same two calls took 523 s and 252 s: 811 s of
# device time, with the machine's start. On an H200 (T1934Z) the first call
# alone ran the whole queue (26 variant cells) in 426 s; the queue now holds
# 26 cells besides the defaults', and 4096 x 50304 joined the sizes. With
# VARIANTS_DONE=FILE here and
# --variants-done FILE there (a path outside $OUT, which each call empties,
# e.g. /tmp/variants-done.json) the second call skips the variant cells the
# first one ran; with --sizes "" it checks and times no size again, and the
# variants get its whole budget. (--variant-shapes RxC,... takes some of the
# variants' shapes, in that order.)
# Keep timeout_s at 600:
#
#   OUT=/some/dir PYTHONPATH=. BENCH_COMMIT=<sha> bash benchmarks/gpu.sh [extra flags]
#
# (BENCH_COMMIT: the commit the results are recorded against; the device
# machine's copy of the tree may carry stale git metadata.)
#
# Installs nothing: it uses the machine's own jax (CUDA build). Two parts, both
# by default, the Pallas one first (PARTS="pallas harness"; set PARTS to one of
# them to split the work over two calls):
#
# - pallas: benchmarks/gpu_pallas.py (issue 7), Pallas vs XLA. A failure there
#   (a wrong or uncompilable kernel) is reported and the harness still runs.
#   After the softmax timings and before the variants, its losses step checks
#   and times the two cross-entropy losses (Pallas vs XLA vs optax, forward and
#   forward + backward; perhaps 60 s on an H100, not yet measured, taken from
#   the variants' share of its budget; gpu_pallas.py --no-losses skips it).
# - harness: `python -m benchmarks` first checks every contender's value and VJP
#   against the naive definition in float64 on the CPU, and times nothing (exit 1)
#   if one is wrong. Then it times every suite (softmax and log_softmax first),
#   interleaved, with 20 back-to-back calls per sample, each call one program
#   that runs the op on every rotating buffer (to hide dispatch latency),
#   and writes <platform>-<date>.json/.md/.png under $OUT. Cells that would start
#   after $BUDGET seconds are skipped and listed, so that the call ends in time
#   (default 75 s with the Pallas part, 200 s without). PyTorch is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
PARTS=${PARTS:-pallas harness}
case " $PARTS " in
  *" pallas "*) BUDGET=${BUDGET:-75} ;;
  *) BUDGET=${BUDGET:-200} ;;
esac
mkdir -p "$OUT"

backend=$("$PY" -c 'import jax; print(jax.default_backend())')
# At most 8 files come back from the GPU machine: nvidia-smi goes into the
# Pallas part's log, and the harness writes no plots.
{ nvidia-smi || echo "nvidia-smi not available"; } >"$OUT/gpu_pallas-$backend.log" 2>&1
if [ "$backend" != gpu ] && [ -z "${ALLOW_CPU:-}" ]; then
  echo "gpu.sh: jax sees no GPU (default backend: $backend); set ALLOW_CPU=1 to run anyway" >&2
  exit 2
fi

status=0
for part in $PARTS; do
  case "$part" in
    harness)
      "$PY" -m benchmarks --out "$OUT" --budget "$BUDGET" --no-plots "$@" 2>&1 |
        tee "$OUT/benchmark-$backend.log" || status=1
      ;;
    pallas)
      # Pallas kernels (issue 7): correctness vs float64 on the CPU, then Pallas vs XLA
      # timings and copy bandwidth.
      extra=()
      [ "$backend" != gpu ] && extra=(--allow-cpu)
      [ -n "${VARIANTS_DONE:-}" ] && extra+=(--variants-done "$VARIANTS_DONE")
      # Its variants stop in time for its --budget: 540 s alone, 400 s with the
      # harness after it (PALLAS_BUDGET overrides).
      budget=${PALLAS_BUDGET:-540}
      case " $PARTS " in *" harness "*) budget=${PALLAS_BUDGET:-400} ;; esac
      "$PY" benchmarks/gpu_pallas.py --out "$OUT" --budget "$budget" "${extra[@]}" 2>&1 |
        tee -a "$OUT/gpu_pallas-$backend.log" || status=1
      ;;
    *)
      echo "gpu.sh: unknown part '$part' in PARTS (expected harness and/or pallas)" >&2
      exit 2
      ;;
  esac
done
exit "$status"
