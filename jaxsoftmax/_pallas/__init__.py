"""Pallas kernels: Mosaic TPU (``tpu.py``) and Mosaic GPU (``gpu.py``).

``ops.py`` adapts the 2-D kernels to the backend interface of ``_xla.py``;
``_backend.py`` calls ``unsupported_reason`` and ``backend`` from here.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Platforms whose kernels have passed `benchmarks/gpu.sh` (or a TPU run) on real
# hardware. `implementation=None` picks Pallas only there: until then the
# kernels are checked in interpret mode and by lowering alone, and the default
# stays on the XLA path. An explicit implementation="pallas" runs them anyway.
# "gpu": correct against float64 at every size of the GPU script on an H200, jax
# 0.11.2 (benchmarks/results/gpu_pallas-2026-11-26T0031Z.md), and on an H100
# (T1329Z; T1348Z, the forward's persistent split rows on 512 rows).
VERIFIED_PLATFORMS: frozenset[str] = frozenset({"gpu"})


# On a GPU, implementation=None takes the kernels only on Hopper (compute
# capability 9.x, where they were verified) and for the shapes where the H200
# measured them faster than our XLA path, forward and backward together (and,
# below, each on its own: GPU_FWD_MIN_ROW_BYTES)
# (benchmarks/results/gpu_pallas-2026-11-26T0511Z.md, the contenders timed in
# turn after a warm-up, one dispatch per 2-16 calls): at least 128 rows, each of
# at least GPU_MIN_ROW_BYTES, 2 KiB (4096 x 1024 bfloat16, the shortest rows
# timed), where below GPU_FWD_MIN_ROW_BYTES only the backward takes the kernel.
# There the kernel's softmax backward took 0.72-0.99x the time of our XLA one
# at 2 KiB rows in the last five runs (H100 T1329Z; H200 T2049Z, T2058Z, T2249Z, T2258Z), and
# log_softmax's, since it takes its live flag from l (``gpu.bwd_reads_live``),
# 0.82-0.87x at 4096 x 1024 in both dtypes (T2249Z, T2258Z; before, 1.00-1.08x).
# Shorter rows have no trustworthy measurement (the first GPU run timed single
# calls: host dispatch, not the kernels), so they stay on XLA. Fewer rows leave
# SMs idle, since each CTA owns whole rows (32 x 262144: twice jax.nn's time).
# Rows whose chunks overlap (``gpu.Plan.ov``) passed on an H100 at 1000, 4104,
# 32000, 50304 and 70000 columns (and on an H200, T2249Z), and at 4096 x 32000
# took 0.48-0.68x jax.nn's forward time and 0.63-0.87x its backward's
# (benchmarks/results/gpu_pallas-2026-11-26T1329Z.md, T1348Z). Ragged rows (not
# a multiple of 16 bytes: 50257) passed there too; at 4096 x 50257 their forward
# took 0.81-0.83x jax.nn's time but their backward, reading each row twice
# element by element, 1.05-1.13x, so they took the kernel forward and XLA's
# backward ("pallas/xla": softmax 492 + 699 us against jax.nn's 607 + 696 in
# bfloat16). Since their rows move by bulk copies (``gpu.Config.ragged_bulk_bytes``,
# read once), the backward of pairs that fit takes the kernel: on an H200 it
# took 0.70x jax.nn's time at 4096 x 50257 bfloat16 (log_softmax's 1.03x, on
# XLA there by H200_LOG_BWD_XLA_COLS), 0.60x and 0.67x at 4096 x 20001 (bfloat16
# and float32; log_softmax's 0.76x and 0.87x), 0.82x and 0.67x at 4096 x 4097
# (log_softmax's 0.94x and 0.87x; gpu_pallas-2026-11-27T1949Z, T1952Z). Pairs
# past 200 KiB, read twice, took 1.07x at 4096 x 50257 float32 and 1.08-1.81x at
# 1024 x 100003: XLA's. An explicit implementation="pallas" runs both
# directions on the kernels.
OPS = ("softmax", "log_softmax")
GPU_MIN_ROW_BYTES = 2 * 1024
GPU_MIN_ROWS = 128
# Rows shorter than this take XLA's forward before the kernel's backward
# ("xla/pallas"). At 4096 x 1024 (both dtypes) and 4096 x 4096 bfloat16, 2-8
# KiB rows, our XLA forward beat the kernel's in every GPU run, on the H200
# (T0511Z, T2049Z, T2058Z) and the H100 (T1329Z): the kernel took 1.02-1.22x
# its time for softmax, 1.05-1.29x for log_softmax (whose XLA forward took
# jax.nn's form after T0511Z). The kernel's backward took 0.67-0.87x XLA's at
# 4-8 KiB (softmax; log_softmax at 8 KiB 0.83-0.86x, and 1.05x in T2049Z, whose
# bfloat16 log_softmax timings ran slow for every contender). At 16 KiB (4096 x
# 4096 float32) the kernel's forward took 0.94-1.04x XLA's: the kernels from
# there. (A call that is not differentiated runs the forward alone: XLA's.)
GPU_FWD_MIN_ROW_BYTES = 16 * 1024
# log_softmax's backward on an H200 takes XLA's from this many columns, by
# itemsize (an H100 keeps the kernel's). There the kernel's backward took
# 1.04-1.11x jax.nn's time at 1024 x 65536 (both dtypes, split; T2049Z and
# T2249Z) and 1.03-1.19x at 4096 x 32000 bfloat16 (rows kept whole), where XLA's
# log_softmax backward, one elementwise pass and a row sum, runs at 67-77% of
# the H200's copy bandwidth; on the H100 the kernel's took 0.83-0.95x at both
# (T1329Z, T1348Z). The H200's kernel kept its lead at 4096 x 32000 float32
# (0.91-0.92x) and at 16384 columns in both dtypes (0.78-0.86x). Since 16-bit
# pairs past 64 KiB split over a cluster (``gpu.Config.log_bwd_16bit_row_bytes``)
# the kernel's backward at 4096 x 32000 bfloat16 took about 224 us against XLA's
# 266 (T1934Z: the split as a variant, XLA in the timing table), so 16-bit rows
# take XLA's from 50000 columns: at 4096 x 50257 (ragged) the kernel's took
# 1.03x jax.nn's time, at 1024 x 65536 1.06x (T1949Z, T1934Z).
H200_LOG_BWD_XLA_COLS = {2: 50000, 4: 65536}

# The losses: their forward's row statistics from the kernel (``row_stats_2d``,
# one read of the logits), the rest of the loss and its backward on XLA. On an
# H200 (benchmarks/results/gpu_pallas-2026-11-26T2049Z.md), at 4096 x {32000,
# 50257, 128256} in bfloat16 and float32 with integer labels, soft labels at
# 4096 x 32000, and integer labels with a padding mask (one flag per example)
# at 4096 x 32000 bfloat16, the jitted mean loss took 0.51-0.75x the time of
# XLA's (ours and optax's) forward, and 0.74-0.88x of their forward and backward.
# So implementation=None takes the kernel on Hopper from 128 rows of at least
# 64000 bytes (32000 bfloat16 columns, the shortest timed) whose class axes are
# the last (others are moved last by an XLA pass first), with no mask over the
# classes (applied in an XLA pass before the kernel). Untimed: shorter rows.
LOSSES = ("softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels")
GPU_LOSS_MIN_ROW_BYTES = 64000


def preferred(op: str, shape, dtype, axes, masked: bool = False) -> tuple[bool, bool]:
  """Whether ``implementation=None`` should take the (supported) kernels for
  ``op`` ("softmax" or "log_softmax", or a loss's name, ``LOSSES``) here,
  ``(forward, backward)``, each on its own; ``masked``: the call has a ``where``
  that the kernel's input takes (for a loss, one over the classes: a mask of
  one flag per example empties its statistics after the kernel)."""
  loss = op in LOSSES
  if not loss and op not in OPS:
    raise ValueError(f"no kernels for {op!r}")
  if jax.default_backend() != "gpu":
    # (Reached only on a platform in VERIFIED_PLATFORMS.) The losses' kernel has
    # been timed on a GPU only.
    return (False, False) if loss else (True, True)
  if _gpu_major() != 9:
    return False, False  # verified on Hopper only; newer GPUs run them on request
  if masked:
    # The mask is applied around the kernel: a pass over x and the mask before
    # it, one over s and the mask after, and the same for g and dx, where XLA
    # folds the mask into its own passes: at 4096 x {4096, 16384} with a causal
    # mask, 1.1-2.5x the time of jax.nn on an H100 (T1329Z). So XLA.
    return False, False
  cols = math.prod(shape[a] for a in axes)
  rows = math.prod(shape) // cols
  row_bytes = cols * jnp.dtype(dtype).itemsize
  if loss:
    last = tuple(sorted(axes)) == tuple(range(len(shape) - len(axes), len(shape)))
    take = last and rows >= GPU_MIN_ROWS and row_bytes >= GPU_LOSS_MIN_ROW_BYTES
    return take, take
  if rows < GPU_MIN_ROWS or row_bytes < GPU_MIN_ROW_BYTES:
    return False, False
  fwd = row_bytes >= GPU_FWD_MIN_ROW_BYTES
  from . import gpu

  p = gpu.plan(cols, dtype)
  if not isinstance(p, gpu.Plan):
    # Ragged rows: the backward takes the kernel where both rows of a pair are
    # bulk copied into SMEM, read once (see above OPS), else XLA's.
    if not gpu.ragged_bwd_bulk(rows, cols, dtype, gpu.Config())[1]:
      return fwd, False
    streams = False
  else:
    streams = gpu.route(rows, p, dtype, gpu.Config(), backward=True)[0] == "streamed"
  if op == "log_softmax" and streams:
    # log_softmax's backward on pairs of rows too long to split (past 8 parts of
    # 64 KiB: 128 x 262144; also 70000 columns, whose 18 chunks split in
    # neither 4 nor 8) streams g twice, the bytes XLA moves, and took 1.03-1.06x
    # jax.nn's time on the H100 (T1329Z) and 1.03-1.17x on the H200 (T2049Z),
    # where softmax's was level (0.99-1.00x): XLA's backward. (Split, at 1024 x
    # 65536, the two GPUs disagree, 0.83-0.91x on the H100 and 1.05-1.11x on
    # the H200: see H200_LOG_BWD_XLA_COLS.)
    return fwd, False
  if op == "log_softmax" and "H200" in _gpu_kind():
    # (A GH200's name matches too: untimed.)
    return fwd, cols < H200_LOG_BWD_XLA_COLS[jnp.dtype(dtype).itemsize]
  return fwd, True


def kernel_name(log: bool, backward: bool, path: str) -> str:
  """What profilers show for a kernel: ``jaxsoftmax_<op>_<fwd|bwd>_<path>``, as in
  ``jaxsoftmax_log_softmax_bwd_split``."""
  return f"jaxsoftmax_{'log_softmax' if log else 'softmax'}_{'bwd' if backward else 'fwd'}_{path}"


def stats_kernel_name(path: str) -> str:
  """The name of the row-statistics kernel (``row_stats_2d``, the losses'
  forward): ``jaxsoftmax_row_stats_<path>``."""
  return f"jaxsoftmax_row_stats_{path}"


def _gpu_major() -> int | None:
  """The major compute capability of the first GPU, None if it has none (not NVIDIA)."""
  cc = getattr(jax.devices()[0], "compute_capability", None)
  return None if cc is None else int(str(cc).split(".")[0])


def _gpu_kind() -> str:
  """The first device's name, as in "NVIDIA H200"."""
  return str(jax.devices()[0].device_kind)


