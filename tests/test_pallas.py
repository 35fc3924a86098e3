"""Pallas kernels: every kernel in interpret mode on the CPU, lowering for TPU and
GPU via jax.export, and the ``implementation=`` dispatch.

References are float64 ``jax.nn`` (independent of jaxsoftmax) for ordinary rows,
and the masking table of the README (closed forms) for special rows.
"""

import re
from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import jaxsoftmax
from jaxsoftmax import _backend, _pallas, _xla
from jaxsoftmax import _softmax as core
from jaxsoftmax._pallas import gpu, ops, tpu

import draws
from references import eps, rel_err

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# The forms that are off by default lower in float32 and bfloat16: float16 takes
# the same 16-bit code, lowered in every default form.
OFF_DTYPES = DTYPES[:2]
ORDINARY, PARTLY_MASKED, FULLY_MASKED, ALL_NEG_INF, HAS_NAN, HAS_POS_INF = range(6)


def _case(cols: int, dtype, seed: int = 0):
  """Six rows, one per line of the masking table, and a cotangent."""
  x = np.array(draws.normal(seed, (6, cols), scale=3.0))
  w = np.ones((6, cols), bool)
  w[PARTLY_MASKED] = np.array(draws.bernoulli(seed + 1, 0.6, (cols,)))
  # Its first half all masked (the leading chunks of a live row all -inf: what
  # a running max starts from, what a live flag must look past).
  w[PARTLY_MASKED, : cols // 2] = False
  w[PARTLY_MASKED, -1] = True  # keep the row live
  if cols > 1:
    x[PARTLY_MASKED, 0] = -np.inf
  w[FULLY_MASKED] = False
  x[ALL_NEG_INF] = -np.inf
  x[HAS_NAN, cols // 2] = np.nan
  x[HAS_POS_INF, cols // 3] = np.inf
  g = draws.normal(seed + 2, (6, cols), dtype)
  return jnp.asarray(x.astype(jnp.dtype(dtype))), jnp.asarray(w), g


@partial(jax.jit, static_argnums=3)
def _reference(x, w, g, log: bool):
  """float64 jax.nn values and VJPs for the two ordinary rows."""
  f = jax.nn.log_softmax if log else jax.nn.softmax
  x64, g64 = x[:2].astype(jnp.float64), g[:2].astype(jnp.float64)
  y, vjp = jax.vjp(lambda v: f(v, axis=1, where=w[:2]), x64)
  return y, vjp(jnp.where(w[:2], g64, 0.0))[0]


def _run(be, x, w, g, log: bool):
  """Forward and backward through a backend's four functions, as the custom_vjp calls them."""
  if log:
    y, live = be.log_softmax_fwd(x, w, (1,), None, for_grad=True)
    return y, be.log_softmax_bwd(y, live, w, g, (1,), None)
  y = be.softmax_fwd(x, w, (1,), None)
  return y, be.softmax_bwd(y, w, g, (1,), None)


@partial(jax.jit, static_argnums=0)
def _log_softmax_alone(be, x, w):
  """log_softmax's forward and live flag when not differentiated (no lse written),
  and the flag of the forward that is (from the kernel's lse)."""
  alone = be.log_softmax_fwd(x, w, (1,), None)
  return *alone, be.log_softmax_fwd(x, w, (1,), None, for_grad=True)[1]


def _assert_close(actual, expected, tol, info):
  """``||actual - expected|| / ||expected|| <= tol``; exact when ``expected`` is 0
  (a row of one entry: log_softmax 0, gradient 0)."""
  if np.any(expected):
    assert rel_err(actual, expected) <= tol, info
  else:
    assert np.all(actual == 0.0), info


@partial(jax.jit, static_argnums=(0, 4))
def _run_jit(be, x, w, g, log):
  return _run(be, x, w, g, log)


# The live flag of the six rows of `_case`: False on the two empty ones.
LIVE = np.array([True, True, False, False, True, True])


def _check_forward(y, ref_y, w, log: bool, info):
  """The forward of `_case`'s rows (float64 ``y``) against float64 ``ref_y`` (the
  first two) and the masking table (the rest)."""
  finite = np.isfinite(ref_y)
  # Ordinary rows within 4 eps.
  assert np.array_equal(np.isfinite(y[:2]), finite)
  _assert_close(y[:2][finite], ref_y[finite], 4 * eps(info[1]), info)
  # Masked entries: 0 (softmax) or -inf (log_softmax).
  assert np.all(y[:2][~np.asarray(w[:2])] == (-np.inf if log else 0.0))
  # Empty rows (fully masked, or all -inf): 0 or -inf.
  for r in (FULLY_MASKED, ALL_NEG_INF):
    assert np.all(y[r] == (-np.inf if log else 0.0)), (*info, r)
  # +inf or NaN: the whole row is NaN, and only that row.
  for r in (HAS_NAN, HAS_POS_INF):
    assert np.all(np.isnan(y[r])), (*info, r)
  assert not np.any(np.isnan(y[:4]))


@partial(jax.jit, static_argnums=0)
def _both(be, x, w, g):
  """softmax's and log_softmax's forward and backward through ``be`` (``_run``),
  and their float64 references (``_reference``): one program to compile."""
  return [(_run(be, x, w, g, log), _reference(x, w, g, log)) for log in (False, True)]


def _check(be, cols, dtype):
  x, w, g = _case(cols, dtype)
  for log, ((y, dx), (ref_y, ref_dx)) in zip((False, True), _both(be, x, w, g), strict=True):
    y, dx = np.asarray(y), np.asarray(dx)
    assert y.dtype == dx.dtype == jnp.dtype(dtype)
    y, dx = y.astype(np.float64), dx.astype(np.float64)
    ref_y, ref_dx = np.asarray(ref_y), np.asarray(ref_dx)
    _check_forward(y, ref_y, w, log, (cols, dtype, log))
    # The backward: ordinary rows within 8 eps, 0 at masked entries and on empty
    # rows, NaN on the rows holding +inf or NaN.
    _assert_close(dx[:2], ref_dx, 8 * eps(dtype), (cols, log))
    assert np.all(dx[:2][~np.asarray(w[:2])] == 0.0)
    for r in (FULLY_MASKED, ALL_NEG_INF):
      assert np.all(dx[r] == 0.0), (cols, log, r)
    for r in (HAS_NAN, HAS_POS_INF):
      assert np.all(np.isnan(dx[r])), (cols, log, r)
    assert not np.any(np.isnan(dx[:4]))


# --------------------------------------------------------- TPU kernels, interpret mode

TPU_DEFAULT = ops.make(tpu, tpu.Config(interpret=True))
# Small blocks, so that short rows take the online path and hit its edges.
TPU_SMALL = ops.make(tpu, tpu.Config(interpret=True, max_row_cols=1024, block_cols=1024))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
# 70000: online, 17 full blocks and a ragged tail.
@pytest.mark.parametrize("cols", [1, 127, 4097, 70000])
def test_tpu_kernels_interpret(cols, dtype):
  """(The edges of the online path at small blocks run under the TPU
  interpreter, below.)"""
  _check(TPU_DEFAULT, cols, dtype)


# --------------------------------------------- TPU kernels under the TPU interpreter


def _tpu_interpreted(seed: int, **blocks) -> tpu.Config:
  """The TPU kernels under Pallas's TPU interpreter (``pltpu.InterpretParams``),
  which models what the plain one does not: an output block goes back to HBM
  only when its block index changes (phase 0 of an online kernel keeps it at
  column block 0 so as to write nothing then), and a grid axis that revisits
  an output block must not be "parallel"; the "parallel" row axis is split
  over two cores (a v4 or v5p chip) and taken in random order. Like the plain
  one, it fills VMEM and the lanes of a ragged block past the array's end with
  NaN."""
  params = pltpu.InterpretParams(
    num_cores_or_threads=2,
    out_of_bounds_reads="uninitialized",
    uninitialized_memory="nan",
    random_seed=seed,
  )
  return tpu.Config(interpret=params, **blocks)


@pytest.fixture
def tpu_interpreter_state():
  """The TPU interpreter keeps global state after a kernel that raised; reset it
  so that one failure does not fail the tests after it."""
  yield
  pltpu.reset_tpu_interpret_mode_state()


# Rows of up to 256 columns kept whole, longer ones in blocks of 256.
TPU_BLOCKS_256 = dict(max_row_cols=256, block_cols=256)


@pytest.mark.usefixtures("tpu_interpreter_state")
# Blocks that divide the row; a tail of one column.
@pytest.mark.parametrize("cols", [512, 769], ids=["512-online", "769-online"])
def test_tpu_kernels_under_the_tpu_interpreter(cols):
  """The masking table's six rows, as ``test_tpu_kernels_interpret``, on the
  online path. (What this interpreter adds does not depend on the dtype: the
  16-bit kernels run under it in ``test_tpu_row_blocks_over_two_cores``, and on
  every path under the plain one.)"""
  _check(ops.make(tpu, _tpu_interpreted(cols, **TPU_BLOCKS_256)), cols, jnp.float32)


@pytest.mark.usefixtures("tpu_interpreter_state")
@pytest.mark.parametrize(
  "cols, dtype",
  [(200, jnp.float32), (700, jnp.bfloat16)],
  ids=["200-row-float32", "700-online-bfloat16"],  # 700: three blocks, the last ragged
)
def test_tpu_row_blocks_over_two_cores(cols, dtype):
  """40 rows in blocks of 16 (the last of 8) over two cores: softmax, log_softmax,
  their VJPs and the losses' row statistics against float64."""
  cfg = _tpu_interpreted(cols, **TPU_BLOCKS_256, block_bytes=16 * 1024)
  assert tpu._row_block(40, min(cols, 256), cfg) == 16
  be = ops.make(tpu, cfg)
  x, g = draws.normal(1, (40, cols), dtype, scale=3.0), draws.normal(2, (40, cols), dtype)
  x64, g64 = x.astype(jnp.float64), g.astype(jnp.float64)
  w = jnp.ones(x.shape, bool)
  for log in (False, True):
    y, dx = _run_jit(be, x, w, g, log)
    ref_y, vjp = jax.vjp(jax.nn.log_softmax if log else jax.nn.softmax, x64)
    _assert_close(np.asarray(y, np.float64), ref_y, 4 * eps(dtype), (cols, dtype, log))
    _assert_close(np.asarray(dx, np.float64), vjp(g64)[0], 8 * eps(dtype), (cols, dtype, log))
  m, d = jax.jit(lambda x: be.row_stats(x, None, (1,), None))(x)
  ref_m = x64.max(1, keepdims=True)
  assert np.array_equal(m, ref_m)
  ref_d = jnp.exp(x64 - ref_m).sum(1, keepdims=True)
  assert rel_err(np.asarray(d, np.float64), ref_d) <= 4 * eps(jnp.float32)


# --------------------------------------------------------- GPU kernels, interpret mode

GPU_DEFAULT = ops.make(gpu, gpu.Config(interpret=True))
# Ragged rows read from HBM element by element, as the default does past its
# bulk copies' 200 KiB (Config.ragged_bulk_bytes).
GPU_RAGGED_DIRECT = ops.make(gpu, gpu.Config(interpret=True, ragged_bulk_bytes=0))
# A tiny shared-memory budget, so that the rows stream through the online path
# (not split over a cluster), in the default form for streamed forward rows
# (per-element statistics, approximate math, 6 stages in 16 bits).
STREAM = dict(
  interpret=True,
  row_bytes=256,
  chunk_elems=256,
  bwd_row_bytes=256,
  split_bytes=0,
  bwd_split_bytes=0,
)
GPU_SMALL = ops.make(gpu, gpu.Config(**STREAM))
# The forward's statistics reduced chunk by chunk, through 3 stages.
GPU_SMALL_CHUNK_STATS = ops.make(
  gpu, gpu.Config(**STREAM, elementwise_stats=False, approx_math=False, stages=3)
)
# Forward and backward on different paths: one streams, the other keeps rows whole.
GPU_FWD_STREAMS = ops.make(
  gpu,
  gpu.Config(interpret=True, row_bytes=256, chunk_elems=256, bwd_row_bytes=1 << 20, split_bytes=0),
)
# Rows split over a cluster: 2048 columns as 8 chunks of 256, in parts of at most
# 2 KiB: forward 4 parts (float32) or 2, backward 8 or 4. One CTA in interpret
# mode holds every part of a row and merges the parts' statistics; it takes
# every row, each loading as the one before is written, as persistent clusters do.
SPLIT = {**STREAM, "split_bytes": 2048, "bwd_split_bytes": 2048, "split_cluster": 8}
GPU_SPLIT = ops.make(gpu, gpu.Config(**SPLIT))
# The forward's default form, scaled down: parts of at most 4 KiB, clusters of at
# most 2 (float32: 2 parts; 16 bits: whole rows), persistent (one CTA in
# interpret mode takes every row, as above), per-element statistics.
GPU_SPLIT_DEFAULT = ops.make(
  gpu, gpu.Config(interpret=True, row_bytes=256, chunk_elems=256, split_bytes=4096)
)
# A budget that holds the whole row: one part, no cluster (persistent CTAs keep
# long rows whole).
GPU_SPLIT_WHOLE = ops.make(
  gpu, gpu.Config(**{**STREAM, "split_bytes": 1 << 20, "bwd_split_bytes": 1 << 20})
)
GPU_BWD_STREAMS = ops.make(gpu, gpu.Config(**{**STREAM, "row_bytes": 1 << 20}))
# The same with the write pass taking the chunks first to last.
# (Ragged rows: read twice directly, not bulk copied.)
GPU_SMALL_FORWARD = ops.make(gpu, gpu.Config(**STREAM, reverse_write=False, ragged_bulk_bytes=0))
# Chunks that overlap (Plan.ov): near 1024 elements, 1280 columns are 5 sub-rows
# of 256 in 2 chunks of 3 (the second from sub-row 2), 1152 are 9 of 128 in 2 of
# 5 (the second from 4); kept whole.
OVERLAP = dict(interpret=True, chunk_elems=1024)
GPU_OVERLAP = ops.make(gpu, gpu.Config(**OVERLAP))
# Row statistics kept per element across the chunks and reduced once a row
# (Config.elementwise_stats): streamed, kept whole with an overlapping chunk,
# split over a cluster, and ragged.
ROW_STATS = dict(elementwise_stats=True)
GPU_SMALL_ROW_STATS = ops.make(gpu, gpu.Config(**STREAM, **ROW_STATS))
GPU_OVERLAP_ROW_STATS = ops.make(gpu, gpu.Config(**OVERLAP, **ROW_STATS))
GPU_SPLIT_ROW_STATS = ops.make(gpu, gpu.Config(**SPLIT, **ROW_STATS))
GPU_ROW_STATS = ops.make(gpu, gpu.Config(interpret=True, ragged_bulk_bytes=0, **ROW_STATS))
# Rows kept whole, the max and then the normaliser (Config.held_two_pass): with
# an overlapping chunk, and 8 chunks of 256 that divide the row.
TWO_PASS = dict(**ROW_STATS, held_two_pass=True)
GPU_OVERLAP_TWO_PASS = ops.make(gpu, gpu.Config(**OVERLAP, **TWO_PASS))
GPU_CHUNKS_TWO_PASS = ops.make(gpu, gpu.Config(interpret=True, chunk_elems=256, **TWO_PASS))
# Streamed rows shared by a cluster (Config.stream_cluster): 2048 columns in 8
# chunks of 256, 4 parts of 2 (one CTA in interpret mode streams every part and
# merges their statistics in cluster order); 8 parts of 1 with per-element
# statistics, written first to last.
GPU_STREAM_CLUSTER = ops.make(gpu, gpu.Config(**STREAM, stream_cluster=4))
# Rows whose last chunk overlaps the one before it, split: 1000 columns are 4
# chunks of 32 sub-rows of 8, the last from sub-row 93. In float32 the forward
# takes 2 parts of 2 chunks (the overlap within the last part), the backward 4 of
# 1 (across parts); in 16 bits, 1 part and 2; 4104 columns in 3 chunks of 176
# sub-rows, one part, persistent (the default form: GPU_DEFAULT below). (Such
# rows streamed: "1000-overlap-online".)
GPU_SPLIT_OVERLAP = GPU_SPLIT
# log_softmax's backward of whole rows takes each row's live flag from l. The
# flag gathered during the row sum (Config.live_in_rowsum, the default; the
# overlapping cases above take it with the shared part counted twice): rows of 8
# chunks of 256 (the partly masked row's first 4 all -inf). And the flag in a
# pass of its own over l (live_in_rowsum False): 9 sub-rows in chunks of 2, the
# last overlapping, the first 2 all -inf in the partly masked row.
GPU_ROWSUM_FLAG = ops.make(gpu, gpu.Config(interpret=True, chunk_elems=256, live_in_rowsum=True))
GPU_FLAG_PASS = ops.make(gpu, gpu.Config(interpret=True, chunk_elems=256, live_in_rowsum=False))
# Ragged rows through bulk copies of their 16-byte aligned interior, forward and
# backward (Config.ragged_bulk_bytes): the six rows start 0-3 float32 (0-7 16-bit)
# elements before an aligned one, so each lead occurs; 8999 columns (5 chunks
# of 2048 when read directly: past those held in registers) are an interior of
# 8992 float32 (8960 16-bit) in 9 chunks of 1024, the last overlapping, and a
# tail of 4-7 (32-39).
GPU_RAGGED_BULK = ops.make(
  gpu, gpu.Config(interpret=True, chunk_elems=1024, ragged_bulk_bytes=1 << 20)
)
# The backward's pairs past the budget (20000 bytes) with s or l alone within it
# (Config.ragged_bulk_g_twice): s or l bulk copied, g read twice from HBM, the
# row sum last chunk first, in chunks of twice chunk_elems. 4097 columns:
# float32 so (4064 of 4 bytes in 2 chunks of 2048, the last overlapping), the
# bfloat16 pair held (2 x 4032 of 2 bytes); 8193: bfloat16 so (8128 in 4
# chunks, the last overlapping), float32's rows past the budget read twice
# directly.
GPU_RAGGED_BULK_G_TWICE = ops.make(
  gpu,
  gpu.Config(interpret=True, chunk_elems=1024, ragged_bulk_bytes=20000, ragged_bulk_g_twice=True),
)
# log_softmax's 16-bit pairs past log_bwd_16bit_row_bytes split over a cluster
# (2048 bfloat16 columns: 4 parts, where softmax's pairs stay whole); float32's
# split either way here.
GPU_LOG_PAIRS_SPLIT = ops.make(
  gpu,
  gpu.Config(
    interpret=True,
    chunk_elems=256,
    bwd_row_bytes=8192,
    log_bwd_16bit_row_bytes=2048,
    bwd_split_bytes=2048,
  ),
)
# Short rows held in registers (Config.register_elems), read by 16-byte vectors
# straight from HBM: 2000 columns in 2 chunks, the last overlapping (float32:
# 1536 and the last 1536, from 464; 16-bit: 1024 and from 976), both ways; 8192
# columns, the forward in 4 chunks, the backward's pair (past the budget) kept
# whole in SMEM, its live flag taken from l, as no lse was written.
GPU_REGISTERS = ops.make(gpu, gpu.Config(interpret=True, register_elems=8192))
# A chunk count rounded up to a multiple of 8 (Config.chunk_multiple): 50304
# columns (393 sub-rows of 128) in 16 chunks of 26, the last from sub-row 367,
# where the default's 13 chunks stream the backward's pairs; the pairs split
# over 8 CTAs (float32) or 4 (16-bit), the forward in one part.
GPU_CHUNK_MULTIPLE = ops.make(gpu, gpu.Config(interpret=True, chunk_multiple=8))
GPU_STREAM_CLUSTER_8 = ops.make(
  gpu, gpu.Config(**STREAM, **ROW_STATS, stream_cluster=8, reverse_write=False)
)


# (cols, backend, id): each in float32 and bfloat16; float16 too where its id
# is in F16_CASES.
GPU_CASES = [
  (384, GPU_DEFAULT, "384-fits"),
  (1280, GPU_SMALL, "1280-online"),
  (1280, GPU_SMALL_CHUNK_STATS, "1280-online-chunk-stats"),
  (1280, GPU_SMALL_FORWARD, "1280-online-forward-order"),
  (1280, GPU_FWD_STREAMS, "1280-fwd-online"),
  (1280, GPU_BWD_STREAMS, "1280-bwd-online"),
  (2048, GPU_SPLIT, "2048-split"),
  (2048, GPU_SPLIT_DEFAULT, "2048-split-default-form"),
  (1280, GPU_SPLIT_WHOLE, "1280-split-one-part"),
  (256, GPU_SPLIT_WHOLE, "256-split-one-chunk"),
  # Chunks that overlap (Plan.ov); 1000 columns are 125 sub-rows of 8.
  (1152, GPU_OVERLAP, "1152-overlap-fits"),
  (1000, GPU_SMALL, "1000-overlap-online"),  # streamed, 4 chunks of 32: the last from 93
  # 4000 bytes: not whole TMA copies of 128 bytes, so split: one part, persistent
  (1000, GPU_DEFAULT, "1000-overlap-split-default"),
  (1280, GPU_OVERLAP, "1280-overlap-wide"),  # (wide sub-rows)
  (
    4104,
    GPU_DEFAULT,
    "4104-overlap-split-default",
  ),  # 513 sub-rows of 8 (split: more than 256), chunks of 176
  # 4375 sub-rows of 16, 18 chunks of 248, the last from 4127: the forward in 2
  # parts (float32) or one, the backward's pairs streamed
  (70000, GPU_DEFAULT, "70000-overlap-split-default"),
  # Ragged rows (not a multiple of 16 bytes): an interior too short for a bulk
  # copy, chunks of 2048 elements in registers (2 chunks of 128: the second from 1)
  (129, GPU_DEFAULT, "129-ragged"),
  # the forward's rows held in registers (3 chunks: the last from 2049), the
  # backward's pairs bulk copied (interiors of 4064 float32, 4032 16-bit
  # elements, in 2 chunks of 3968, the last overlapping, and the windows either
  # side)
  (4097, GPU_DEFAULT, "4097-ragged"),
  # read twice directly: 10 chunks, the last from 17953
  (20001, GPU_RAGGED_DIRECT, "20001-ragged"),
  (1280, GPU_SMALL_ROW_STATS, "1280-online-row-stats"),
  (1152, GPU_OVERLAP_ROW_STATS, "1152-overlap-fits-row-stats"),
  (2048, GPU_SPLIT_ROW_STATS, "2048-split-row-stats"),
  (4097, GPU_ROW_STATS, "4097-ragged-row-stats"),
  (2048, GPU_STREAM_CLUSTER, "2048-online-cluster-of-4"),
  (2048, GPU_STREAM_CLUSTER_8, "2048-online-cluster-of-8-row-stats"),
  (1152, GPU_OVERLAP_TWO_PASS, "1152-overlap-fits-two-pass"),
  (2048, GPU_CHUNKS_TWO_PASS, "2048-fits-two-pass"),
  (1000, GPU_SPLIT_OVERLAP, "1000-overlap-split"),
  (2048, GPU_ROWSUM_FLAG, "2048-fits-rowsum-flag"),
  (8999, GPU_RAGGED_BULK, "8999-ragged-bulk"),
  (2048, GPU_LOG_PAIRS_SPLIT, "2048-log-pairs-split"),
  (1152, GPU_FLAG_PASS, "1152-overlap-fits-flag-pass"),
  (2000, GPU_REGISTERS, "2000-registers-overlap"),
  (8192, GPU_REGISTERS, "8192-registers-forward"),
  # Ragged rows read twice, the second pass first to last (the default takes
  # the last chunk first): 5 chunks, the last from 6149.
  (8197, GPU_SMALL_FORWARD, "8197-ragged-forward-order"),
  (4097, GPU_RAGGED_BULK_G_TWICE, "4097-ragged-bulk-g-twice"),
  (8193, GPU_RAGGED_BULK_G_TWICE, "8193-ragged-bulk-g-twice"),
  (50304, GPU_CHUNK_MULTIPLE, "50304-overlap-chunk-multiple"),
]
# float16 on each path the defaults take: rows kept whole, streamed, split,
# overlapping chunks kept whole and split, ragged rows held and read twice. The
# forms that are off by default, and the defaults' other cases of these paths
# (2048-split, 4104-overlap-split-default, 129-ragged), run in float32 and
# bfloat16 only, whose 16-bit code float16 shares (it is lowered for cuda in
# every default form below), as do the 70000 columns, the longest case.
F16_CASES = {
  "384-fits",
  "1280-online",
  "2048-split-default-form",
  "1152-overlap-fits",
  "1000-overlap-split-default",
  "4097-ragged",
  "20001-ragged",
}
# Forms that are off by default and not queued for a GPU run (benchmarks/
# gpu_pallas.py's VARIANTS): float32 only. Each recombines code that runs in 16
# bits here elsewhere:
# - per-element statistics (16-bit rows kept whole, long forward rows);
# - statistics reduced chunk by chunk (the backward);
# - the streamed write first to last, and streamed clusters
#   (2048-online-cluster-of-8-row-stats);
# - the live flag read from l (2048-fits-rowsum-flag);
# - the ragged second pass (20001-ragged, last chunk first);
# - a 16-bit pair within the budget, bulk copied (4097-ragged).
# The last four forms were dropped after the H200 run T1934Z: streamed clusters
# of 4, the live flag in a pass of its own, the ragged second pass first to
# last, and g read twice beside a bulk copy of s (whose 16-bit case,
# 8193-ragged-bulk-g-twice, keeps both dtypes).
FLOAT32_ONLY = {
  "1280-online-chunk-stats",
  "1280-online-forward-order",
  "1280-online-row-stats",
  "1152-overlap-fits-row-stats",
  "2048-split-row-stats",
  "4097-ragged-row-stats",
  "2048-online-cluster-of-4",
  "1152-overlap-fits-flag-pass",
  "8197-ragged-forward-order",
  "4097-ragged-bulk-g-twice",
}
assert F16_CASES | FLOAT32_ONLY <= {case for _, _, case in GPU_CASES}


def _dtypes_of(case):
  if case in FLOAT32_ONLY:
    return [jnp.float32]
  return DTYPES if case in F16_CASES else OFF_DTYPES


@pytest.mark.parametrize(
  "cols, be, dtype",
  [
    pytest.param(cols, be, dt, id=f"{case}-{jnp.dtype(dt).name}")
    for cols, be, case in GPU_CASES
    for dt in _dtypes_of(case)
  ],
)
def test_gpu_kernels_interpret(cols, be, dtype):
  _check(be, cols, dtype)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_gpu_split_rows_merge_the_parts_statistics(log):
  # 2048 float32 columns in 4 parts of 512 (backward: 8 of 256). The rows put the
  # max in different parts, and leave whole parts masked or -inf, so that a
  # part's statistics are (-inf, 0) and must not turn the merge into NaN.
  x = draws.normal(9, (8, 2048), scale=3.0)
  x = x.at[1, 1700].set(40.0).at[2, 5].set(40.0).at[3, :1536].set(-jnp.inf)
  w = jnp.ones((8, 2048), bool).at[4, 512:].set(False).at[5, :512].set(False)
  w = w.at[6, 1024:1536].set(False).at[7].set(False)
  g = draws.normal(10, (8, 2048))
  p = gpu.plan(2048, jnp.float32, gpu.Config(chunk_elems=256))
  assert gpu.cluster_size(p, 2048 * 4, 2048) == 4
  assert gpu.cluster_size(p, 2 * 2048 * 4, 2048, arrays=2) == 8
  y, dx = map(np.asarray, _run_jit(GPU_SPLIT, x, w, g, log))
  f = jax.nn.log_softmax if log else jax.nn.softmax
  ry, vjp = jax.vjp(lambda v: f(v, axis=1, where=w), x.astype(jnp.float64))
  rdx = np.asarray(vjp(jnp.where(w, g, 0.0).astype(jnp.float64))[0])
  ry = np.asarray(ry)
  live = np.arange(8) < 7
  finite = np.isfinite(ry[live])
  assert np.array_equal(np.isfinite(y[live]), finite)
  assert rel_err(y[live][finite], ry[live][finite]) <= 4 * eps(jnp.float32)
  assert rel_err(dx[live], rdx[live]) <= 8 * eps(jnp.float32)
  assert np.all(y[7] == (-np.inf if log else 0.0)) and np.all(dx[7] == 0.0)


def _np_stats(x):
  """float64 max and normaliser of each row (NumPy, -inf rows give (-inf, 0))."""
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=1)
  with np.errstate(invalid="ignore"):
    d = np.sum(np.exp(x - np.where(m == -np.inf, 0.0, m)[:, None]), axis=1)
  return m, d


_FORCED = []


def _use_backend(monkeypatch, name):
  """Every op resolves its backend to ``name``. The losses run through a cached
  jit whose key does not hold the resolution (one backend per process outside
  tests), so the caches are cleared on the way in and, by ``_clear_forced``, out."""
  jax.clear_caches()
  monkeypatch.setattr(_backend, "resolve", lambda *a, **k: name)
  _FORCED.append(name)


def _fake_platform(monkeypatch, platform):
  """``jax.default_backend()`` says ``platform``; cleared caches as ``_use_backend``."""
  jax.clear_caches()
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  _FORCED.append(platform)


@pytest.fixture(autouse=True)
def _clear_forced():
  yield
  if _FORCED:
    _FORCED.clear()
    jax.clear_caches()


def test_gpu_elementwise_row_statistics():
  # _ew_online over a row's chunks, then _ew_reduce, against NumPy in float64:
  # chunks whose max rises, falls or stays; -inf entries and whole -inf
  # chunks; an all -inf row; a NaN; a +inf (the normaliser becomes NaN, as in
  # the chunk-by-chunk statistics); and two +inf (the same).
  rng = np.random.default_rng(0)
  rows, nc, k = 8, 5, 16
  x = 4.0 * rng.standard_normal((rows, nc * k))
  x[0] += np.linspace(-30.0, 30.0, nc * k)  # the max rises chunk after chunk
  x[1] -= np.linspace(-30.0, 30.0, nc * k)  # and falls
  x[2, : 3 * k] = -np.inf  # whole chunks of -inf first
  x[3, ::3] = -np.inf
  x[4] = -np.inf
  x[5, 40] = np.nan
  x[6, 17] = np.inf
  x[7, [3, 70]] = np.inf
  x = x.astype(np.float32)
  chunks = np.split(x, nc, axis=1)
  md = (jnp.full((rows, k), -jnp.inf), jnp.zeros((rows, k)))
  for c in chunks:
    md = gpu._ew_online(md, jnp.asarray(c))
  m, d = jax.vmap(lambda m, d: gpu._ew_reduce((m, d)))(*md)
  rm, rd = _np_stats(x)
  rd[6:] = np.nan  # a +inf: exp(inf - inf) in the reference's sum
  for r in range(rows):
    ok = np.isnan(rd[r]) if np.isnan(rd[r]) else np.isclose(d[r], rd[r], rtol=1e-5, atol=0)
    assert ok and (m[r] == rm[r] or (np.isnan(m[r]) and np.isnan(rm[r]))), (r, m[r], d[r])
  # Rows of one chunk keep the chunk-by-chunk statistics (reduced once either way).
  cfg = gpu.Config(elementwise_stats=True)
  assert gpu._Acc.of(cfg, 2, (k,), None).elementwise
  assert not gpu._Acc.of(cfg, 1, (k,), None).elementwise
  # The chunk-by-chunk statistics agree (one reduction a chunk).
  for r in range(rows):
    mc, dc = jnp.float32(-jnp.inf), jnp.float32(0)
    for c in chunks:
      mc, dc = gpu._online_stats(mc, dc, jnp.asarray(c[r]))
    assert np.array_equal(np.isnan([mc, dc]), np.isnan([m[r], d[r]])), r


def test_gpu_cluster_size():
  # The smallest power of two <= 8 dividing the row's chunks with parts within budget.
  p = gpu.plan(65536, jnp.float32)  # 16 chunks of 4096
  assert gpu.cluster_size(p, 65536 * 4, 64 * 1024) == 4
  assert gpu.cluster_size(p, 2 * 65536 * 4, 64 * 1024, arrays=2) == 8
  assert gpu.cluster_size(p, 65536 * 4, 256 * 1024) == 1
  assert gpu.cluster_size(p, 65536 * 4, 16 * 1024) == 0  # would take 16 CTAs
  assert gpu.cluster_size(p, 65536 * 4, 0) == 0  # no budget: off
  p = gpu.plan(3 * 4096, jnp.float32)  # 3 chunks: no power of two > 1 divides them
  assert gpu.cluster_size(p, 3 * 4096 * 4, 32 * 1024) == 0
  # 64 chunks of 1024: at most 31 chunks a CTA (15 of each of two rows), so that
  # their barriers and the row flag's fit in one array of 32.
  p = gpu.plan(65536, jnp.float32, gpu.Config(chunk_elems=1024))
  assert gpu.cluster_size(p, 65536 * 4, 1 << 20) == 4
  assert gpu.cluster_size(p, 2 * 65536 * 4, 1 << 20, arrays=2) == 8


def test_gpu_route():
  # Which path each shape takes, forward and backward, by the sizes in Config.
  def route(rows, cols, dtype, backward=False, **cfg):
    cfg = gpu.Config(**cfg)
    return gpu.route(rows, gpu.plan(cols, dtype, cfg), dtype, cfg, backward)

  f32, bf16 = jnp.float32, jnp.bfloat16
  assert route(4096, 16384, f32) == ("rows", 1)  # 64 KiB <= 96 KiB
  assert route(4096, 16384, f32, True) == ("rows", 1)  # two 64 KiB rows <= 200 KiB
  # The forward splits rows past 96 KiB in parts of 200 KiB over clusters of up
  # to 2 persistent CTAs (1024 x 65536: 0.79-0.81x the streamed time on an H100),
  # else streams them.
  assert route(1024, 32768, f32) == ("split", 1)  # 128 KiB, whole
  assert route(1024, 65536, bf16) == ("split", 1)
  assert route(1024, 65536, f32) == ("split", 2)
  assert route(128, 262144, bf16) == ("streamed", 1)  # 4 parts
  assert route(128, 262144, f32, split_cluster=8) == ("split", 8)
  assert route(1024, 32768, bf16, True) == ("rows", 1)
  # The backward splits pairs of rows past 200 KiB in parts of 64 KiB, up to 8
  # (what the H200 measured faster than streaming them), else streams them.
  assert route(1024, 65536, f32, True) == ("split", 8)
  assert route(1024, 65536, bf16, True) == ("split", 4)
  assert route(1024, 32768, f32, True) == ("split", 4)
  assert route(128, 262144, bf16, True) == ("streamed", 1)  # 16 parts
  assert route(1024, 65536, f32, True, bwd_split_bytes=0) == ("streamed", 1)
  assert route(1024, 65536, f32, split_bytes=0) == ("streamed", 1)
  # Streamed rows shared by a cluster: a power of two up to 8 dividing the chunks.
  assert route(128, 262144, f32, stream_cluster=4) == ("streamed", 4)  # 64 chunks
  assert route(128, 262144, bf16, True, stream_cluster=16) == ("streamed", 8)
  streams = dict(row_bytes=1024, split_bytes=0, stream_cluster=4)
  assert route(8, 3 * 4096, f32, **streams) == ("streamed", 1)  # 3 chunks
  assert route(8, 6 * 4096, f32, **streams) == ("streamed", 2)
  assert route(1024, 65536, f32, True, stream_cluster=4) == ("split", 8)  # split first
  # An overlapping chunk: split like the others; streamed, one CTA a row.
  assert route(8, 70000, f32, stream_cluster=4) == ("split", 2)
  assert route(8, 70000, f32, stream_cluster=4, split_bytes=0) == ("streamed", 1)
  assert route(1024, 65536, f32, split_bytes=64 * 1024, split_cluster=8) == ("split", 4)
  assert route(1024, 65536, f32, split_bytes=64 * 1024) == ("streamed", 1)  # 4 > 2 parts
  assert route(1024, 65536, f32, True, bwd_split_bytes=128 * 1024) == ("split", 4)
  assert route(128, 262144, f32, split_bytes=64 * 1024) == ("streamed", 1)  # 16 parts
  assert route(128, 262144, bf16, split_bytes=128 * 1024, split_cluster=4) == ("split", 4)
  assert route(1024, 32768, f32, split_bytes=200 * 1024) == ("split", 1)  # one part
  assert route(1024, 16384, f32, split_bytes=200 * 1024) == ("rows", 1)  # fits: not split
  # Short rows held in registers (register_elems): up to 4 chunks of 2048
  # elements, the backward's pair counting twice, and at least one chunk of
  # 16-byte vectors (512 float32, 1024 16-bit). Off by default.
  regs = dict(register_elems=8192)
  assert route(4096, 1024, f32, **regs) == ("registers", 1)
  assert route(4096, 1024, bf16, True, **regs) == ("registers", 1)
  assert route(4096, 4096, f32, True, **regs) == ("registers", 2)
  assert route(64, 2000, f32, **regs) == ("registers", 2)
  assert route(64, 8192, bf16, **regs) == ("registers", 4)
  assert route(64, 8192, bf16, True, **regs) == ("rows", 1)  # 2 x 8192 elements
  assert route(64, 16384, f32, register_elems=1 << 20) == ("rows", 1)  # 8 chunks
  assert route(64, 512, f32, **regs) == ("registers", 1)
  assert route(64, 768, bf16, **regs) == ("rows", 1)  # shorter than 1024
  assert route(4096, 1024, f32) == ("rows", 1)
  # log_softmax's backward in registers takes its live flag from l.
  assert not gpu.bwd_reads_live(4096, 1024, f32, gpu.Config(**regs))
  # So does the backward of rows kept whole in SMEM; the streamed and split
  # backward and the ragged rows read the flag (the forward writes the lse).
  assert not gpu.bwd_reads_live(4096, 1024, f32)
  assert gpu.bwd_reads_live(128, 262144, f32) and gpu.bwd_reads_live(1024, 65536, f32)
  assert gpu.bwd_reads_live(8, 4097, f32)


@pytest.mark.parametrize("cols", [1, 100, 127])
def test_gpu_short_rows_are_declared_unsupported(cols):
  # Rows shorter than one element per thread of the warpgroup run on XLA; the
  # reason names the length. (Any row length from 128 runs.)
  for dtype in DTYPES:
    reason = gpu.unsupported_reason(4, cols, dtype)
    assert isinstance(reason, str) and str(cols) in reason
    assert gpu.unsupported_reason(4, 128 + cols, dtype) is None
  x = jnp.ones((4, cols), jnp.float32)
  with pytest.raises(ValueError, match=f"row length {cols} is shorter"):
    gpu.softmax_fwd_2d(x, log=False, cfg=gpu.Config(interpret=True))
  with pytest.raises(ValueError, match=f"row length {cols} is shorter"):
    gpu.softmax_bwd_2d(x, x, log=False, cfg=gpu.Config(interpret=True))


def test_gpu_plan_invariants():
  # Every row length: TMA chunks (kb * w a multiple of 128 elements, at most 4096,
  # at least half of the chunk wanted), the row in nc chunks whose last shares ov
  # < kb sub-rows with the one before (none when kb divides it), rows kept whole
  # only in one TMA copy; or, for rows not a multiple of 16 bytes, the ragged
  # kernels; rows under 128 elements only are unsupported.
  for dtype in (jnp.float32, jnp.bfloat16):
    size = jnp.dtype(dtype).itemsize
    for cols in [*range(1, 3000), *range(3000, 300000, 97)]:
      p = gpu.plan(cols, dtype)
      assert (gpu.unsupported_reason(1, cols, dtype) is None) == (cols >= 128), cols
      if isinstance(p, str):
        assert cols < 128 or (cols * size) % 16, (cols, dtype)
        continue
      assert cols >= 128 and p.n1 * p.w == cols and (p.w * size) % 16 == 0, (cols, dtype)
      step = max(1, 128 // p.w)
      want = min(4096 // p.w, 256, p.n1) // step * step
      assert p.kb % step == 0 and want // 2 <= p.kb <= want, (cols, dtype)
      assert 0 <= p.ov < p.kb and (p.ov > 0) == (p.n1 % p.kb > 0), (cols, dtype)
      if p.fits:
        assert p.n1 <= 256 and (cols * size) % 128 == 0 and cols * size <= 96 * 1024


def _covers(starts, size, length):
  """Chunks of ``size`` at ``starts`` lie within ``[0, length)``, in order, and cover it."""
  ends = [s + size for s in starts]
  assert starts[0] == 0 and ends[-1] == length and max(ends) <= length
  for a, b, e in zip(starts, starts[1:], ends, strict=False):  # each starts in the one before
    assert a < b <= e


def test_gpu_chunks_stay_within_the_row():
  # The interpreter clamps a copy that leaves its row, so the kernel tests cannot
  # see one; a GPU would read or write the next row. Chunk starts, checked here.
  for cols, dtype in [(32000, jnp.float32), (70000, jnp.bfloat16), (4104, jnp.float32)]:
    p = gpu.plan(cols, dtype)
    assert p.ov > 0
    _covers([int(gpu._start(p, j)) for j in range(p.nc)], p.kb, p.n1)
  for cols in [129, 4097, 50257]:
    p = gpu._ragged_plan(cols)
    L, nc, ov = p.kb, p.nc, p.ov
    starts = [int(gpu._start(p, j)) for j in range(nc)]
    _covers(starts, L, cols)
    assert starts[-1] == (nc - 1) * L - ov


def test_gpu_chunk_count_a_multiple_of_the_cluster():
  # Config.chunk_multiple, by hand. 50304 = 393 x 128: chunks near 4096
  # elements are 31 sub-rows, ceil(393 / 31) = 13 chunks. The largest chunk of
  # 16 to 32 sub-rows whose count ceil(393 / kb) is a multiple of 8: 32 and 31
  # give 13, 30 and 29 14, 28 and 27 15, 26 gives 16; 16 x 26 - 393 = 23
  # sub-rows shared by the last two. Then the backward's pair (2 x 196.5 KiB
  # float32) splits over 8 CTAs in 64 KiB parts; 13 chunks split over none.
  cfg = gpu.Config(chunk_multiple=8)
  p0, p = gpu.plan(50304, jnp.float32), gpu.plan(50304, jnp.float32, cfg)
  assert (p0.n1, p0.w, p0.kb, p0.nc, p0.ov) == (393, 128, 31, 13, 10)
  assert (p.n1, p.w, p.kb, p.nc, p.ov) == (393, 128, 26, 16, 23)
  _covers([int(gpu._start(p, j)) for j in range(p.nc)], p.kb, p.n1)
  assert gpu.route(4096, p0, jnp.float32, gpu.Config(), True) == ("streamed", 1)
  assert gpu.route(4096, p, jnp.float32, cfg, True) == ("split", 8)
  # 152064 = 594 x 256, which 11 sub-rows divide (54 chunks, no overlap): of 8
  # to 16, 16 gives ceil(37.1) = 38 chunks, 15 gives 40; 600 - 594 = 6 shared.
  p = gpu.plan(152064, jnp.float32, cfg)
  assert gpu.plan(152064, jnp.float32).kb == 11
  assert (p.n1, p.w, p.kb, p.nc, p.ov) == (594, 256, 15, 40, 6)
  _covers([int(gpu._start(p, j)) for j in range(p.nc)], p.kb, p.n1)
  # At most 8 chunks, or a multiple of 8 already: as they come (1000 = 125 x 8
  # in 2 chunks; 32000 in 8; 65536 in 16 of 4096).
  for cols in (1000, 32000, 65536):
    assert gpu.plan(cols, jnp.float32, cfg) == gpu.plan(cols, jnp.float32)


def test_gpu_ragged_rows_take_the_ragged_kernels():
  # TMA takes rows of a multiple of 16 bytes; others go through registers.
  assert isinstance(gpu.plan(4097, jnp.float32), str)
  assert isinstance(gpu.plan(50260, jnp.bfloat16), str)  # 4 bytes past a multiple of 16
  assert isinstance(gpu.plan(50260, jnp.float32), gpu.Plan)

  def chunks(cols):  # (L, nc, ov)
    p = gpu._ragged_plan(cols)
    return p.kb, p.nc, p.ov

  assert chunks(4097) == (2048, 3, 2047)
  assert chunks(50257) == (2048, 25, 943)
  assert chunks(129) == (128, 2, 127)
  assert chunks(2048 + 128) == (2048, 2, 1920)


def test_gpu_plan_chunks():
  # (n1, w, kb, chunks, overlap): w the largest power of two <= 256 dividing the
  # row, kb * w a multiple of 128 near 4096 elements; a kb dividing n1 if it gives
  # at least half of that, else about n1 / chunks rounded up, the last chunk
  # starting at n1 - kb.
  def chunks(cols, **cfg):
    p = gpu.plan(cols, jnp.float32, gpu.Config(**cfg))
    return p.n1, p.w, p.kb, p.nc, p.ov

  assert chunks(65536) == (256, 256, 16, 16, 0)
  assert chunks(100352) == (392, 256, 14, 28, 0)  # 3584 elements divide it
  assert chunks(256000) == (1000, 256, 10, 100, 0)  # 2560
  assert chunks(384) == (3, 128, 3, 1, 0)  # one chunk, the whole row
  assert chunks(32000) == (125, 256, 16, 8, 3)  # 5 sub-rows divide it: 1280 elements
  assert chunks(50304) == (393, 128, 31, 13, 10)  # 3 sub-rows divide it: 384 elements
  assert chunks(70000) == (4375, 16, 248, 18, 89)
  assert chunks(4104) == (513, 8, 176, 3, 15)
  assert chunks(1000) == (125, 8, 64, 2, 3)  # 112 sub-rows wanted, as 2 chunks of 64
  assert chunks(1280, chunk_elems=1024) == (5, 256, 3, 2, 1)
  # Overlapping chunks split over a cluster like the others.
  p = gpu.plan(32000, jnp.float32)
  assert gpu.cluster_size(p, 32000 * 4, 64 * 1024) == 2
  off = gpu.Config(split_bytes=0, bwd_split_bytes=0)
  assert [gpu.route(1024, p, jnp.float32, off, b) for b in (0, 1)] == [("streamed", 1)] * 2
  both = [gpu.route(1024, p, jnp.float32, gpu.Config(), b) for b in (0, 1)]
  assert both == [("split", 1), ("split", 4)]  # 125 KiB rows whole, 250 KiB pairs in 4


# ------------------------------------------------- the custom_vjp cores and any axes


def test_custom_vjp_cores_run_the_kernels_for_any_axes():
  x = draws.normal(3, (3, 4, 5))
  w = draws.bernoulli(4, 0.7, (1, 4, 5)).at[:, :, 0].set(True)
  g = draws.normal(5, x.shape)
  for axes in [(1,), (0, 2)]:
    for log, ours, ref in [
      (False, core._softmax, jax.nn.softmax),
      (True, lambda *a: core._log_softmax(*a)[0], jax.nn.log_softmax),
    ]:

      @jax.jit
      def both(x, w, g):
        y, vjp = jax.vjp(lambda v: ours(v, w, axes, None, "pallas:tpu:interpret"), x)  # noqa: B023
        ry, rvjp = jax.vjp(lambda v: ref(v, axis=axes, where=w), x.astype(jnp.float64))  # noqa: B023
        return y, vjp(g)[0], ry, rvjp(jnp.where(w, g, 0.0).astype(jnp.float64))[0]

      y, dx, ry, rdx = both(x, w, g)
      fin = np.isfinite(np.asarray(ry))
      assert np.array_equal(np.isfinite(np.asarray(y)), fin)
      assert rel_err(np.asarray(y)[fin], np.asarray(ry)[fin]) <= 4 * eps(jnp.float32)
      assert rel_err(dx, rdx) <= 8 * eps(jnp.float32), (axes, log)


@pytest.mark.parametrize("kernel_forward, cols", [(True, 129), (False, 256)])
def test_kernels_one_way_xla_the_other(kernel_forward, cols):
  # "pallas/xla" (what implementation=None takes for ragged rows on a GPU): the
  # kernel's forward, XLA's backward on what it saved (s; l and the live flag);
  # "xla/pallas" (short rows): XLA's forward, the kernel's backward (on whole
  # rows, taking log_softmax's live flag from l). Against float64 jax.nn, with
  # a mask, an empty row and an all -inf row.
  kernels = _backend.get("pallas:gpu:interpret")
  name = "pallas:gpu:interpret/xla" if kernel_forward else "xla/pallas:gpu:interpret"
  mixed = _backend.get(name)
  fwd, bwd = (kernels, _xla) if kernel_forward else (_xla, kernels)
  assert mixed.softmax_fwd is fwd.softmax_fwd
  assert mixed.log_softmax_fwd is fwd.log_softmax_fwd
  assert mixed.softmax_bwd is bwd.softmax_bwd
  assert mixed.log_softmax_bwd is bwd.log_softmax_bwd
  x = draws.normal(21, (6, cols), scale=3.0)
  x = x.at[4].set(-jnp.inf)
  w = draws.bernoulli(22, 0.8, x.shape).at[1].set(False)
  g = draws.normal(23, x.shape)
  for ours, ref in [
    (core._softmax, jax.nn.softmax),
    (lambda *a: core._log_softmax(*a)[0], jax.nn.log_softmax),
  ]:
    y, vjp = jax.vjp(lambda v: ours(v, w, (1,), None, name), x)  # noqa: B023
    dx = vjp(g)[0]
    ry, rvjp = jax.vjp(lambda v: ref(v, axis=1, where=w), x.astype(jnp.float64))  # noqa: B023
    rdx = rvjp(jnp.where(w, g, 0.0).astype(jnp.float64))[0]
    live = np.array([True, False, True, True, False, True])
    yl, ryl = np.asarray(y)[live], np.asarray(ry)[live]
    fin = np.isfinite(ryl)
    assert np.array_equal(np.isfinite(yl), fin)  # -inf where masked (log_softmax)
    assert rel_err(yl[fin], ryl[fin]) <= 4 * eps(jnp.float32)
    assert rel_err(dx[live], rdx[live]) <= 8 * eps(jnp.float32)
    assert not np.any(np.isnan(np.asarray(dx)))
    assert np.all(np.asarray(dx)[~live] == 0)  # empty rows: no gradient


@pytest.mark.parametrize(
  "be, cols",
  [("pallas:gpu:interpret", 256), ("pallas:gpu:interpret", 129), ("pallas:tpu:interpret", 256)],
  ids=["gpu", "gpu-ragged", "tpu"],
)
def test_kernels_under_vmap(be, cols):
  # vmap(vjp) of the cores, as per-example gradients do: the kernels' batching
  # rules, against float64 jax.nn on the whole batch.
  x = draws.normal(11, (3, 4, cols))
  g = draws.normal(12, x.shape)
  for log, ours, ref in [
    (False, core._softmax, jax.nn.softmax),
    (True, lambda *a: core._log_softmax(*a)[0], jax.nn.log_softmax),
  ]:

    def value_and_vjp(x, g):
      y, vjp = jax.vjp(lambda v: ours(v, None, (1,), None, be), x)  # noqa: B023
      return y, vjp(g)[0]

    y, dx = jax.jit(jax.vmap(value_and_vjp))(x, g)
    ry, rvjp = jax.vjp(lambda v: ref(v, axis=-1), x.astype(jnp.float64))  # noqa: B023
    assert rel_err(y, ry) <= 4 * eps(jnp.float32), log
    assert rel_err(dx, rvjp(g.astype(jnp.float64))[0]) <= 8 * eps(jnp.float32), log


def test_gpu_kernels_lower_for_cuda_under_vmap():
  def value_and_vjp(x, g):
    y, vjp = jax.vjp(lambda v: core._softmax(v, None, (1,), None, "pallas:gpu"), x)
    return y, vjp(g)[0]

  for cols in (4097, 4096):  # (4097: the ragged kernels)
    x = jax.ShapeDtypeStruct((8, 512, cols), jnp.bfloat16)
    f = jax.jit(jax.vmap(value_and_vjp))
    text = jax.export.export(f, platforms=["cuda"])(x, x).mlir_module()
    assert "mosaic_gpu" in text and "stablehlo.while" not in text  # one launch, no loop


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_reverse_over_reverse_falls_back_to_xla(log):
  # The kernels' backward is a custom_vjp whose own VJP is the XLA backward's.
  x = jnp.array([[0.3, -1.2, 2.0, 0.5], [1.0, 1.0, -0.5, 0.0]], jnp.float32)
  ours = (
    (lambda v: core._log_softmax(v, None, (1,), None, "pallas:tpu:interpret")[0])
    if log
    else (lambda v: core._softmax(v, None, (1,), None, "pallas:tpu:interpret"))
  )
  ref = jax.nn.log_softmax if log else jax.nn.softmax
  h = jax.jit(jax.jacrev(jax.jacrev(ours)))(x)
  rh = jax.jit(jax.jacrev(jax.jacrev(partial(ref, axis=1))))(x.astype(jnp.float64))
  assert rel_err(h, rh) <= 8 * eps(jnp.float32)


# ------------------------------------------------------------- lowering for hardware

LOWER_SHAPES = [(8, 1), (37, 127), (64, 4096), (40, 4097), (4, 16384), (3, 70000), (2, 262144)]
OVERLAP_SHAPES = [(16, 32000), (8, 50304), (5, 1000), (5, 4104), (3, 70000)]
RAGGED_SHAPES = [(37, 129), (40, 4097), (8, 50257)]


def _kernels(mod, alone: bool = False):
  """The kernels of a module (or ``_gpu_kernels``) as a call runs them, with
  their arguments for an input like ``x``. ``alone`` adds log_softmax's forward
  when not differentiated (no lse): softmax's forward has the same lse-free
  ending, and log_softmax's the same log, so the other tests leave it out."""
  st = lambda r: jax.ShapeDtypeStruct((r, 1), jnp.float32)  # noqa: E731
  kernels = {
    "softmax_fwd": (partial(mod.softmax_fwd_2d, log=False), lambda x: (x,)),
    "log_softmax_fwd": (partial(mod.softmax_fwd_2d, log=True), lambda x: (x,)),
    "softmax_bwd": (partial(mod.softmax_bwd_2d, log=False), lambda x: (x, x)),
    "log_softmax_bwd": (
      lambda l, live, g: mod.softmax_bwd_2d(l, g, live, log=True),
      lambda x: (x, st(x.shape[0]), x),
    ),
  }
  if alone:
    kernels["log_softmax_fwd_alone"] = (
      partial(mod.softmax_fwd_2d, log=True, lse=False),
      lambda x: (x,),
    )
  return kernels


# How a kernel call reads in an exported module's text, by platform.
KERNEL_CALL = {"cuda": "custom_call @mosaic_gpu", "tpu": "custom_call @tpu_custom_call"}


def _export_together(calls, platform: str) -> str:
  """Exports the ``(f, args)`` of ``calls`` for ``platform`` with ``jax.export``,
  as one program that makes every call; checks that each call lowered to one
  kernel call of the platform's; returns the module's text. One export for
  them all pays its fixed costs (the module's MLIR contexts, its serialization
  and parsing back) once: the lowering tests take a quarter less time than with
  an export per call. Where it fails, the first call that fails alone is named."""
  fns, arglists = zip(*calls, strict=True)

  def program(arglists):
    return [f(*args) for f, args in zip(fns, arglists, strict=True)]

  try:
    exported = jax.export.export(jax.jit(program), platforms=[platform])(arglists)
  except Exception:
    for f, args in calls:
      try:
        jax.export.export(jax.jit(f), platforms=[platform])(*args)
      except Exception as e:
        e.add_note(f"lowering {f} for {platform} at {args}")
        raise
    raise
  text = exported.mlir_module()
  found = text.count(KERNEL_CALL[platform])
  assert found == len(calls), (f"{found} kernel calls for {len(calls)} calls", calls)
  return text


def _lowers(mod, platform, dtype, shapes, alone: bool = False):
  """Every kernel of ``_kernels(mod, alone)`` at each of ``shapes`` lowers for
  ``platform``: exported in one module, each its own kernel call."""
  calls = []
  for shape in shapes:
    x = jax.ShapeDtypeStruct(shape, dtype)
    calls += [(f, args(x)) for f, args in _kernels(mod, alone).values()]
  _export_together(calls, platform)


def _cuda_module(f, x) -> str:
  """The module of ``jax.jit(f)(x)`` exported for ``cuda``, without its source
  locations (which differ between any two traces anyway)."""
  text = jax.export.export(jax.jit(f), platforms=["cuda"])(x).mlir_module()
  return re.sub(r"loc\([^\n]*", "", text)


def _kernel_form(f, x) -> str:
  """What Mosaic GPU lowers for ``jax.jit(f)(x)``: its jaxpr, with every kernel's
  body, grid, cluster, scratch and compiler parameters, after checking that it
  lowers for ``cuda``. Two calls compare by this rather than by their modules:
  jax 0.11 stamps each module with a dump name that counts the kernels lowered
  so far in the process (``anonymous_7``), so no two exports are identical."""
  assert "mosaic_gpu" in _cuda_module(f, x)
  return str(jax.make_jaxpr(f)(x))


def _gpu_kernels(**cfg):
  """The GPU module's two 2-D kernels under ``gpu.Config(**cfg)``."""
  cfg = gpu.Config(**cfg)
  return SimpleNamespace(
    softmax_fwd_2d=partial(gpu.softmax_fwd_2d, cfg=cfg),
    softmax_bwd_2d=partial(gpu.softmax_bwd_2d, cfg=cfg),
  )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_tpu_kernels_lower_for_tpu(dtype):
  _lowers(tpu, "tpu", dtype, LOWER_SHAPES, alone=True)


def test_tpu_blocks_fit_their_vmem_budget():
  """A block of whole rows, as VMEM holds it (each row padded to a multiple of
  128 lanes, float32), within ``block_bytes``, in a multiple of 16 rows, at every
  row length the row-fits path takes (the online path's blocks are such rows of
  ``block_cols``): the kernels' VMEM use scales with it."""
  cfg = tpu.Config()
  for cols in range(1, cfg.max_row_cols + 1):
    br = tpu._row_block(4096, cols, cfg)
    assert br % 16 == 0 and br * (-(-cols // 128) * 128) * 4 <= cfg.block_bytes, (cols, br)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gpu_kernels_lower_for_cuda(dtype):
  # (The overlapping and ragged shapes among LOWER_SHAPES: in their own tests.)
  shared = OVERLAP_SHAPES + RAGGED_SHAPES
  shapes = [s for s in LOWER_SHAPES if gpu.unsupported_reason(*s, dtype) is None]
  shapes = [s for s in shapes if s not in shared]
  shapes += [(4096, 1024), (1024, 65536), (128, 262144), (5, 384), (3, 24576)]
  assert len(shapes) >= 7
  _lowers(gpu, "cuda", dtype, shapes, alone=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gpu_overlapping_chunk_kernels_lower_for_cuda(dtype):
  # Chunks that overlap, kept whole (32000 in 16-bit), streamed, and with
  # Warpgroup semantics (the masks' iota takes a layout).
  from jax.experimental.pallas import mosaic_gpu as plgpu

  assert all(gpu.plan(c, dtype).ov > 0 for _, c in OVERLAP_SHAPES)
  _lowers(gpu, "cuda", dtype, OVERLAP_SHAPES, alone=True)
  small = dict(chunk_elems=256, row_bytes=256, bwd_row_bytes=256, split_bytes=1024)
  small.update(bwd_split_bytes=2048, split_cluster=4)
  if dtype in OFF_DTYPES:  # the forms that are off by default
    warpgroup = _gpu_kernels(semantics=plgpu.LoweringSemantics.Warpgroup)
    _lowers(warpgroup, "cuda", dtype, [(16, 32000), (3, 70000)])
    # Streamed (no split budget).
    _lowers(_gpu_kernels(split_bytes=0, bwd_split_bytes=0), "cuda", dtype, [(16, 32000)])
    # Split (clusters of up to 4): 32000 (float32: whole
    # rows; pairs in 4 parts), 128256 (forward in 2 parts, float32 4; 16-bit
    # pairs in 8), 1000 in clusters of 4 (parts of one chunk).
    _lowers(_gpu_kernels(split_cluster=4), "cuda", dtype, [(64, 32000)])
    _lowers(_gpu_kernels(split_cluster=4), "cuda", dtype, [(64, 128256)])
    _lowers(_gpu_kernels(**small), "cuda", dtype, [(64, 1000)])
  cases = [(128256, {}), (1000, small)]
  if jnp.dtype(dtype) == jnp.float32:
    cases.append((32000, {}))  # (16 bits: kept whole)
  for cols, cfg in cases:
    cfg = gpu.Config(**{"split_cluster": 4, **cfg})
    p = gpu.plan(cols, dtype, cfg)
    paths = [gpu.route(64, p, dtype, cfg, b)[0] for b in (False, True)]
    assert p.ov and "split" in paths, (cols, paths)


@pytest.mark.parametrize("dtype", OFF_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gpu_live_from_l_kernels_lower_for_cuda(dtype):
  # log_softmax's backward of rows kept whole, the live flag from l (the kernels
  # above lower it): with Warpgroup semantics.
  from jax.experimental.pallas import mosaic_gpu as plgpu

  wg = _gpu_kernels(semantics=plgpu.LoweringSemantics.Warpgroup)
  _lowers(wg, "cuda", dtype, [(4096, 1024)])
  # The flag in a pass of its own over l (Config.live_in_rowsum False; the
  # default gathers it during the row sum): rows, and overlapping (32000 in 16
  # bits); it reaches the log_softmax backward.
  own_pass = _gpu_kernels(live_in_rowsum=False)
  _lowers(own_pass, "cuda", dtype, [(4096, 1024), (16, 32000)])
  x = jax.ShapeDtypeStruct((64, 4096), dtype)
  bwd = lambda k: _kernel_form(lambda l: k.softmax_bwd_2d(l, l, log=True), x)  # noqa: E731
  assert bwd(own_pass) != bwd(_gpu_kernels()) == bwd(_gpu_kernels(live_in_rowsum=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gpu_ragged_kernels_lower_for_cuda(dtype):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  assert all(isinstance(gpu.plan(c, dtype), str) for _, c in RAGGED_SHAPES)
  _lowers(gpu, "cuda", dtype, RAGGED_SHAPES, alone=True)
  # The forward's bulk copies start at a 16-byte aligned element, at most 15
  # bytes into the row (the interpreter would not notice a misaligned one).
  size = jnp.dtype(dtype).itemsize
  for base in range(3 * 16 // size):
    lead = int(gpu._bulk_lead(jnp.int32(base), dtype))
    assert 0 <= lead < 16 // size and (base + lead) * size % 16 == 0, (base, lead)
  # The default's bulk copies (Config.ragged_bulk_bytes, 200 KiB): the forward at
  # 50257 columns (at 4097 its rows are held in registers, read once; 129 have
  # too short an interior), the backward's pairs at 4097, and at 50257 in 16
  # bits (2 x 98 KiB); float32's (2 x 196 KiB) keep the direct loads, or with
  # Config.ragged_bulk_g_twice bulk copy s alone and read g twice.
  bulk = _gpu_kernels()
  _lowers(_gpu_kernels(ragged_bulk_g_twice=True), "cuda", dtype, RAGGED_SHAPES)
  if size == 4:
    g_twice = _gpu_kernels(ragged_bulk_g_twice=True)
    b = lambda x: g_twice.softmax_bwd_2d(x, x, log=False)  # noqa: E731
    text = _cuda_module(b, jax.ShapeDtypeStruct(RAGGED_SHAPES[2], dtype))
    assert re.search(r"jaxsoftmax_softmax_bwd_ragged_bulk_g_twice(?=_mosaic|\b)", text)
  wide = "ragged" if size == 4 else "ragged_bulk"
  paths = [("ragged", "ragged"), ("ragged", "ragged_bulk"), ("ragged_bulk", wide)]
  for shape, (fwd, bwd) in zip(RAGGED_SHAPES, paths, strict=True):
    x = jax.ShapeDtypeStruct(shape, dtype)
    f = lambda x: bulk.softmax_fwd_2d(x, log=False)[0]  # noqa: E731
    b = lambda x: bulk.softmax_bwd_2d(x, x, log=False)  # noqa: E731
    for name, text in [(f"fwd_{fwd}", _cuda_module(f, x)), (f"bwd_{bwd}", _cuda_module(b, x))]:
      assert re.search(rf"jaxsoftmax_softmax_{name}(?=_mosaic|\b)", text), (shape, name)
  _lowers(_gpu_kernels(semantics=plgpu.LoweringSemantics.Warpgroup), "cuda", dtype, [(8, 4097)])


def test_log_softmax_16_bit_pairs_past_64_kib_split():
  # gpu.Config.log_bwd_16bit_row_bytes: log_softmax's backward of 16-bit pairs
  # past 64 KiB splits over a cluster (its forward then writes the lse, whose
  # live flag the split reads); softmax's, and float32's, stay whole; pairs that
  # would not split stay whole rather than stream.
  def names(shape, dtype, log):
    x = jax.ShapeDtypeStruct(shape, dtype)
    b = lambda l: gpu.softmax_bwd_2d(l, l, jnp.ones((shape[0], 1)), log=log)  # noqa: E731
    found = re.findall(r"jaxsoftmax_[a-z_]*?_bwd_[a-z]+(?=_mosaic|\b)", _cuda_module(b, x))
    return sorted(set(found))

  assert names((64, 32000), jnp.bfloat16, True) == ["jaxsoftmax_log_softmax_bwd_split"]
  assert names((64, 32000), jnp.bfloat16, False) == ["jaxsoftmax_softmax_bwd_rows"]
  assert names((64, 16384), jnp.float32, True) == ["jaxsoftmax_log_softmax_bwd_rows"]
  assert names((64, 16384), jnp.bfloat16, True) == ["jaxsoftmax_log_softmax_bwd_rows"]  # 64 KiB
  assert names((64, 20480), jnp.bfloat16, True) == ["jaxsoftmax_log_softmax_bwd_rows"]  # no split
  assert gpu.bwd_reads_live(64, 32000, jnp.bfloat16)
  assert not gpu.bwd_reads_live(64, 32000, jnp.bfloat16, gpu.Config(log_bwd_16bit_row_bytes=None))


def test_gpu_ragged_bulk_copies_only_where_int32_offsets_reach_every_row():
  # The bulk copies address the array flattened, a row's start as row * cols in
  # int32 (audit10): past 2**31 - 1 elements (42731 rows of GPT-2's 50257) the
  # last rows would wrap to negative offsets, so such arrays read their rows
  # directly through 2-D refs, and implementation=None takes XLA's backward.
  rows = (2**31 - 1) // 50257  # 42730 rows: the last element's offset fits
  for r, bulk in [(rows, True), (rows + 1, False), (65536, False)]:
    assert bool(gpu.ragged_fwd_bulk(r, 50257, jnp.bfloat16, gpu.Config())) is bulk, r
    assert gpu.ragged_bwd_bulk(r, 50257, jnp.bfloat16, gpu.Config())[1] is bulk, r
  x = jax.ShapeDtypeStruct((rows + 1, 50257), jnp.bfloat16)
  for f, name in [
    (lambda x: gpu.softmax_fwd_2d(x, log=False)[0], "fwd"),
    (lambda x: gpu.softmax_bwd_2d(x, x, log=False), "bwd"),
  ]:
    text = _cuda_module(f, x)
    assert re.search(rf"jaxsoftmax_softmax_{name}_ragged(?=_mosaic|\b)", text), name
    assert f"tensor<{(rows + 1) * 50257}x" not in text, name  # 2-D, not flattened


@pytest.mark.parametrize("dtype", OFF_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gpu_register_kernels_lower_for_cuda(dtype):
  # Short rows in registers (Config.register_elems): one chunk (4096 x 1024),
  # two overlapping (2000), the forward's four (8192); with Warpgroup semantics.
  from jax.experimental.pallas import mosaic_gpu as plgpu

  regs = _gpu_kernels(register_elems=8192)
  _lowers(regs, "cuda", dtype, [(4096, 1024), (64, 2000), (64, 8192)])
  wg = _gpu_kernels(register_elems=8192, semantics=plgpu.LoweringSemantics.Warpgroup)
  _lowers(wg, "cuda", dtype, [(64, 2000)])
  # Both directions name the path, load 16 bytes a thread at a time, and copy
  # nothing through SMEM.
  x = jax.ShapeDtypeStruct((64, 2000), dtype)
  vec = 16 // jnp.dtype(dtype).itemsize
  fwd = lambda x: regs.softmax_fwd_2d(x, log=False)[0]  # noqa: E731
  bwd = lambda x: regs.softmax_bwd_2d(x, x, log=False)  # noqa: E731
  for f, name in [(fwd, "fwd"), (bwd, "bwd")]:
    assert re.search(rf"jaxsoftmax_softmax_{name}_registers(?=_mosaic|\b)", _cuda_module(f, x))
    form = _kernel_form(f, x)
    assert f"'vec_size': {vec}" in form and "'vec_size': 1}" not in form, name
    assert "copy_gmem_to_smem" not in form and "SMEM" not in form, name


def _kernel_arity(jaxpr) -> list[tuple[int, int]]:
  """How many arrays each kernel in ``jaxpr`` (and the jaxprs within) takes and
  returns: a ``pallas_call`` (Mosaic TPU), or the ``mpmd_map`` of a Mosaic GPU
  kernel."""
  counts = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("pallas_call", "mpmd_map"):
      counts.append((len(eqn.invars), len(eqn.outvars)))
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          counts += _kernel_arity(sub)
  return counts


def _pallas_outputs(jaxpr) -> list[int]:
  return [n_out for _, n_out in _kernel_arity(jaxpr)]


@pytest.mark.parametrize(
  "backend, cols, lse",
  [
    ("pallas:gpu:interpret", 384, False),  # rows kept whole: the flag from l
    ("pallas:gpu:interpret", 70000, True),  # the backward streams
    ("pallas:gpu:interpret", 4097, True),  # ragged
    ("pallas:tpu:interpret", 384, True),  # one block
    ("pallas:tpu:interpret", 70000, True),  # online
  ],
)
def test_log_softmax_writes_its_lse_only_for_the_backward(backend, cols, lse):
  # The lse is what the backward's live flag comes from: a call that is not
  # differentiated writes none (the GPU kernel's lse is a 512-byte row each),
  # nor does one whose backward takes the flag from l (GPU rows kept whole).
  x = jax.ShapeDtypeStruct((8, cols), jnp.float32)
  f = lambda x: core._log_softmax(x, None, (1,), None, backend)[0]  # noqa: E731
  assert _pallas_outputs(jax.make_jaxpr(f)(x).jaxpr) == [1]  # l
  grad = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(f(x) * x)))(x)
  assert _pallas_outputs(grad.jaxpr) == [2 if lse else 1, 1]  # l (and the lse), then dx
  softmax = lambda x: core._softmax(x, None, (1,), None, backend)  # noqa: E731
  assert _pallas_outputs(jax.make_jaxpr(softmax)(x).jaxpr) == [1]  # s: no lse either


@pytest.mark.parametrize(
  "cols, be",
  [
    (384, GPU_DEFAULT),
    (2048, GPU_SPLIT),
    (1000, GPU_SPLIT_OVERLAP),
    (1280, GPU_SMALL),
    (4097, GPU_DEFAULT),
    (384, TPU_DEFAULT),
    (2048, TPU_SMALL),
  ],
  ids=[
    "rows",
    "split",
    "split-overlap",
    "streamed",
    "ragged",
    "tpu",
    "tpu-online",
  ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_log_softmax_without_its_lse(cols, be, dtype):
  # log_softmax not differentiated writes no lse (each path's forward without
  # it): its output against float64 and the masking table, and its live flag,
  # from l, and that of the forward which writes the lse, against the table.
  x, w, _ = _case(cols, dtype)
  y, live, live_from_lse = map(np.asarray, _log_softmax_alone(be, x, w))
  ref_y = np.asarray(_reference(x, w, x, True)[0])
  _check_forward(y.astype(np.float64), ref_y, w, True, (cols, dtype))
  assert np.array_equal(live[:, 0], LIVE) and np.array_equal(live_from_lse[:, 0], LIVE)


@pytest.mark.parametrize(
  "be, cols, reads",
  [
    (GPU_DEFAULT, 384, False),
    (GPU_SMALL, 1280, True),  # streamed: the flag is read
  ],
  ids=["rows", "streamed"],
)
def test_log_softmax_live_from_l_needs_no_lse(be, cols, reads):
  # The backward of rows kept whole takes the live flag from l, so the forward
  # of a differentiated call writes no lse either.
  x = jax.ShapeDtypeStruct((6, cols), jnp.float32)
  fwd = jax.make_jaxpr(lambda x: be.log_softmax_fwd(x, None, (1,), None, for_grad=True))(x)
  assert _kernel_arity(fwd.jaxpr) == [(1, 2 if reads else 1)]
  live = jax.ShapeDtypeStruct((6, 1), bool)
  bwd = jax.make_jaxpr(lambda l, live, g: be.log_softmax_bwd(l, live, None, g, (1,), None))
  assert _kernel_arity(bwd(x, live, x).jaxpr) == [(3 if reads else 2, 1)]


def test_kernels_are_named_for_profilers():
  # Profilers show each kernel as jaxsoftmax_<op>_<fwd|bwd>_<path>, not "anonymous".
  def names(mod, platform, shape, log):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    op = "log_softmax" if log else "softmax"
    kernels = (_kernels(mod)[f"{op}_{d}"] for d in ("fwd", "bwd"))
    text = _export_together([(f, args(x)) for f, args in kernels], platform)
    found = re.findall(r"jaxsoftmax_[a-z_]*?_(?:fwd|bwd)_[a-z_]+?(?=_mosaic|\b)", text)
    return sorted(set(found))

  expected = [
    ((4096, 1024), False, ["softmax_bwd_rows", "softmax_fwd_rows"]),
    ((1024, 65536), True, ["log_softmax_bwd_split", "log_softmax_fwd_split"]),
    ((128, 262144), False, ["softmax_bwd_streamed", "softmax_fwd_streamed"]),
    # (the forward's rows held in registers; the backward's pairs bulk copied)
    ((8, 4097), True, ["log_softmax_bwd_ragged_bulk", "log_softmax_fwd_ragged"]),
    ((8, 20001), False, ["softmax_bwd_ragged_bulk", "softmax_fwd_ragged_bulk"]),
    ((8, 129), True, ["log_softmax_bwd_ragged", "log_softmax_fwd_ragged"]),
  ]
  for shape, log, want in expected:
    assert names(gpu, "cuda", shape, log) == ["jaxsoftmax_" + n for n in want], shape
  assert names(tpu, "tpu", (8, 1024), True) == [
    "jaxsoftmax_log_softmax_bwd_row",
    "jaxsoftmax_log_softmax_fwd_row",
  ]
  assert names(tpu, "tpu", (8, 70000), False) == [
    "jaxsoftmax_softmax_bwd_online",
    "jaxsoftmax_softmax_fwd_online",
  ]
  # The losses' row statistics: jaxsoftmax_row_stats_<path>.
  for mod, platform, shape, path in [
    (gpu, "cuda", (4096, 32000), "streamed"),
    (gpu, "cuda", (8, 4097), "ragged"),
    (tpu, "tpu", (8, 1024), "row"),
    (tpu, "tpu", (8, 70000), "online"),
  ]:
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    text = jax.export.export(jax.jit(mod.row_stats_2d), platforms=[platform])(x).mlir_module()
    found = set(re.findall(r"jaxsoftmax_row_stats_[a-z]+?(?=_mosaic|\b)", text))
    assert found == {f"jaxsoftmax_row_stats_{path}"}, (platform, shape, found)


def test_gpu_default_forms_by_path():
  # Config's None defaults: per-element statistics and approximate math for the
  # forward's rows past row_bytes (split or streamed; 6 stages in 16 bits) and
  # for the forward of 16-bit rows kept whole (3 stages), per chunk and accurate
  # elsewhere (float32 rows kept whole, the backward, ragged rows); approximate
  # math alone for log_softmax's backward of 16-bit rows.
  def module(shape, dtype, bwd=False, log=False, **cfg):
    k = _gpu_kernels(**cfg)
    if bwd:
      live = jnp.ones((shape[0], 1), jnp.float32) if log else None
      f = lambda x: k.softmax_bwd_2d(x, x, live, log=log)  # noqa: E731
    else:
      f = lambda x: k.softmax_fwd_2d(x, log=False)[0]  # noqa: E731
    return _kernel_form(f, jax.ShapeDtypeStruct(shape, dtype))

  off = dict(elementwise_stats=False, approx_math=False, stages=3)
  f32, bf16 = jnp.float32, jnp.bfloat16
  f16 = jnp.float16
  for shape, dtype, stages in [
    ((1024, 65536), f32, 3),
    ((8, 70000), bf16, 6),
    ((64, 16384), bf16, 3),
    ((64, 1024), f16, 3),
  ]:
    on = dict(elementwise_stats=True, approx_math=True, stages=stages)
    assert module(shape, dtype) == module(shape, dtype, **on) != module(shape, dtype, **off)
  for shape, dtype, bwd in [
    ((64, 16384), f32, False),
    ((1024, 65536), bf16, True),
    ((64, 16384), bf16, True),
  ]:
    assert module(shape, dtype, bwd) == module(shape, dtype, bwd, **off)
  for dtype in (f32, bf16):
    assert module((8, 4097), dtype) == module((8, 4097), dtype, **off)
  # The forward's streamed 16-bit rows in chunks of 8192 elements (16 KiB) with
  # 96 KiB of stages (6); float32's stay 4096 (16 KiB) with 48 KiB (3).
  long_row = (8, 262144)
  narrow = dict(wide_16bit_stream=False)
  for dtype in (bf16, f16):
    wide = dict(narrow, chunk_elems=8192, stream_bytes=96 * 1024)
    assert (
      module(long_row, dtype)
      == module(long_row, dtype, **wide)
      != module(long_row, dtype, **narrow)
    )
  assert module(long_row, f32) == module(long_row, f32, **narrow)
  approx = dict(elementwise_stats=False, approx_math=True)
  for shape in [(64, 16384), (1024, 65536), (8, 4097)]:
    for dtype in (bf16, f16):
      on = module(shape, dtype, True, True, **approx)
      assert module(shape, dtype, True, True) == on != module(shape, dtype, True, True, **off)
    assert module(shape, f32, True, True) == module(shape, f32, True, True, **off)


@pytest.mark.parametrize("dtype", OFF_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gpu_row_statistics_and_approx_math_kernels_lower_for_cuda(dtype):
  # Config.elementwise_stats (the statistics' loop carries are arrays in the
  # chunk's layout) on every path: kept whole, streamed, split, overlapping and
  # ragged; with approx_math (exp as exp2 of x * log2(e)); and with Warpgroup
  # semantics.
  from jax.experimental.pallas import mosaic_gpu as plgpu

  shapes = [(4096, 16384), (1024, 65536), (16, 32000), (3, 70000), (8, 4097)]
  k = _gpu_kernels(elementwise_stats=True, approx_math=True)
  _lowers(k, "cuda", dtype, shapes)
  x = jax.ShapeDtypeStruct((64, 16384), dtype)
  module = lambda k: _kernel_form(lambda x: k.softmax_fwd_2d(x, log=False), x)  # noqa: E731
  accurate = _gpu_kernels(elementwise_stats=True, approx_math=False)
  assert module(k) != module(accurate)  # approx_math reaches it
  split = dict(split_bytes=64 * 1024, split_cluster=8)
  _lowers(_gpu_kernels(elementwise_stats=True, **split), "cuda", dtype, shapes[1:2])
  persistent = dict(split_bytes=200 * 1024, bwd_split_bytes=200 * 1024, split_ctas=132)
  _lowers(_gpu_kernels(elementwise_stats=True, stages=6, **persistent), "cuda", dtype, shapes[1:2])
  two_pass = _gpu_kernels(elementwise_stats=True, held_two_pass=True)
  _lowers(two_pass, "cuda", dtype, [(64, 16384), (16, 32000)])
  warpgroup = _gpu_kernels(elementwise_stats=True, semantics=plgpu.LoweringSemantics.Warpgroup)
  _lowers(warpgroup, "cuda", dtype, [(64, 16384), (8, 4097)])


@pytest.mark.parametrize("dtype", OFF_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gpu_stream_cluster_kernels_lower_for_cuda(dtype):
  # Streamed rows shared by clusters of 2 to 8 CTAs (Config.stream_cluster),
  # forward and backward (the backward also where it would split), with the
  # swap's cluster barrier; and with Warpgroup semantics.
  from jax.experimental.pallas import mosaic_gpu as plgpu

  shapes = [(128, 262144), (1024, 65536), (8, 8192)]
  x = jax.ShapeDtypeStruct((128, 262144), dtype)
  for c in (2, 8):  # (4 is the same code as these, with another constant)
    k = _gpu_kernels(stream_cluster=c, bwd_split_bytes=0)
    _lowers(k, "cuda", dtype, shapes)
    for f in (
      lambda x, k=k: k.softmax_fwd_2d(x, log=True)[0],
      lambda x, k=k: k.softmax_bwd_2d(x, x, log=False),
    ):
      assert "barrier.cluster.arrive.release" in _cuda_module(f, x)
  warpgroup = plgpu.LoweringSemantics.Warpgroup
  _lowers(_gpu_kernels(stream_cluster=4, semantics=warpgroup), "cuda", dtype, shapes[:1])


def test_gpu_kernels_lower_with_warpgroup_semantics():
  # jax 0.11 makes Warpgroup lowering the default; gpu.py pins Lane but lowers either way.
  from jax.experimental.pallas import mosaic_gpu as plgpu

  warpgroup = _gpu_kernels(semantics=plgpu.LoweringSemantics.Warpgroup)
  _lowers(warpgroup, "cuda", jnp.bfloat16, [(64, 4096), (4, 262144)])


@pytest.mark.parametrize("dtype", OFF_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gpu_split_row_kernels_lower_for_cuda(dtype):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def kernels(**cfg):
    split = {"split_bytes": 64 * 1024, "bwd_split_bytes": 64 * 1024, "split_cluster": 8}
    return _gpu_kernels(**{**split, "split_ctas": None, **cfg})

  # Clusters of 2 to 8 CTAs (and 128 x 262144 float32, past 8 parts, streamed).
  shapes = [(1024, 65536), (128, 262144), (1024, 32768)]
  text = jax.export.export(
    jax.jit(lambda x: kernels().softmax_fwd_2d(x, log=False)), platforms=["cuda"]
  )(jax.ShapeDtypeStruct((1024, 65536), dtype)).mlir_module()
  assert "barrier.cluster.arrive.release" in text  # the swap's cluster barrier
  _lowers(kernels(), "cuda", dtype, shapes)
  _lowers(kernels(semantics=plgpu.LoweringSemantics.Warpgroup), "cuda", dtype, shapes[1:2])
  # Persistent clusters (and rows of 128 KiB kept whole by persistent CTAs).
  persistent = dict(split_bytes=200 * 1024, bwd_split_bytes=200 * 1024, split_ctas=132)
  _lowers(kernels(**persistent, bwd_split_ctas=132), "cuda", dtype, shapes + [(100, 49152)])
  # The default: the forward's persistent clusters of up to 2, on one CTA per SM.
  _lowers(_gpu_kernels(), "cuda", dtype, [(1024, 65536), (100, 49152)])


# --------------------------------------------------------------- implementation=


def test_cpu_dispatch_is_xla_and_explicit_pallas_says_why():
  x = jnp.ones((2, 8), jnp.float32)
  assert _backend.resolve("softmax", None, x, (1,), None) == "xla"
  with pytest.raises(ValueError, match="implementation='pallas'.*GPU and TPU only.*'cpu'"):
    jaxsoftmax.softmax(x, implementation="pallas")
  with pytest.raises(ValueError, match="GPU and TPU only"):
    jaxsoftmax.log_softmax(x, implementation="pallas")


def test_accelerator_dispatch(monkeypatch):
  _fake_platform(monkeypatch, "tpu")
  x = jnp.ones((2, 8), jnp.float32)
  # Kernels not yet verified on hardware are never the default, only on request.
  monkeypatch.setattr(_pallas, "VERIFIED_PLATFORMS", frozenset())
  assert _backend.resolve("softmax", None, x, (1,), None) == "xla"
  assert _backend.resolve("softmax", "pallas", x, (1,), None) == "pallas"
  monkeypatch.setattr(_pallas, "VERIFIED_PLATFORMS", frozenset({"tpu", "gpu"}))
  assert _backend.resolve("softmax", None, x, (1,), None) == "pallas"
  assert _backend.resolve("softmax", "xla", x, (1,), None) == "xla"
  x64 = x.astype(jnp.float64)
  assert _backend.resolve("softmax", None, x64, (1,), None) == "xla"
  with pytest.raises(ValueError, match="dtype float64"):
    _backend.resolve("softmax", "pallas", x64, (1,), None)
  with pytest.raises(ValueError, match="axis_name"):
    _backend.resolve("softmax", "pallas", x, (1,), "i")
  with pytest.raises(ValueError, match="empty"):
    _backend.resolve("softmax", "pallas", jnp.ones((0, 8), jnp.float32), (1,), None)
  # On a Hopper GPU the row must split into whole TMA chunks.
  _fake_platform(monkeypatch, "gpu")
  monkeypatch.setattr(_pallas, "_gpu_reason", lambda: None)
  monkeypatch.setattr(_pallas, "_gpu_major", lambda: 9)
  # implementation=None: the kernels only for >= 128 rows of >= 2 KiB; below
  # 16 KiB, XLA's forward, the kernel's backward.
  monkeypatch.setattr(_pallas, "_gpu_kind", lambda: "NVIDIA H100 80GB HBM3")
  for shape, dtype, want_softmax, want_log in [
    ((128, 4096), jnp.float32, "pallas", "pallas"),  # 16 KiB rows
    ((128, 4096), jnp.bfloat16, "xla/pallas", "xla/pallas"),  # 8 KiB rows
    ((4, 32, 1024), jnp.float32, "xla/pallas", "xla/pallas"),  # 128 rows of 4 KiB
    # Ragged rows: the backward on the kernel where its pair is bulk copied (up
    # to 200 KiB), else XLA's; 8 KiB rows: XLA's forward
    ((128, 4097), jnp.bfloat16, "xla/pallas", "xla/pallas"),
    ((128, 4097), jnp.float32, "pallas", "pallas"),  # 16 KiB rows
    ((128, 1024), jnp.bfloat16, "xla/pallas", "xla/pallas"),  # 2 KiB rows
    ((128, 1016), jnp.bfloat16, "xla", "xla"),  # just short of 2 KiB
    ((4096, 512), jnp.bfloat16, "xla", "xla"),  # 1 KiB rows
    ((4096, 256), jnp.float32, "xla", "xla"),  # 1 KiB rows
    ((127, 262144), jnp.float32, "xla", "xla"),  # too few rows
    # log_softmax's backward streams there: XLA's backward, as fast or faster
    ((128, 262144), jnp.bfloat16, "pallas", "pallas/xla"),
    ((128, 65536), jnp.float32, "pallas", "pallas"),  # its backward splits in 8 parts
    ((128, 32000), jnp.bfloat16, "pallas", "pallas"),  # overlapping chunks: faster on an H100
    ((128, 50257), jnp.bfloat16, "pallas", "pallas"),  # ragged, a pair of 2 x 98 KiB
    ((128, 2049), jnp.float32, "xla", "xla"),  # ragged 8 KiB rows, a pair held in registers
    ((128, 50257), jnp.float32, "pallas/xla", "pallas/xla"),  # 2 x 196 KiB: XLA's backward
  ]:
    x = jnp.ones(shape, dtype)
    assert _backend.resolve("softmax", None, x, (-1,), None) == want_softmax, shape
    assert _backend.resolve("log_softmax", None, x, (-1,), None) == want_log, shape
    # An explicit request runs them anyway.
    for op in ("softmax", "log_softmax"):
      assert _backend.resolve(op, "pallas", x, (-1,), None) == "pallas"
  # Ragged rows past 2**31 - 1 elements in all (no bulk copies): XLA's backward.
  assert _pallas.preferred("softmax", (65536, 50257), jnp.bfloat16, (1,)) == (True, False)
  assert _pallas.preferred("softmax", (4096, 50257), jnp.bfloat16, (1,)) == (True, True)
  # On an H200, log_softmax's backward is XLA's from 50000 16-bit or 65536
  # float32 columns; softmax's, and the forwards, stay on the kernels.
  monkeypatch.setattr(_pallas, "_gpu_kind", lambda: "NVIDIA H200")
  for shape, dtype, want_log in [
    ((128, 65536), jnp.float32, "pallas/xla"),
    ((128, 64640), jnp.float32, "pallas"),  # (split, as 65536)
    ((128, 32000), jnp.bfloat16, "pallas"),  # (its pairs split)
    ((128, 50304), jnp.bfloat16, "pallas/xla"),
    ((128, 50257), jnp.bfloat16, "pallas/xla"),  # (ragged)
    ((128, 20001), jnp.bfloat16, "pallas"),
    ((128, 31744), jnp.float16, "pallas"),
    ((128, 32000), jnp.float32, "pallas"),
    ((128, 262144), jnp.float32, "pallas/xla"),
    ((128, 4096), jnp.bfloat16, "xla/pallas"),
  ]:
    x = jnp.ones(shape, dtype)
    assert _backend.resolve("log_softmax", None, x, (-1,), None) == want_log, shape
    assert _backend.resolve("softmax", None, x, (-1,), None) != "pallas/xla", shape
  # With a `where` mask, applied around the kernel in extra passes: XLA unless asked.
  x, w = jnp.ones((128, 8192), jnp.bfloat16), jnp.ones((128, 8192), bool)
  for op in ("softmax", "log_softmax"):
    assert _backend.resolve(op, None, x, (-1,), None) == "pallas"
    assert _backend.resolve(op, None, x, (-1,), None, w) == "xla"
    assert _backend.resolve(op, "pallas", x, (-1,), None, w) == "pallas"
  # The row is all softmax axes together: 2 x 4096 float32 per row, 128 rows.
  x = jnp.ones((2, 128, 4096), jnp.float32)
  assert _backend.resolve("softmax", None, x, (0, 2), None) == "pallas"
  # Verified on Hopper only: a newer GPU runs them on request, not by default.
  monkeypatch.setattr(_pallas, "_gpu_major", lambda: 10)
  assert _backend.resolve("softmax", None, x, (0, 2), None) == "xla"
  assert _backend.resolve("softmax", "pallas", x, (0, 2), None) == "pallas"
  with pytest.raises(ValueError, match="row length 127"):
    _backend.resolve("softmax", "pallas", jnp.ones((2, 127), jnp.float32), (1,), None)


def test_lowering_checks_catch_layout_errors():
  # The export checks above can fail: a TPU block that is not (8, 128)-aligned, and a
  # Mosaic GPU TMA copy wider than 256 elements (why gpu.py cuts rows into (kb, w <= 256)).
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  x = jax.ShapeDtypeStruct((20, 300), jnp.float32)
  spec = pl.BlockSpec((7, 100), lambda i, j: (i, j))
  bad_tpu = pl.pallas_call(double, grid=(3, 3), in_specs=[spec], out_specs=spec, out_shape=x)
  with pytest.raises(Exception, match="divisible by 8 and 128"):
    jax.export.export(jax.jit(bad_tpu), platforms=["tpu"])(x)

  def wide_copy(x_gmem, o_gmem, buf, bar):
    plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(0, 1)], buf, bar.at[0])
    plgpu.barrier_wait(bar.at[0])

  row = jax.ShapeDtypeStruct((8, 1024), jnp.float32)
  bad_gpu = plgpu.kernel(
    wide_copy,
    out_type=row,
    scratch_types=[plgpu.SMEM((1, 1024), jnp.float32), plgpu.Barrier(num_barriers=1)],
    grid=(1,),
    grid_names=("cta",),
  )
  with pytest.raises(Exception, match="256 elements"):
    jax.export.export(jax.jit(bad_gpu), platforms=["cuda"])(row)
  # Exported with others, the kernel that fails is named.
  good = partial(gpu.softmax_fwd_2d, log=False)
  with pytest.raises(Exception, match="256 elements") as failed:
    _export_together([(good, (row,)), (bad_gpu, (row,)), (good, (row,))], "cuda")
  assert failed.value.__notes__ == [f"lowering {bad_gpu} for cuda at {(row,)}"]
  assert all(isinstance(gpu.plan(c, jnp.float32), gpu.Plan) for c in (1024, 65536, 262144))
  assert all(gpu.plan(c, jnp.float32).w <= 256 for c in (1024, 65536, 262144))


# ------------------------------------- the losses' row statistics (``row_stats_2d``)


def _check_row_stats(be, cols, dtype, per_row: bool = False):
  """A backend's ``row_stats`` on the six rows of ``_case`` against float64 closed
  forms: the max of the kept entries, exactly (it is a value of the input), and
  ``sum(exp(x - max))`` within 4 float32 eps. ``per_row``: the mask is one flag
  a row (a loss's padding), False on the fully masked row only, whose x is NaN."""
  x, w, _ = _case(cols, dtype)
  if per_row:
    w = jnp.arange(6)[:, None] != FULLY_MASKED
    x = x.at[FULLY_MASKED].set(jnp.nan)  # masked: never read
  m, d = map(np.asarray, jax.jit(lambda x, w: be.row_stats(x, w, (1,), None))(x, w))
  assert m.shape == d.shape == (6, 1) and m.dtype == d.dtype == np.float32
  x64 = np.where(np.asarray(w), np.asarray(x.astype(jnp.float32), np.float64), -np.inf)
  live = [ORDINARY, PARTLY_MASKED]
  ref_m = x64[live].max(1, keepdims=True)
  assert np.array_equal(m[live], ref_m), (cols, m[live], ref_m)
  ref_d = np.exp(x64[live] - ref_m).sum(1, keepdims=True)
  assert rel_err(d[live], ref_d) <= 4 * eps(jnp.float32), cols
  for r in (FULLY_MASKED, ALL_NEG_INF):  # empty rows: max -inf, normaliser 0
    assert m[r] == -np.inf and d[r] == 0.0, (cols, r, m[r], d[r])
  for r in (HAS_NAN, HAS_POS_INF):  # and the loss of such a row is NaN
    assert np.isnan(d[r]), (cols, r)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
  "cols, be",
  [
    (128, GPU_DEFAULT),  # one chunk
    (1000, GPU_DEFAULT),  # 125 sub-rows of 8: 2 chunks of 64, the second from 61
    (70000, GPU_DEFAULT),  # 18 chunks, the last overlapping; per-element statistics
    (1280, GPU_SMALL_CHUNK_STATS),  # statistics reduced chunk by chunk
    (2048, GPU_STREAM_CLUSTER),  # 4 parts of a row, merged in cluster order
    (4097, GPU_DEFAULT),  # ragged: 3 chunks in registers, the last from 2049
    (1, TPU_DEFAULT),
    (127, TPU_DEFAULT),
    (1024, TPU_SMALL),  # one block
    (4097, TPU_SMALL),  # column blocks, a tail of one column
    (127, _xla),
  ],
  ids=[
    "gpu-128",
    "gpu-1000-overlap",
    "gpu-70000",
    "gpu-1280-chunk-stats",
    "gpu-2048-cluster-of-4",
    "gpu-4097-ragged",
    "tpu-1",
    "tpu-127",
    "tpu-1024-block",
    "tpu-4097-online",
    "xla-127",
  ],
)
def test_row_stats_interpret(cols, be, dtype):
  _check_row_stats(be, cols, dtype)


@pytest.mark.parametrize("be", [GPU_DEFAULT, TPU_SMALL, _xla], ids=["gpu", "tpu", "xla"])
def test_row_stats_with_a_flag_per_row(be):
  _check_row_stats(be, 1000, jnp.float32, per_row=True)


def _loss_case(dtype):
  """Logits (6 x 1000: 2 chunks that overlap on the GPU), integer labels, soft
  labels and a mask: rows 0-1 ordinary, row 2 partly masked (its label kept), row 3
  fully masked, row 4 with a NaN logit, row 5 ordinary."""
  rng = np.random.default_rng(40)
  x = 3.0 * rng.standard_normal((6, 1000))
  x[4, 10] = np.nan
  w = np.ones(x.shape, bool)
  w[2] = rng.uniform(size=1000) < 0.6
  w[3] = False
  labels = rng.integers(0, 1000, 6)
  w[2, labels[2]] = True
  y = np.exp(rng.standard_normal(x.shape))
  y /= y.sum(1, keepdims=True)
  return jnp.asarray(x, dtype), jnp.asarray(labels), jnp.asarray(y, dtype), jnp.asarray(w)


def _naive_loss(x, t, w, z_loss):
  """float64 ``-sum(t * log_softmax_w(x)) + z * lse_w(x)**2``, literally, over kept entries."""
  e = jnp.where(w, jnp.exp(x), 0.0)
  lse = jnp.log(jnp.sum(e, 1, keepdims=True))
  return -jnp.sum(jnp.where(w, t * (x - lse), 0.0), 1) + z_loss * lse[:, 0] ** 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("be", ["pallas:gpu:interpret", "pallas:tpu:interpret"])
def test_losses_take_the_row_statistics_kernel(monkeypatch, be, dtype):
  # implementation="pallas" through the public losses, with the kernels in interpret
  # mode (the CPU has no "pallas" to resolve to), against the float64 definition.
  _use_backend(monkeypatch, be)
  x, labels, y, w = _loss_case(dtype)
  eps_, z = 0.1, 1e-3
  x64, w64 = np.asarray(x.astype(jnp.float32), np.float64), np.asarray(w)
  n = w64.sum(1, keepdims=True)
  one_hot = np.eye(1000)[np.asarray(labels)]
  y64 = np.asarray(y.astype(jnp.float32), np.float64)
  g = jnp.asarray(np.random.default_rng(41).standard_normal(6), jnp.float32)
  kw = dict(where=w, label_smoothing=eps_, z_loss=z, implementation="pallas")
  for ours, t in [
    (lambda x: jaxsoftmax.softmax_cross_entropy_with_integer_labels(x, labels, **kw), one_hot),
    (lambda x: jaxsoftmax.softmax_cross_entropy(x, y, **kw), y64),
  ]:
    t = jnp.where(w64, (1 - eps_) * t + eps_ / np.maximum(n, 1), 0.0)

    @jax.jit
    def run(x, g):
      loss, vjp = jax.vjp(ours, x)  # noqa: B023
      return loss, vjp(g.astype(loss.dtype))[0]

    assert "jaxsoftmax_row_stats_" in str(jax.make_jaxpr(run)(x, g))  # the kernel runs
    loss, dx = map(np.asarray, run(x, g))
    ref = lambda v: _naive_loss(v, t, w64, z)  # noqa: B023, E731
    ref_loss, ref_vjp = jax.vjp(ref, jnp.asarray(x64))
    ref_dx = np.asarray(ref_vjp(jnp.asarray(g, jnp.float64))[0])
    ok = [0, 1, 2, 5]
    assert rel_err(loss[ok], np.asarray(ref_loss)[ok]) <= 4 * eps(dtype)
    assert rel_err(dx[ok], ref_dx[ok]) <= 8 * eps(dtype)
    assert np.all(dx[2][~w64[2]] == 0.0)  # masked classes get no gradient
    assert loss[3] == 0.0 and np.all(dx[3] == 0.0)  # a fully masked example
    assert np.isnan(loss[4]) and np.all(np.isnan(dx[4]))  # NaN stays in its example


@pytest.mark.parametrize("be", ["pallas:gpu:interpret", "pallas:tpu:interpret"])
def test_losses_with_the_kernel_and_a_flag_per_example(monkeypatch, be):
  # A padding mask of one flag per example (the kernel reads the unmasked logits):
  # the masked example, whose logits are NaN, gives 0 and no gradient.
  _use_backend(monkeypatch, be)
  x, labels, _, _ = _loss_case(jnp.float32)
  x = x.at[4].set(jnp.nan)
  keep = jnp.arange(6) != 4

  def loss(x):
    return jaxsoftmax.softmax_cross_entropy_with_integer_labels(
      x, labels, where=keep, implementation="pallas"
    )

  loss, vjp = jax.vjp(loss, x)
  loss, dx = np.asarray(loss), np.asarray(vjp(jnp.ones_like(loss))[0])
  assert loss[4] == 0.0 and np.all(dx[4] == 0.0)
  x64 = np.asarray(x, np.float64)[keep]
  lse = np.log(np.exp(x64).sum(1))
  at_label = x64[np.arange(5), np.asarray(labels)[keep]]
  assert rel_err(loss[keep], lse - at_label) <= 4 * eps(jnp.float32)
  ref_dx = np.exp(x64 - lse[:, None]) - np.eye(1000)[np.asarray(labels)[keep]]
  assert rel_err(dx[keep], ref_dx) <= 8 * eps(jnp.float32)


@pytest.mark.parametrize("be", ["pallas:gpu:interpret", "pallas:tpu:interpret"])
def test_losses_with_the_kernel_reverse_over_reverse(monkeypatch, be):
  # The statistics are residuals of the losses' custom_vjp, so a second
  # derivative differentiates the kernel's call too (as the XLA backend's
  # row_stats): against jax.grad of jax.grad of the float64 definition.
  _use_backend(monkeypatch, be)
  rng = np.random.default_rng(44)
  x = jnp.asarray(3.0 * rng.standard_normal((4, 256)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 256, 4))
  y = jax.nn.softmax(jnp.asarray(rng.standard_normal((4, 256))))
  w = jnp.asarray(rng.standard_normal((4, 256)))  # weights the first gradient
  z = 0.1

  def naive(x, t):
    lse = jnp.log(jnp.sum(jnp.exp(x), -1))
    return jnp.sum(lse - jnp.sum(t * x, -1) + z * lse**2)

  for loss, t in [
    (lambda x: jaxsoftmax.softmax_cross_entropy_with_integer_labels(x, labels, z_loss=z), None),
    (lambda x: jaxsoftmax.softmax_cross_entropy(x, y.astype(jnp.float32), z_loss=z), y),
  ]:
    t = jax.nn.one_hot(labels, 256, dtype=jnp.float64) if t is None else t
    ours = jax.jit(jax.grad(lambda x: jnp.sum(w * jax.grad(lambda v: loss(v).sum())(x))))  # noqa: B023
    ref = jax.grad(lambda x: jnp.sum(w * jax.grad(naive)(x, t)))(x.astype(jnp.float64))  # noqa: B023
    assert "jaxsoftmax_row_stats_" in str(ours.trace(x).jaxpr)
    assert rel_err(ours(x), ref) <= 16 * eps(jnp.float32)


def test_a_float64_loss_keeps_to_xla(monkeypatch):
  # float32 logits with float64 soft labels make a float64 loss; the kernel's
  # statistics are float32, so "pallas" raises and None takes XLA.
  _fake_platform(monkeypatch, "gpu")
  monkeypatch.setattr(_pallas, "_gpu_reason", lambda: None)
  monkeypatch.setattr(_pallas, "_gpu_major", lambda: 9)
  monkeypatch.setattr(_pallas, "preferred", lambda *a, **k: (True, True))  # were it timed
  x = jnp.ones((4, 256), jnp.float32)
  with pytest.raises(ValueError, match="softmax_cross_entropy: .*labels. make the loss float64"):
    jaxsoftmax.softmax_cross_entropy(x, jnp.ones((4, 256), jnp.float64), implementation="pallas")
  jaxpr = jax.make_jaxpr(lambda x: jaxsoftmax.softmax_cross_entropy(x, x.astype(jnp.float64)))
  assert "jaxsoftmax_row_stats_" not in str(jaxpr(x))  # the statistics inline, on XLA
  jaxpr = jax.make_jaxpr(lambda x: jaxsoftmax.softmax_cross_entropy(x, x))
  assert "jaxsoftmax_row_stats_" in str(jaxpr(x))  # float32 labels: the kernel


def test_losses_with_the_kernel_under_vmap(monkeypatch):
  # Per-example losses and gradients under vmap (the kernel's batching rule),
  # against the float64 closed form lse(x) - x[label]; and for cuda, one launch.
  x = draws.normal(42, (3, 4, 512), scale=3.0)
  labels = draws.randint(43, (3, 4), 0, 512)

  def total(x, labels):
    return jaxsoftmax.softmax_cross_entropy_with_integer_labels(
      x, labels, implementation="pallas"
    ).sum()

  _use_backend(monkeypatch, "pallas:gpu:interpret")
  loss, dx = jax.jit(jax.vmap(jax.value_and_grad(total)))(x, labels)
  x64 = np.asarray(x, np.float64)
  lse = np.log(np.exp(x64).sum(-1))
  at_label = np.take_along_axis(x64, np.asarray(labels)[..., None], -1)[..., 0]
  assert rel_err(loss, (lse - at_label).sum(-1)) <= 4 * eps(jnp.float32)
  ref_dx = np.exp(x64 - lse[..., None]) - np.eye(512)[np.asarray(labels)]
  assert rel_err(dx, ref_dx) <= 8 * eps(jnp.float32)
  _use_backend(monkeypatch, "pallas:gpu")
  args = (jax.ShapeDtypeStruct((8, 512, 32000), jnp.bfloat16), jnp.zeros((8, 512), jnp.int32))
  f = jax.jit(jax.vmap(jax.value_and_grad(total)))
  text = jax.export.export(f, platforms=["cuda"])(*args).mlir_module()
  assert "jaxsoftmax_row_stats_streamed" in text and "stablehlo.while" not in text


def test_row_stats_kernels_lower():
  # For cuda: TMA chunks (dividing the row, or overlapping), ragged rows, a cluster
  # a row, statistics chunk by chunk, Warpgroup semantics; for tpu: whole rows and
  # column blocks.
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def lowers(f, platform, dtype, shapes):
    _export_together([(f, (jax.ShapeDtypeStruct(s, dtype),)) for s in shapes], platform)

  shapes = [(4096, 32000), (4096, 128256), (128, 262144), (37, 384), *RAGGED_SHAPES[:2]]
  for dtype in DTYPES:
    lowers(gpu.row_stats_2d, "cuda", dtype, shapes + [(5, 1000), (3, 70000)])
    off = [  # forms off by default
      dict(stream_cluster=4),
      dict(elementwise_stats=False, approx_math=False),
      dict(semantics=plgpu.LoweringSemantics.Warpgroup),
    ]
    for cfg in off if dtype in OFF_DTYPES else []:
      lowers(partial(gpu.row_stats_2d, cfg=gpu.Config(**cfg)), "cuda", dtype, shapes[:3])
    lowers(tpu.row_stats_2d, "tpu", dtype, LOWER_SHAPES + [(4096, 128256)])


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_losses_with_the_kernel_export_for_the_accelerators(monkeypatch, platform):
  # The whole loss, forward and backward, with the (non-interpret) kernel, as a
  # GPU or TPU would run it: integer labels on a ragged row too, soft labels.
  be = "pallas:gpu" if platform == "cuda" else "pallas:tpu"
  _use_backend(monkeypatch, be)
  labels = jnp.zeros(64, jnp.int32)
  for cols in (32000, 50257):
    x = jax.ShapeDtypeStruct((64, cols), jnp.bfloat16)
    for loss in (
      lambda x: jaxsoftmax.softmax_cross_entropy_with_integer_labels(x, labels).mean(),
      lambda x: jaxsoftmax.softmax_cross_entropy(x, jnp.ones(x.shape, x.dtype) / cols).mean(),  # noqa: B023
    ):
      exported = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=[platform])(x)
      assert "jaxsoftmax_row_stats_" in exported.mlir_module(), (platform, cols)


def test_losses_dispatch(monkeypatch):
  # implementation=None takes the losses' kernel on a Hopper GPU where the GPU
  # script timed it faster than XLA and optax: >= 128 examples of >= 64000
  # bytes, class axes last, no mask over the classes (one flag per example is
  # fine); XLA elsewhere, and on any other platform.
  int_ce = "softmax_cross_entropy_with_integer_labels"
  x = jnp.ones((4096, 32000), jnp.bfloat16)
  with pytest.raises(ValueError, match=f"{int_ce}: implementation='pallas'.*GPU and TPU only"):
    jaxsoftmax.softmax_cross_entropy_with_integer_labels(
      x[:2], jnp.zeros(2, jnp.int32), implementation="pallas"
    )
  with pytest.raises(ValueError, match="softmax_cross_entropy: .implementation. must be one of"):
    jaxsoftmax.softmax_cross_entropy(x[:2], x[:2], implementation="triton")
  _fake_platform(monkeypatch, "gpu")
  monkeypatch.setattr(_pallas, "_gpu_reason", lambda: None)
  monkeypatch.setattr(_pallas, "_gpu_major", lambda: 9)
  assert _backend.resolve("softmax", None, x, (1,), None) == "pallas"
  for fn in (int_ce, "softmax_cross_entropy"):
    for shape, dtype, axes, want in [
      ((4096, 32000), jnp.bfloat16, (1,), "pallas"),  # 64000-byte rows
      ((8, 16, 50257), jnp.float32, (2,), "pallas"),  # 128 examples, ragged rows
      ((4096, 16000), jnp.float32, (1,), "pallas"),  # 64000 bytes
      ((4096, 16000), jnp.bfloat16, (1,), "xla"),  # 32000 bytes: untimed
      ((127, 32000), jnp.bfloat16, (1,), "xla"),  # too few examples
      ((32000, 4096), jnp.bfloat16, (0,), "xla"),  # classes not last: a transpose first
      ((4096, 8, 4000), jnp.bfloat16, (1, 2), "pallas"),  # two class axes, last
    ]:
      x = jnp.ones(shape, dtype)
      assert _backend.resolve(fn, None, x, axes, None) == want, (fn, shape, dtype)
      assert _backend.resolve(fn, "pallas", x, axes, None) == "pallas"
    with pytest.raises(ValueError, match=f"{fn}: .*axis_name"):
      _backend.resolve(fn, "pallas", x, (1,), "model")
  # Through the public losses: a mask of one flag per example keeps the kernel,
  # one over the classes (a pass over the logits before it) does not.
  x = jax.ShapeDtypeStruct((4096, 32000), jnp.bfloat16)
  labels = jax.ShapeDtypeStruct((4096,), jnp.int32)
  for where, kernel in [
    (None, True),
    (jax.ShapeDtypeStruct((4096,), bool), True),
    (jax.ShapeDtypeStruct((4096, 1), bool), True),
    (jax.ShapeDtypeStruct((4096, 32000), bool), False),
  ]:
    for loss, y in [
      (jaxsoftmax.softmax_cross_entropy_with_integer_labels, labels),
      (jaxsoftmax.softmax_cross_entropy, x),
    ]:
      jaxpr = jax.make_jaxpr(lambda x, y, w: loss(x, y, where=w))(x, y, where)  # noqa: B023
      assert ("jaxsoftmax_row_stats_" in str(jaxpr)) == kernel, (loss, where)
  x = jnp.ones((4096, 32000), jnp.bfloat16)
  monkeypatch.setattr(_pallas, "_gpu_major", lambda: 10)  # verified on Hopper only
  assert _backend.resolve(int_ce, None, x, (1,), None) == "xla"
  monkeypatch.setattr(_pallas, "_gpu_major", lambda: 9)
  _fake_platform(monkeypatch, "tpu")
  monkeypatch.setattr(_pallas, "VERIFIED_PLATFORMS", frozenset({"tpu", "gpu"}))
  assert _backend.resolve(int_ce, None, x, (1,), None) == "xla"