def _gpu_reason() -> str | None:
  """None on a CUDA GPU that Mosaic GPU targets (compute capability >= 9.0)."""
  device = jax.devices()[0]
  major = _gpu_major()
  if major is None:
    return f"Mosaic GPU needs an NVIDIA GPU; this GPU is {device.device_kind!r}"
  if major < 9:
    cc = device.compute_capability
    return f"Mosaic GPU needs compute capability >= 9.0 (Hopper); this GPU has {cc}"
  return None


def unsupported_reason(shape, dtype, axes, axis_name) -> str | None:
  """Why the kernels for the default platform cannot run this call, or None."""
  platform = jax.default_backend()
  if platform not in ("gpu", "tpu"):
    return f"the Pallas kernels run on GPU and TPU only, and the default backend is {platform!r}"
  if axis_name is not None:
    return (
      f"axis_name={axis_name!r} (a softmax axis split across devices, given as "
      "axis_name or by an explicit mesh's sharding of the input) is only "
      "supported by implementation='xla'"
    )
  if jnp.dtype(dtype) not in DTYPES:
    return f"dtype {jnp.dtype(dtype)} is not supported; the kernels take float32, bfloat16, float16"
  if math.prod(shape) == 0:
    return f"the input of shape {tuple(shape)} is empty"
  if platform == "gpu":
    from . import gpu

    cols = math.prod(shape[a] for a in axes)
    return _gpu_reason() or gpu.unsupported_reason(math.prod(shape) // cols, cols, dtype)
  return None


@functools.cache
def backend(name: str):
  """``"pallas"``: the kernels of the default platform; ``"pallas:tpu"``,
  ``"pallas:gpu"``, optionally with ``":interpret"`` (tests on the CPU)."""
  from . import ops

  parts = name.split(":")
  platform = parts[1] if len(parts) > 1 else jax.default_backend()
  interpret = parts[2:] == ["interpret"]
  if platform not in ("tpu", "gpu") or len(parts) > 3 or (len(parts) == 3 and not interpret):
    raise ValueError(f"unknown backend {name!r}")
  if platform == "tpu":
    from . import tpu as kernels
  else:
    from . import gpu as kernels
  return ops.make(kernels, kernels.Config(interpret=interpret))
