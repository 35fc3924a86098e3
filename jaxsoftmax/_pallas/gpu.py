"""Mosaic GPU kernels (``plgpu.kernel``, Hopper and newer) on 2-D arrays.

Pallas-on-Triton is deprecated upstream and ``pl.pallas_call`` for Mosaic GPU
is too, so these kernels use ``plgpu.kernel`` with explicit TMA copies.

Each CTA (one warpgroup) owns whole rows, taken in a strided loop, so that the
same code runs with any number of CTAs (one in interpret mode). A row of
``cols`` elements is viewed as ``(cols // w, w)`` with ``w`` a power of two up
to 256 (TMA boxes are at most 256 wide), and moved in chunks of ``(kb, w)``
that lie within the row, so no copy runs out of bounds: they divide it, or the
last one overlaps the one before it (``plan``, ``Plan.ov``).

* **row fits** (the row fits in the shared-memory budget): one TMA load of the
  row, the statistics and then the output computed chunk by chunk from shared
  memory, the output written in place and stored with one TMA copy: one read
  and one write of HBM.
* **online** (longer rows that do not split): a statistics pass streams the
  chunks through a few buffers (``Config.stages``), keeping a running max and
  normaliser in float32 (Milakov & Gimelshein 2018); a second pass streams them
  again, last chunk first (those are the likeliest to be still in L2), and
  writes. (Off by default, ``Config.stream_cluster``: a cluster of CTAs shares
  each row, each streaming its part of the chunks, swapping partial statistics
  as split rows do.)
* **split** (longer rows, ``Config.split_bytes`` and ``bwd_split_bytes``): a
  cluster of CTAs (up to 2 in the forward, 8 in the backward) shares each row,
  each holding its part in SMEM; the CTAs swap their partial statistics through
  distributed shared memory, then each writes its part: one read and one write
  of HBM. The forward's clusters are persistent (``Config.split_ctas``): they
  load the next row while they write this one.

The backward (a row sum, then the write pass) keeps both rows (``s`` or ``l``,
and ``g``) in shared memory when they fit, splits them over a cluster when
their parts do, and streams them twice otherwise.

* **ragged** (rows not a multiple of 16 bytes, TMA's row pitch: 4097 or 50257
  columns): no tensor map. Each CTA reads its row's chunks from HBM into
  registers, one element a thread at a time (any alignment), and stores the
  output the same way: once for rows of a few chunks, held in registers
  (``RAGGED_HELD_CHUNKS``), else twice (statistics, then write, last chunk
  first). Rows (in the backward: pairs of rows) past those and within
  ``Config.ragged_bulk_bytes`` (200 KiB) move instead by one bulk copy of their
  16-byte aligned interior into SMEM and one back, the few elements either side
  loaded directly (``_ragged_bulk_fwd``, ``_ragged_bulk_bwd``): read once.
* **registers** (short rows of a multiple of 16 bytes, off by default,
  ``Config.register_elems``): the ragged path's held form with 16-byte vector
  loads and stores: each CTA reads its row (the backward: both rows) from HBM
  into registers once, reduces it there and stores the output, with no TMA, no
  SMEM and no barrier.

The losses' kernel, ``row_stats_2d``, is the streamed forward's statistics pass
alone, for rows of any length (ragged rows: read once into registers): each row
read once, its max and normaliser written.

Rows shorter than 128 elements (one element per thread of the warpgroup) are
reported by ``unsupported_reason`` and run on XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import kernel_name as _name
from . import stats_kernel_name

F32 = jnp.float32
WARPGROUP = 128
ALIGN = 16  # bytes: TMA's row pitch, a bulk copy's alignment, a vector load


def _per16(dtype) -> int:
  """Elements of ``dtype`` in ALIGN bytes (4 float32, 8 16-bit)."""
  return ALIGN // jnp.dtype(dtype).itemsize


PER_SM = "per SM"  # Config.split_ctas: one CTA per SM


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes; ``interpret`` runs the kernels in Mosaic GPU's interpreter (tests, CPU).

  Forms measured on an H200 and dropped: several whole rows per CTA (1.1-2.1x
  the time of one row a CTA at 4096 x {1024, 4096},
  ``benchmarks/results/gpu_pallas-2026-11-26T0511Z.md``), rings of row blocks in
  persistent CTAs (0.96-1.23x, ``gpu_variants-2026-11-26T0518Z.md``), and store
  drains that wait only for SMEM reads (within 1%). And forms that the defaults
  replaced: rows whose last chunk overlaps the one before it (``Plan.ov``: 32000
  or 128256 columns) streamed, each read twice, where splitting them over
  clusters like the others took 0.86x / 0.81-0.84x the time (4096 x 32000
  float32, forward / backward, at 86-89% of copy; ``gpu_pallas-2026-11-26T2049Z``,
  ``T2058Z``); and log_softmax's backward of rows kept whole (the rows and
  registers paths) reading each row's live flag from an input that XLA
  broadcasts from the forward's lse, where taking it from l in SMEM (0 if every
  entry is -inf; the forward then writes no lse for them, ``bwd_reads_live``)
  took 0.92-0.96x the backward's time and 0.85-0.91x the forward's at 4096 x
  4096 (the same runs)."""

  row_bytes: int = 96 * 1024  # forward: longest row (in input bytes) kept whole in SMEM
  # Backward: longest pair of rows (s or l, and g, in input bytes) kept whole in
  # SMEM. Measured on an H200 (benchmarks/results/gpu_pallas-2026-11-26T0031Z.md):
  # at 4096 x 16384 float32 two whole 64 KiB rows ran at 96% of copy bandwidth,
  # streaming them twice at 72%. The forward keeps 96 KiB: one whole 128 KiB
  # bfloat16 row per CTA ran at 39% of copy there, streaming it at 59%.
  bwd_row_bytes: int = 200 * 1024
  # log_softmax's backward of 16-bit rows: pairs past this many bytes (and
  # within ``bwd_row_bytes``) split over a cluster of CTAs as longer pairs do,
  # where a whole pair holds an SM with one warpgroup and its extra work a row
  # (the live flag, an exp an element) is hidden by nothing
  # (``log_bwd_cfg``; kept whole where they would not split). At 4096 x 32000
  # bfloat16 (pairs of 2 x 62.5 KiB, then split in 2) it took 0.88x the
  # backward's time on an H200 (gpu_pallas-2026-11-27T1934Z) and 0.91x on an
  # H100 (T0116Z, before the live flag in the row sum and approximate exp),
  # each timed with the default in the same samples; softmax's took 1.01x, and
  # float32's pairs 1.00-1.02x (4096 x 16384), so they stay whole. None: as
  # ``bwd_row_bytes``.
  log_bwd_16bit_row_bytes: int | None = 64 * 1024
  # Forward rows past ``row_bytes`` split over a cluster of C CTAs (C a power
  # of two, at most ``split_cluster``), each holding its share of the row in
  # SMEM, at most this many input bytes. The CTAs swap their partial statistics
  # through distributed shared memory, so each row is read from HBM once. A row
  # of at most this many bytes is one part: kept whole, no cluster. 0 streams
  # them. With persistent CTAs (``split_ctas``), which load a row's parts while
  # they write the row before, 200 KiB parts ran 1024 x 65536 at 0.81x
  # (bfloat16: whole rows) and 0.79x (float32: clusters of 2) the streamed time,
  # 76% and 87% of copy, on an H100 (gpu_pallas-2026-11-26T1329Z). One cluster a
  # row did not pay on the H200 (gpu_pallas-2026-11-26T0511Z, 0.91-1.41x).
  split_bytes: int = 200 * 1024
  # The most CTAs a forward row is split over; longer rows stream. At 128 x
  # 262144 bfloat16 (clusters of 4: 28 persistent clusters for 128 rows) the
  # split took 0.94x the streamed time, streaming with 6 stages 0.81x (T1329Z).
  split_cluster: int = 2
  # The same for the backward's pairs of rows past ``bwd_row_bytes`` (both rows'
  # shares within this). Measured on the H200 in the same two runs, 64 KiB parts
  # (1024 x 65536: clusters of 4 in bfloat16, 8 in float32) ran at 0.83x / 0.94x
  # and 0.81x / 0.84x of the streamed time; 128 x 262144 still streams (its parts
  # would need 16 CTAs). 0 streams them.
  bwd_split_bytes: int = 64 * 1024
  # Split rows: None runs a cluster per row; a number runs persistent clusters
  # on about that many CTAs, each loading its part of the next row while it
  # stores the current one; PER_SM (the forward's default) one CTA per SM
  # (``sm_count()``). ``bwd_split_ctas`` is the same for the backward, whose
  # persistent 200 KiB parts took 0.97-1.02x the time of its default (one cluster
  # a row, 64 KiB parts) at 1024 x 65536 on the H100 (T1329Z): not adopted. At
  # 128 x 262144 bfloat16, where the backward streams, 0.87x there (with
  # per-element statistics and approximate math) but 1.04-1.07x on the H200
  # (gpu_pallas-2026-11-26T2049Z, T2058Z).
  split_ctas: int | str | None = PER_SM
  bwd_split_ctas: int | str | None = None
  # Streamed rows (past ``row_bytes``, not split): a cluster of up to this many
  # CTAs per row (``stream_cluster``), each streaming its share of the chunks
  # twice and swapping its partial statistics with the others through
  # distributed shared memory, so that a few long rows (128 x 262144: one CTA, one
  # warpgroup, an SM) take several warpgroups an SM. 0 or 1: one CTA a row. Off
  # until timed.
  stream_cluster: int = 0
  chunk_elems: int = 4096  # elements per (kb, w) chunk
  # Rows in more chunks than this, and not in a multiple of it: the largest
  # chunk of at least half of ``chunk_elems`` whose count is a multiple (the
  # last chunk overlapping where it does not divide the row), so that a
  # cluster of up to this many CTAs can split them. At 50304 columns (nanoGPT's
  # vocabulary) the 13 chunks of 31 sub-rows split over no cluster, and the
  # backward streams its pairs of rows; 16 chunks of 26 split over 8 CTAs. At
  # 152064 (594 sub-rows of 256: 54 chunks of 11) 40 chunks of 15. 1: as
  # they come. Off until timed (a variant).
  chunk_multiple: int = 1
  # SMEM buffers per streamed input (stages - 1 chunks in flight). None: 3, but
  # the forward's streamed rows take as many as ``stream_bytes`` of chunks hold,
  # from 3 to 6: 6 of 8 KiB in 16 bits, where 3 took 1.10x the time at 128 x
  # 262144 bfloat16 on the H100 (T1329Z); 3 of 16 KiB in float32, where more
  # is untimed (``stages=6`` overflowed SMEM by 104 bytes in the backward, whose
  # two streamed inputs take as many stages each).
  stages: int | None = None
  stream_bytes: int = 48 * 1024
  # The forward's streamed 16-bit rows (not the backward's, nor ``row_stats_2d``'s)
  # in chunks of twice ``chunk_elems`` (16 KiB, as float32's) and with twice
  # ``stream_bytes`` (6 stages of 16 KiB): half as many chunks a row, each with
  # its barrier wait, copy and loop step. At 128 x 262144 bfloat16 the forward
  # took 0.91x and 0.94x the time of 8 KiB chunks on the H200 (T2049Z, T2058Z)
  # and 0.97x on the H100 (T0125Z), every check passing; float32 with 6 stages
  # of its 16 KiB chunks took 0.99x (T2058Z), so it keeps 3. The backward took
  # 0.97-1.00x with such chunks, and keeps ``chunk_elems``.
  wide_16bit_stream: bool = True
  num_ctas: int | None = None  # None: one CTA per row (split rows: clusters, one per row)
  # Streamed rows: the second pass (the write) takes the chunks last to first, so
  # that it starts with those the first pass read last, the likeliest still in L2.
  # The same for ragged rows read twice (not held in registers, not bulk
  # copied): untimed there, since 2026-11-27.
  reverse_write: bool = True
  # Lane: explicit layouts, the default of jax 0.10 and what the tests lower here;
  # jax 0.11 made Warpgroup (inferred layouts) the default.
  semantics: plgpu.LoweringSemantics = plgpu.LoweringSemantics.Lane
  # Row statistics (the forward's max and normaliser, the backward's row sum)
  # kept per element across a row's chunks and reduced across the warpgroup once
  # a row (``_Acc``), rather than reduced chunk by chunk: two reductions a row
  # rather than two a chunk, each a serial chain of a thread's registers, warp
  # shuffles and a warpgroup barrier, which nothing hides while one warpgroup
  # holds an SM (the long rows, 1024 x 65536 and 128 x 262144, at 36-65% of
  # copy). The forward's online update then takes one exp an element, as before
  # (``_ew_online``). None (the default): on for the forward's rows past
  # ``row_bytes`` (split or streamed), where with ``approx_math`` it took
  # 0.89-1.01x the time of per-chunk statistics on the H100 (T1329Z); on for the
  # forward of 16-bit rows kept whole, where with ``approx_math`` it took
  # 0.85-0.91x the time at 4096 x 4096 bfloat16 in three H200 runs, 0.95x at 4096
  # x 16384 in two, 0.87x and 1.00x at 4096 x 1024 (gpu_pallas-2026-11-26T2049Z,
  # T2058Z, T2249Z, T2258Z); off elsewhere: float32 rows kept whole took
  # 0.97-1.01x there, the backward 0.96-1.02x.
  elementwise_stats: bool | None = None
  # Rows kept whole in SMEM, with ``elementwise_stats``: the max in one pass over
  # the row's chunks, then the normaliser with that max in a second, rather than
  # the online update: fewer operations an element (no rescaling, no select),
  # one more read of SMEM. Off: at 4096 x 4096 bfloat16 on the H200 it took
  # 0.83x the (then) default's forward time in one run and 1.00x in the next
  # (T2049Z, T2058Z), 0.81x in a third (T2258Z, where the one-pass form now
  # adopted took 0.91x), 0.96x at 4096 x 16384 (one pass 0.95x); 1.00-1.02x in
  # float32.
  held_two_pass: bool = False
  # log_softmax's backward of rows kept whole (whose live flag comes from l):
  # the flag kept per element (1 where l is not -inf) as the row sum goes over
  # the chunks, and reduced once a row, rather than in a pass of its own over l
  # in SMEM with a reduction a chunk. Where a pair of
  # rows holds an SM with one warpgroup (4096 x 32000 bfloat16) the backward of
  # log_softmax took 1.41x softmax's time on the H200 (T2249Z), where with three
  # CTAs an SM (4096 x 16384 bfloat16) 1.00x: work a row that nothing hides. On
  # an H100 (gpu_pallas-2026-11-27T0116Z, T0125Z) the flag in the row sum took
  # 0.90x the backward's time at 4096 x 32000 bfloat16, 0.99x at 4096 x 16384
  # bfloat16 and 1.00x in float32: the default since. (Not yet timed on an H200.)
  live_in_rowsum: bool = True
  # Mosaic GPU's approximate math (``CompilerParams.approx_math``): exp as
  # ``ex2.approx`` of ``x * log2(e)``, log as ``lg2.approx``, rather than the
  # accurate libdevice calls. None: as ``elementwise_stats``, and on for
  # log_softmax's backward of 16-bit rows (its exp(l) an element; softmax's
  # backward takes none), where it took 0.95x the time at 4096 x 32000 and 1024 x
  # 65536 bfloat16 on an H100 (gpu_pallas-2026-11-27T0116Z, T0125Z) and at 1024 x
  # 65536 on an H200 (T2249Z); in float32 0.98-1.00x, so off there. Checked
  # against float64 (4 eps forward, 8 backward) in every variant that used it.
  approx_math: bool | None = None
  # Ragged rows (not a multiple of 16 bytes): rows (the backward: pairs of
  # rows) of up to this many input bytes read once by a bulk copy
  # (``cp.async.bulk``, no tensor map) of their 16-byte aligned interior into
  # SMEM, their few elements before and after it loaded directly; the interior
  # is written back by one bulk store (``_ragged_bulk_fwd``, ``_ragged_bulk_bwd``).
  # 200 KiB (the default): at 4096 x 50257 on an H200 the bulk copies took 0.87x
  # and 0.86x the forward time of the rows read twice element by element (then
  # the default, at 50-59% of copy) and 0.63x and 0.64x the backward's in
  # bfloat16 (pairs of 2 x 98 KiB), 0.94x in float32, every check passing
  # (gpu_pallas-2026-11-27T1934Z, T1949Z; log_softmax 0.78x forward, 0.88x
  # backward). Rows held in registers keep them (``ragged_fwd_bulk``,
  # ``ragged_bwd_bulk``). 0: ragged rows past RAGGED_HELD_CHUNKS are read twice.
  ragged_bulk_bytes: int = 200 * 1024
  # With ``ragged_bulk_bytes``: the backward's pairs of ragged rows past it whose
  # s (or l) alone fits bulk copy s into SMEM and read g twice directly from
  # HBM, the row sum last chunk first, so that the write starts with the
  # chunks it read last (the likeliest still in L2): at most four passes over
  # HBM for the three needed, where the direct loads take five. Off: on an H200
  # it took 1.00x and 1.02x the time of the direct loads at 4096 x 50257 float32
  # (pairs of 2 x 196 KiB), log_softmax's 1.30x (T1934Z, T1949Z), and at 1024 x
  # 100003 bfloat16 softmax's backward 1.33x jax.nn's, log_softmax's 1.81x,
  # where float32's rows, read directly, took 1.08x and 1.10x (T1952Z).
  ragged_bulk_g_twice: bool = False
  # Rows of a multiple of 16 bytes with at most this many elements (the
  # backward: the pair of rows, s or l and g, together) held in registers: the
  # "registers" path. Each CTA reads its row straight from HBM with 16-byte
  # vector loads, in at most RAGGED_HELD_CHUNKS chunks (the backward's pair
  # counts twice), and stores the output from registers: no TMA, no SMEM, no
  # barrier, no wait for the row's store before the CTA exits. The statistics
  # take one warpgroup reduction each (max, then normaliser; the backward's row
  # sum), not two a chunk. For short rows, where the forward kept whole in SMEM
  # took 1.11-1.18x jax.nn's time at 4096 x 1024 on the H100 (T0116Z: XLA's
  # fused softmax holds such rows in registers). 0 (the default): off until timed.
  register_elems: int = 0
  interpret: bool = False


MAX_STAGES = 6  # Config.stages=None, the forward's streamed rows


def _resolved(
  cfg: Config,
  long_fwd: bool = False,
  chunk_bytes: int = 0,
  whole_16bit: bool = False,
  log_bwd_16bit: bool = False,
) -> Config:
  """``cfg`` with its per-path defaults (None) resolved for a call: ``long_fwd``,
  the forward of rows past ``row_bytes`` (split or streamed), in chunks of
  ``chunk_bytes``; ``whole_16bit``, the forward of 16-bit rows kept whole;
  ``log_bwd_16bit``, log_softmax's backward of 16-bit rows (approximate math
  only); none, a float32 row kept whole, a ragged row or the backward."""

  def auto(v, also: bool = False):
    return (long_fwd or whole_16bit or also) if v is None else v

  stages = cfg.stages
  if stages is None:
    stages = min(MAX_STAGES, max(3, cfg.stream_bytes // chunk_bytes)) if long_fwd else 3
  return dataclasses.replace(
    cfg,
    elementwise_stats=auto(cfg.elementwise_stats),
    approx_math=auto(cfg.approx_math, log_bwd_16bit),
    stages=stages,
  )


@dataclasses.dataclass(frozen=True)
class Plan:
  n1: int  # the row is viewed as (n1, w)
  w: int
  kb: int  # chunk = (kb, w)
  fits: bool

  @property
  def nc(self) -> int:
    """Chunks per row."""
    return -(-self.n1 // self.kb)

  @property
  def ov(self) -> int:
    """Sub-rows the last chunk shares with the one before it: 0 when ``kb`` divides
    ``n1``. Otherwise the last chunk is the row's last ``kb`` sub-rows, so that no
    copy leaves the row: the statistics skip its first ``ov`` sub-rows, and the
    output there is written twice, with the same values."""
    return self.nc * self.kb - self.n1


def _whole_copy(n1: int, row_bytes: int) -> bool:
  """Whether a row can move in one TMA copy: at most 256 sub-rows (a box's
  height), and a multiple of WARPGROUP bytes (what Mosaic GPU's copies take)."""
  return n1 <= 256 and row_bytes % WARPGROUP == 0


def plan(cols: int, dtype, cfg: Config = Config()) -> Plan | str:
  """How a row of ``cols`` elements is chunked, or why it cannot be.

  Chunks are ``(kb, w)``, ``kb * w`` a multiple of WARPGROUP (the layout of a
  chunk in registers) near ``cfg.chunk_elems``. A ``kb`` dividing the row is
  taken if it gives at least half the chunk wanted; otherwise (a row of 393 or
  125 sub-rows: 50304 or 32000 columns) chunks of about the wanted size with the
  last one overlapping (``Plan.ov``), rather than chunks of 384 or 1280 elements.
  Rows in more chunks than ``cfg.chunk_multiple``, and not in a multiple of it,
  take the largest chunk of at least half the wanted size whose count is."""
  size = jnp.dtype(dtype).itemsize
  w = 256
  while w > 1 and cols % w:
    w //= 2
  if w * size < ALIGN:
    return (
      f"the row length {cols} must be a multiple of {_per16(dtype)} for {jnp.dtype(dtype)} "
      "(16-byte TMA rows)"
    )
  n1 = cols // w
  fits = cols * size <= cfg.row_bytes and _whole_copy(n1, cols * size)
  step = max(1, WARPGROUP // w)  # kb * w is a multiple of WARPGROUP
  full = min(max(1, min(256, cfg.chunk_elems // w)), n1) // step * step
  if full == 0:
    return f"the row length {cols} is shorter than a chunk of {WARPGROUP} elements"
  p = None
  for kb in range(full, 0, -step):
    if n1 % kb == 0:
      if 2 * kb >= full:
        p = Plan(n1, w, kb, fits)
      break
  if p is None:
    nc = math.ceil(n1 / full)
    p = Plan(n1, w, math.ceil(math.ceil(n1 / nc) / step) * step, fits)  # n1 / nc, rounded up
  m = cfg.chunk_multiple
  if m > 1 and p.nc > m and p.nc % m:
    # The largest chunk of at least half the wanted size whose count is a multiple.
    for kb in range(full, (full + 1) // 2 - 1, -step):
      if -(-n1 // kb) % m == 0:
        return Plan(n1, w, kb, fits)
  return p


MAX_CLUSTER = 8  # the portable cluster size
MAX_BARRIERS = 32  # per barrier array in Mosaic GPU (its phases live in one i32)


def cluster_size(
  p: Plan,
  row_bytes: int,
  budget: int,
  arrays: int = 1,
  most: int = MAX_CLUSTER,
) -> int:
  """CTAs per row for rows split over a cluster: the smallest power of two
  ``C <= min(most, MAX_CLUSTER)`` that divides the row's chunks, with ``row_bytes / C <=
  budget`` and a barrier for each of the part's chunks of the ``arrays`` input
  rows (and one more) within ``MAX_BARRIERS``; 0 if there is none (or no budget).
  A row whose last chunk overlaps the one before it (``Plan.ov``) splits too:
  the part holding the last chunk skips its shared sub-rows in the statistics
  and writes them again, with the same values."""
  nc = p.nc
  c = 1
  while budget > 0 and c <= min(most, MAX_CLUSTER):
    if nc % c == 0 and row_bytes <= c * budget and arrays * (nc // c) + 1 <= MAX_BARRIERS:
      return c
    c *= 2
  return 0


def stream_cluster(p: Plan, cfg: Config) -> int:
  """CTAs per streamed row (``Config.stream_cluster``): the largest power of two
  up to it (and MAX_CLUSTER) that divides the row's chunks; 1 if the last chunk
  overlaps the one before it (``Plan.ov``)."""
  c = 1
  while 2 * c <= min(cfg.stream_cluster, MAX_CLUSTER) and p.nc % (2 * c) == 0 and not p.ov:
    c *= 2
  return c


def route(rows: int, p: Plan, dtype, cfg: Config, backward: bool = False) -> tuple[str, int]:
  """The path a call takes, and its size: ``("rows", 1)`` whole rows, one per
  CTA; ``("split", C)`` rows
  split over clusters of C CTAs; ``("streamed", C)`` rows read twice in chunks,
  each by a cluster of C CTAs (``stream_cluster``); ``("registers", nc)`` rows
  held in registers in nc chunks (``Config.register_elems``)."""
  if nc := register_chunks(p.n1 * p.w, dtype, cfg, 2 if backward else 1):
    return "registers", nc
  row_bytes = p.n1 * p.w * jnp.dtype(dtype).itemsize
  if backward:
    fits = _whole_copy(p.n1, row_bytes) and 2 * row_bytes <= cfg.bwd_row_bytes
    c = cluster_size(p, 2 * row_bytes, cfg.bwd_split_bytes, arrays=2)
  else:
    fits = p.fits
    c = cluster_size(p, row_bytes, cfg.split_bytes, most=cfg.split_cluster)
  if not fits:
    return ("split", c) if c else ("streamed", stream_cluster(p, cfg))
  return "rows", 1


def unsupported_reason(rows: int, cols: int, dtype) -> str | None:
  if cols < WARPGROUP:
    return f"the row length {cols} is shorter than {WARPGROUP} elements (a warpgroup's threads)"
  return None


# jax 0.10 requires the index argument of plgpu.load, 0.11 deprecates it (index
# the ref instead) and 0.12 removes it.
_IDX = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_TAKES_IDX = _IDX is not None and _IDX.default is inspect.Parameter.empty


def _load_f32(ref, layout, interpret: bool):
  """A chunk in float32; the interpreter has no ``plgpu.load``, so it reads plainly."""
  if interpret:
    v = ref[...]
  elif _LOAD_TAKES_IDX:
    v = plgpu.load(ref, (), layout=layout)
  else:
    v = plgpu.load(ref, layout=layout)
  return v.astype(F32)


def _safe_shift(m):
  return jnp.where(m == -jnp.inf, 0.0, m)


def _lse(m, d):
  """A row's log-sum-exp from its running max and normaliser (-inf if empty)."""
  return _safe_shift(m) + jnp.log(d)


def _start(p: Plan, j):
  """The first sub-row of chunk ``j``: ``j * kb``, and for the last chunk of a
  row that ``kb`` does not divide, ``n1 - kb`` (``Plan.ov``). (No copy may leave
  its row: the interpreter would clamp it, the GPU would not.)"""
  if p.ov == 0:
    return j * p.kb
  return jnp.minimum(j * p.kb, p.n1 - p.kb)


def _chunk(p: Plan, row, j):
  """Chunk ``j`` (``(kb, w)``, from ``_start``) of a whole ``(n1, w)`` row ref."""
  return row.at[pl.ds(_start(p, j), p.kb)]


def _skip_shared(p: Plan, j, v, fill, layout, interpret: bool):
  """The float32 chunk ``v`` of chunk ``j`` for a row statistic: if ``j`` is the
  last chunk and overlaps the one before it, its first ``p.ov`` sub-rows (already
  counted there) are ``fill``, which the statistic ignores."""
  if p.ov == 0 or (isinstance(j, int) and j != p.nc - 1):
    return v
  skip = p.ov if isinstance(j, int) else jnp.where(j == p.nc - 1, p.ov, 0)
  return jnp.where(_iota(v.shape, layout, interpret) >= skip, v, fill)


def _iota(shape, layout, interpret: bool):
  """Each element's index along axis 0 of an array of this shape and layout."""
  if interpret:  # (the interpreter has no layouts)
    return jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  return plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout)


def _in_place(p: Plan, write, chunk, out):
  """Runs ``write(j, carry)``, which writes chunk j of an SMEM row in place, for
  each chunk ``j``; ``out(chunk(j))`` is the value it writes.
  A last chunk that overlaps the one before it is computed ahead of the others,
  before they overwrite the sub-rows it shares with them, and written after them
  (the same values again). (With Lane semantics each SMEM store waits for the
  warpgroup's earlier reads: Mosaic GPU's automatic barriers.)"""

  if p.ov == 0:
    jax.lax.fori_loop(0, p.nc, write, 0)
    return
  ref = chunk(p.nc - 1)
  last = out(ref)
  jax.lax.fori_loop(0, p.nc - 1, write, 0)
  ref[...] = last


def sm_count() -> int:
  """Streaming multiprocessors of the GPU (132 on an H100 SXM and an H200, and
  the fallback where the device does not say)."""
  return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def _strided(shape, dtype):
  """The layout Mosaic GPU gives a plain SMEM load of this shape and dtype."""
  vec = min(8 // jnp.dtype(dtype).itemsize, math.prod(shape) // WARPGROUP)
  while math.prod(shape) % (vec * WARPGROUP):
    vec //= 2
  return plgpu.Layout.WG_STRIDED(shape, vec_size=vec)


def _drain():
  """Waits for every TMA store this CTA has issued to complete."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=False)


def _row_loop(num_rows: int, num_ctas: int, body):
  """Runs ``body(row)`` for the rows this CTA owns: cta, cta + num_ctas, ..."""
  cta = jax.lax.axis_index("cta")
  mine = (num_rows - cta + num_ctas - 1) // num_ctas

  def step(k, carry):
    body(cta + k * num_ctas)
    return carry

  jax.lax.fori_loop(0, mine, step, 0)


def _online_stats(m, d, v):
  """Folds the float32 chunk ``v`` into the running max ``m`` and normaliser ``d``."""
  m_new = jnp.maximum(m, jnp.max(v))  # NaN propagates
  shift = _safe_shift(m_new)
  # d is 0 while m is -inf: rescale by 0 rather than exp(-inf - -inf).
  alpha = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - shift))
  return m_new, d * alpha + jnp.sum(jnp.exp(v - shift))


class _Stats(NamedTuple):
  """How ``_split_rows`` reduces a row: ``fold(init(), chunks, j)`` over a part's
  chunks (``j`` the chunk's index in the row for ``_skip_shared``, or None if
  the row's chunks do not overlap), ``done`` the part's ``count`` float32
  scalars, ``merge`` two parts' scalars into one (in cluster order)."""

  init: Callable
  fold: Callable
  done: Callable
  merge: Callable
  count: int  # the scalars a part swaps with its cluster (``_xch_scratch``)


def _merge_stats(a, b):
  """The running max and normaliser of two parts of a row, from each part's."""
  (ma, da), (mb, db) = a, b
  m = jnp.maximum(ma, mb)  # NaN propagates
  shift = _safe_shift(m)

  def scale(mp):  # a part with no live entry (m = -inf, d = 0) adds 0
    return jnp.where(mp == -jnp.inf, 0.0, jnp.exp(mp - shift))

  return m, da * scale(ma) + db * scale(mb)


def _ew_online(md, v):
  """Folds the float32 chunk ``v`` into elementwise running statistics ``md``
  (arrays of ``v``'s shape): each element's max and normaliser. Of
  ``exp(m - max(m, v))`` and ``exp(v - max(m, v))`` one is 1, so each element
  takes one exp, of ``min - max``: an element above its running max rescales
  the normaliser and adds 1, one below adds its exp. (A NaN propagates; a +inf
  is a max whose normaliser becomes NaN in ``_ew_reduce``, as in ``_online_stats``.)"""
  m, d = md
  hi = jnp.maximum(m, v)  # NaN propagates
  e = jnp.exp(jnp.minimum(m, v) - _safe_shift(hi))  # 0 while both are -inf
  return hi, jnp.where(v > m, d * e + 1.0, d + e)


def _ew_reduce(md):
  """The row's max and normaliser from elementwise running statistics."""
  m_el, d_el = md
  m = jnp.max(m_el)  # NaN propagates
  # exp(-inf) is 0 for elements that saw only -inf; exp(inf - inf) a NaN for a +inf.
  return m, jnp.sum(d_el * jnp.exp(m_el - _safe_shift(m)))


def _full(shape, value, layout, interpret: bool):
  """A float32 array of ``value`` in ``layout`` (a loop carry must keep one layout)."""
  v = jnp.full(shape, value, F32)
  return v if interpret else plgpu.layout_cast(v, layout)


@dataclasses.dataclass(frozen=True)
class _Acc:
  """How a row's statistics accumulate over its float32 chunks of ``shape``
  (in ``layout``): ``fwd_*`` the running max and normaliser, ``bwd_*`` the
  backward's row sum (``_bwd_term``). Each ``*_done`` gives the row's scalars.

  By default each chunk is reduced across the warpgroup as it comes (the
  forward two reductions a chunk, the backward one); with ``elementwise``
  (``Config.elementwise_stats``) the statistics are kept per element and
  reduced once a row."""

  elementwise: bool
  shape: tuple[int, ...]
  layout: object
  interpret: bool

  @classmethod
  def of(cls, cfg: Config, nc: int, shape, layout) -> _Acc:
    """For rows of ``nc`` chunks. A row of one chunk is reduced once either way,
    and its elementwise statistics would take a second exp an element
    (``_ew_reduce``)."""
    return cls(cfg.elementwise_stats and nc > 1, tuple(shape), layout, cfg.interpret)

  def filled(self, *values):
    """Initial statistics: each of ``values``, a scalar or (elementwise) an array."""
    if self.elementwise:
      return tuple(_full(self.shape, v, self.layout, self.interpret) for v in values)
    return tuple(jnp.float32(v) for v in values)

  def fwd_init(self):
    return self.filled(-jnp.inf, 0.0)

  def fwd_fold(self, md, v):
    return _ew_online(md, v) if self.elementwise else _online_stats(*md, v)

  def fwd_done(self, md):
    return _ew_reduce(md) if self.elementwise else md

  def bwd_init(self):
    return self.filled(0.0)[0]

  def bwd_fold(self, acc, yc, gc, *, log: bool):
    t = _bwd_term(yc, gc, log=log)
    return acc + (t if self.elementwise else jnp.sum(t))

  def bwd_done(self, acc):
    return jnp.sum(acc) if self.elementwise else acc


def _fwd_out(v, m, d, log):
  shift = _safe_shift(m)
  if log:  # (v - shift) - log d: v - shift is exact, v - (shift + log d) is not
    return (v - shift) - jnp.where(d == 0, 0.0, jnp.log(d))
  return jnp.exp(v - shift) * (1.0 / jnp.where(d == 0, 1.0, d))


def _kernel(name: str, rows, cfg: Config, out_type, scratch, body, cluster: int = 1):
  """``body(num_ctas, *refs)`` on ``num_ctas`` CTAs (axis ``"cta"``), or as many
  clusters of ``cluster`` CTAs (axis ``"cl"``) if ``cluster > 1``. ``name`` (``_name``,
  with the path as ``route`` names it, or "ragged") is what profilers show for
  the kernel, rather than "anonymous"."""
  num_ctas = rows if cfg.num_ctas is None else min(cfg.num_ctas, rows)
  interpret = False
  kwargs = {}
  if cfg.interpret:
    # The Mosaic GPU interpreter runs a grid of one CTA only (and no clusters).
    num_ctas = 1
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    interpret = InterpretGPUParams()
  elif cluster > 1:
    kwargs = dict(cluster=(cluster,), cluster_names=("cl",))
  return plgpu.kernel(
    functools.partial(body, num_ctas),
    out_type=out_type,
    scratch_types=scratch,
    compiler_params=plgpu.CompilerParams(
      lowering_semantics=cfg.semantics, **({"approx_math": True} if cfg.approx_math else {})
    ),
    grid=(num_ctas,),
    grid_names=("cta",),
    interpret=interpret,
    kernel_name=name,
    **kwargs,
  )


def _stream(row, p: Plan, stages: int, sources, bars, fn, carry, reverse: bool = False, part=None):
  """Streams the chunks of each ``(gmem, bufs)`` in ``sources`` (``gmem[row]``) through
  ``stages`` SMEM buffers, keeping ``stages - 1`` chunks in flight while
  ``fn(c, slot, carry)`` works on chunk c. The chunks come first to last, or
  last to first if ``reverse``: all the row's, or ``part = (first, count)``'s.
  Source k, slot s completes barrier ``stages * k + s``."""
  first, nc = (0, p.nc) if part is None else part
  offset = (lambda j: j) if isinstance(first, int) and first == 0 else lambda j: first + j
  chunk = (lambda j: offset(nc - 1 - j)) if reverse else offset

  def fetch(j, slot):
    for k, (src, bufs) in enumerate(sources):
      dst = bars.at[stages * k + slot]
      src_chunk = src.at[row, pl.ds(_start(p, chunk(j)), p.kb)]
      plgpu.copy_gmem_to_smem(src_chunk, bufs.at[slot], dst)

  for j in range(min(stages - 1, nc)):
    fetch(j, j)

  def step(j, carry):
    ahead = j + stages - 1

    @pl.when(ahead < nc)
    def _():
      fetch(ahead, ahead % stages)  # the slot that chunk j - 1 used, already consumed

    slot = j % stages
    for k in range(len(sources)):
      plgpu.barrier_wait(bars.at[stages * k + slot])
    return fn(chunk(j), slot, carry)

  return jax.lax.fori_loop(0, nc, step, carry)


def _streamed_stats(row, p: Plan, stages: int, source, bars, acc: _Acc, chunk, parts):
  """The running max and normaliser of a streamed row (the forward's first pass,
  and all of ``row_stats_2d``): each of the CTA's parts streamed from ``source``
  (``(gmem, bufs)``) through ``stages`` buffers, ``chunk(j, slot)`` the float32
  chunk j to fold (``acc``); then merged with the cluster's other parts.
  ``parts`` is ``(part_of, held, size, xch)`` (``_parts``, ``_combine``)."""
  part_of, held, size, xch = parts

  def fold(j, slot, md):
    return acc.fwd_fold(md, chunk(j, slot))

  def part_stats(i):
    part = part_of(i)
    return acc.fwd_done(_stream(row, p, stages, [source], bars, fold, acc.fwd_init(), part=part))

  return _combine([part_stats(i) for i in range(held)], size, xch, _merge_stats)


# ----------------------------------------------------------------------------- forward


def softmax_fwd_2d(x: jax.Array, *, log: bool, cfg: Config = Config(), lse: bool | None = None):
  """``(softmax or log_softmax of x over axis 1, lse as (rows, 1) float32)``.

  ``lse`` says whether the kernel writes the lse (default: for log_softmax,
  whose backward takes its live flag from it); otherwise the second result is
  None. A kernel does not write what nobody reads: 512 bytes a row, a quarter
  of a 2 KiB row's output."""
  rows, cols = x.shape
  stat = log if lse is None else lse
  p = plan(cols, x.dtype, cfg)
  if isinstance(p, str):
    return _ragged_fwd(x, log, stat, _resolved(cfg))
  dtype = x.dtype
  kind, size = route(rows, p, dtype, cfg)
  if kind == "registers":  # (resolved as a 16-bit row kept whole would be)
    cfg = _resolved(cfg, whole_16bit=dtype.itemsize == 2)
    return _ragged_fwd(x, log, stat, cfg, vec=_per16(dtype))
  if kind == "streamed" and dtype.itemsize == 2 and cfg.wide_16bit_stream:
    wide = dataclasses.replace(
      cfg, chunk_elems=2 * cfg.chunk_elems, stream_bytes=2 * cfg.stream_bytes
    )
    wide_p = plan(cols, dtype, wide)
    wide_route = route(rows, wide_p, dtype, wide)
    # (Fewer chunks could let a row split; then it keeps its own chunks.)
    if wide_route[0] == "streamed":
      cfg, p, (kind, size) = wide, wide_p, wide_route
  name = _name(log, False, kind)
  long_fwd = kind in ("split", "streamed")
  whole_16bit = not long_fwd and dtype.itemsize == 2
  cfg = _resolved(cfg, long_fwd, p.kb * p.w * dtype.itemsize, whole_16bit)
  S = cfg.stages
  lay = _strided((p.kb, p.w), dtype)
  x3 = x.reshape(rows, p.n1, p.w)
  out_type = (jax.ShapeDtypeStruct(x3.shape, dtype),)
  if stat:
    out_type += (jax.ShapeDtypeStruct((rows, WARPGROUP), F32),)

  load = partial(_load_f32, layout=lay, interpret=cfg.interpret)
  acc = _Acc.of(cfg, p.nc, (p.kb, p.w), lay)

  def fresh(j, v):  # (chunk j for the statistics)
    return _skip_shared(p, j, v, -jnp.inf, lay, cfg.interpret)

  def finish_row(lse, row, m, d, store=True):
    """Stores the row's lse (if ``stat``; ``lse`` is its ``(gmem, smem)`` refs;
    if not ``store``, only the first CTA of its cluster does), then waits for the
    row's stores, before its buffers take the next row."""
    if stat:
      lse_gmem, lse_smem = lse

      def store_lse():
        lse_smem[...] = jnp.broadcast_to(_lse(m, d), (WARPGROUP,))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[row])

      if store:
        store_lse()
      else:
        pl.when(jax.lax.axis_index("cl") == 0)(store_lse)
    _drain()

  def split_lse(refs):
    """The refs after x and the output: ``((lse gmem, lse smem) or None, scratch)``;
    the lse's SMEM row is the last scratch buffer."""
    if stat:
      return (refs[0], refs[-1]), refs[1:-1]
    return None, refs

  def row_stats(row):
    """Running max and normaliser of a whole (n1, w) row in SMEM."""

    def chunk(j):
      return fresh(j, load(_chunk(p, row, j)))

    def fold(f, init):  # f over the row's chunks
      plain = p.nc - (p.ov > 0)  # an overlapping last chunk is masked, after the loop
      a = jax.lax.fori_loop(0, plain, lambda j, a: f(a, chunk(j)), init)
      return f(a, chunk(p.nc - 1)) if p.ov else a

    if acc.elementwise and cfg.held_two_pass:
      # The max, then the normaliser with it: no rescaling (Config.held_two_pass).
      m = jnp.max(fold(jnp.maximum, *acc.filled(-jnp.inf)))
      shift = _safe_shift(m)  # +inf: exp(inf - inf) makes d NaN, as the online form does
      return m, jnp.sum(fold(lambda a, v: a + jnp.exp(v - shift), *acc.filled(0.0)))
    return acc.fwd_done(fold(acc.fwd_fold, acc.fwd_init()))

  def row_write(row, m, d):
    """The output, in place of the row."""
    out = lambda ref: _fwd_out(load(ref), m, d, log).astype(dtype)  # noqa: E731
    chunk = partial(_chunk, p, row)

    def write(j, c):
      ref = chunk(j)
      ref[...] = out(ref)
      return c

    _in_place(p, write, chunk, out)

  if kind == "split":

    def emit(chunks, md, flag):
      return _fwd_out(chunks[0], *md, log)

    def fold(md, chunks, j):
      return acc.fwd_fold(md, fresh(j, chunks[0]))

    finish = _lse if stat else None
    stats = _Stats(acc.fwd_init, fold, acc.fwd_done, _merge_stats, count=2)  # max, normaliser
    out, *lse = _split_rows(
      name, [x3], p, cfg, size, load, stats, emit, finish=finish, ctas=cfg.split_ctas
    )
    return out.reshape(rows, cols), lse[0][:, :1] if stat else None

  if kind == "rows":

    def body(num_ctas, x_gmem, o_gmem, *refs):
      lse, (buf, bar) = split_lse(refs)

      def one_row(row):
        plgpu.copy_gmem_to_smem(x_gmem.at[row], buf, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        m, d = row_stats(buf)
        row_write(buf, m, d)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, o_gmem.at[row])
        finish_row(lse, row, m, d)

      _row_loop(rows, num_ctas, one_row)

    scratch = [plgpu.SMEM((p.n1, p.w), dtype), plgpu.Barrier(num_barriers=1)]
  else:
    # ``size`` CTAs a row, each streaming one part of its chunks (``_parts``).
    held, cluster_part = _parts(p, size, cfg)

    def body(num_ctas, x_gmem, o_gmem, *refs):
      lse, (bufs, outs, bars, *xch) = split_lse(refs)
      xch = xch[0] if xch else None  # the swap's SMEM rows (``_xch_scratch``), if clustered
      part_of = cluster_part()

      def one_row(row):
        chunk = lambda j, slot: fresh(j, load(bufs.at[slot]))  # noqa: E731
        parts = (part_of, held, size, xch)
        m, d = _streamed_stats(row, p, S, (x_gmem, bufs), bars, acc, chunk, parts)

        def write(j, slot, c):
          # Consecutive chunks alternate between outs[0] and outs[1] in either order.
          plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # outs[j % 2] is free
          outs.at[j % 2][...] = _fwd_out(load(bufs.at[slot]), m, d, log).astype(dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(outs.at[j % 2], o_gmem.at[row, pl.ds(_start(p, j), p.kb)])
          return c

        rev = cfg.reverse_write  # (parts last to first too: the chunks alternate outs)
        for i in reversed(range(held)) if rev else range(held):
          _stream(row, p, S, [(x_gmem, bufs)], bars, write, 0, reverse=rev, part=part_of(i))
        finish_row(lse, row, m, d, store=held == size)

      _cluster_rows(size, held, lambda: _row_loop(rows, num_ctas, one_row))

    scratch = [
      plgpu.SMEM((S, p.kb, p.w), dtype),
      plgpu.SMEM((2, p.kb, p.w), dtype),
      plgpu.Barrier(num_barriers=S),
    ]
    scratch += [_xch_scratch(2)] if size > 1 else []
  scratch += [plgpu.SMEM((WARPGROUP,), F32)] if stat else []  # the lse's row (``split_lse``)
  out, *lse = _kernel(name, rows, cfg, out_type, scratch, body, cluster=size)(x3)
  return out.reshape(rows, cols), lse[0][:, :1] if stat else None


# ---------------------------------------------------------------- row statistics


def row_stats_2d(x: jax.Array, *, cfg: Config = Config()):
  """``(m, d)`` of each row of ``x``, each ``(rows, 1)`` float32: the row's max
  (-inf for an empty row) and its normaliser ``d = sum(exp(x - shift))``,
  ``shift`` the max (0 for an empty row, whose ``d`` is 0). A row holding NaN
  or +inf has ``d`` NaN (its ``m`` may be any of its values then). What a loss
  needs of its logits in the forward: each row is
  read once, and nothing is written but these two numbers (a 512-byte row each).

  Whatever its length, a row streams through ``cfg.stages`` buffers, as the
  forward's first pass over a long row does (``stream_cluster`` CTAs a row);
  ragged rows are read element by element (``_ragged_stats``)."""
  rows, cols = x.shape
  p = plan(cols, x.dtype, cfg)
  if isinstance(p, str):
    return _ragged_stats(x, _resolved(cfg))
  size = stream_cluster(p, cfg)
  cfg = _resolved(cfg, True, p.kb * p.w * x.dtype.itemsize)
  S = cfg.stages
  lay = _strided((p.kb, p.w), x.dtype)
  load = partial(_load_f32, layout=lay, interpret=cfg.interpret)
  acc = _Acc.of(cfg, p.nc, (p.kb, p.w), lay)
  held, cluster_part = _parts(p, size, cfg)

  def body(num_ctas, x_gmem, m_gmem, d_gmem, bufs, bars, m_smem, d_smem, *xch):
    xch = xch[0] if xch else None  # the swap's SMEM rows (``_xch_scratch``), if clustered
    part_of = cluster_part()

    def one_row(row):
      def chunk(j, slot):
        return _skip_shared(p, j, load(bufs.at[slot]), -jnp.inf, lay, cfg.interpret)

      parts = (part_of, held, size, xch)
      md = _streamed_stats(row, p, S, (x_gmem, bufs), bars, acc, chunk, parts)

      def store():
        for v, smem in zip(md, (m_smem, d_smem), strict=True):
          smem[...] = jnp.broadcast_to(v, (WARPGROUP,))
        plgpu.commit_smem()
        for smem, gmem in ((m_smem, m_gmem), (d_smem, d_gmem)):
          plgpu.copy_smem_to_gmem(smem, gmem.at[row])

      if held == size:
        store()
      else:
        pl.when(jax.lax.axis_index("cl") == 0)(store)
      _drain()  # (before the next row's statistics take the two SMEM rows)

    _cluster_rows(size, held, lambda: _row_loop(rows, num_ctas, one_row))

  scratch = [
    plgpu.SMEM((S, p.kb, p.w), x.dtype),
    plgpu.Barrier(num_barriers=S),
    plgpu.SMEM((WARPGROUP,), F32),
    plgpu.SMEM((WARPGROUP,), F32),
  ]
  scratch += [_xch_scratch(2)] if size > 1 else []
  out_type = (jax.ShapeDtypeStruct((rows, WARPGROUP), F32),) * 2
  name = stats_kernel_name("streamed")
  m, d = _kernel(name, rows, cfg, out_type, scratch, body, cluster=size)(x.reshape(rows, p.n1, p.w))
  return m[:, :1], d[:, :1]


def _cluster_barrier(arrive: bool = True, wait: bool = True):
  """The cluster barrier (``barrier.cluster``), or one half of it: a thread's
  shared-memory writes before its arrive are visible to every thread of the
  cluster after that thread's matching wait (release and acquire at cluster
  scope). Each thread alternates arrive and wait."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import llvm

  # Not .aligned: that would also require every warp to be converged here.
  asm = ["barrier.cluster.arrive.release;"] * arrive + ["barrier.cluster.wait.acquire;"] * wait

  @plgpu.inline_mgpu()
  def barrier(ctx):
    del ctx
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "\n".join(asm), "", has_side_effects=True)

  barrier()


def _swap(xch, own, c: int, merge):
  """The partial statistics ``own`` of each of the ``c`` CTAs of the cluster,
  merged in cluster order, so that every CTA gets the same bits. ``xch`` holds
  one ``(WARPGROUP,)`` float32 SMEM ref per statistic in each CTA. (Separate
  refs, because a peer's view of a row of a 2-D ref does not lower with
  Warpgroup semantics.)

  Called with an arrive pending (the previous swap's, or the caller's before
  the first), and returns with one: the wait that closes it, before the slot is
  written again or the CTA exits, is the sign that the peers have read it. That
  second barrier thus overlaps the work between two swaps."""
  _cluster_barrier(arrive=False)  # the peers have read the slot since the last swap
  for s, v in enumerate(own):
    xch[s][...] = jnp.broadcast_to(v, (WARPGROUP,))
  _cluster_barrier()  # every CTA's slot is written
  peers = []
  for k in range(c):
    peer = [plgpu.cluster_ref(xch[s], {"cl": k}) for s in range(len(own))]
    peers.append(tuple(jnp.max(slot[...]) for slot in peer))
  _cluster_barrier(wait=False)  # this CTA has read its peers' slots
  return functools.reduce(merge, peers)


def _xch_scratch(n_stats: int):
  """The SMEM rows through which a cluster's CTAs swap ``n_stats`` statistics (``_swap``)."""
  return [plgpu.SMEM((WARPGROUP,), F32) for _ in range(n_stats)]


def _parts(p: Plan, c: int, cfg: Config):
  """A streamed row shared by ``c`` CTAs: ``(held, cluster_part)``, with
  ``held`` the parts each CTA streams (all ``c`` in interpret mode, which runs
  one CTA and no cluster; else one), and ``cluster_part()``, called in the
  kernel, giving ``part_of(i)``: the ``(first chunk, count)`` of the CTA's i-th
  part (None for a row of one part: all of it)."""
  ncp = p.nc // c
  held = c if cfg.interpret else 1

  def cluster_part():
    if c == 1:
      return lambda i: None  # the whole row
    if held == c:
      return lambda i: (i * ncp, ncp)
    k = jax.lax.axis_index("cl")
    return lambda i: (k * ncp, ncp)

  return held, cluster_part


def _add_sums(a, b):
  """The backward's ``merge``: two parts' row sums, as 1-tuples."""
  return (a[0] + b[0],)


def _combine(stats, c: int, xch, merge):
  """The row's statistics from the ``held`` parts' ``stats`` of a CTA: merged in
  order if it holds every part (or the row is one part), else swapped with the
  cluster's other CTAs through the SMEM rows ``xch`` (``_swap``)."""
  if len(stats) == c:
    return functools.reduce(merge, stats)
  return _swap(list(xch), stats[0], c, merge)


def _cluster_rows(c: int, held: int, run):
  """``run()``, the CTA's rows, between the cluster barrier halves that ``_swap``
  expects (a pending arrive before the first swap; the last wait before exit,
  so that no CTA leaves while a peer may still read its slots)."""
  if held < c:
    _cluster_barrier(wait=False)
  run()
  if held < c:
    _cluster_barrier(arrive=False)


def _split_rows(
  name: str,
  arrays,
  p: Plan,
  cfg: Config,
  c: int,
  load,
  stats,
  emit,
  *,
  finish=None,
  ctas=None,
  live=None,
):
  """Rows split over clusters of ``c`` CTAs (``cfg.split_bytes``, backward
  ``cfg.bwd_split_bytes``).

  CTA k of a row's cluster loads chunks ``[k * ncp, (k + 1) * ncp)`` of each of
  ``arrays`` (``(rows, n1, w)``) into SMEM, each chunk on its own barrier, and
  folds them into partial statistics as they arrive: ``stats`` (``_Stats``)
  folds the float32 chunk of each array. The CTAs swap their partial statistics through
  distributed shared memory (``_swap``). Then each writes
  ``emit(chunks, stats, flag)`` in place of its chunks of the last array and
  stores them: one HBM read and one write per element. ``finish(*stats)``, if
  given, is a per-row float32 second output (log_softmax's lse), stored by CTA
  0; ``live``, a ``(rows, WARPGROUP)`` float32 row flag, is ``emit``'s ``flag``.

  With ``ctas`` (``cfg.split_ctas`` or ``bwd_split_ctas``: a number, or PER_SM),
  persistent clusters on about that many CTAs take rows q, q + Q, ...: once the
  store of chunk j has read it from SMEM (``LAG`` stores later), chunk j of the
  next row loads into its slot, and the last ``LAG`` follow after the row.

  In interpret mode (one CTA, no clusters) that one CTA holds all ``c`` parts of
  a row and merges their statistics in the same order: the split, the partial
  statistics and their merge run on the CPU, the swap through the cluster does not.
  """
  rows = arrays[0].shape[0]
  dtype = arrays[0].dtype
  n_in = len(arrays)
  init, fold, done, merge, n_stats = stats
  ncp = p.nc // c  # chunks per part
  held = c if cfg.interpret else 1  # parts per CTA
  out_type = [jax.ShapeDtypeStruct(arrays[0].shape, dtype)]
  if finish is not None:
    out_type.append(jax.ShapeDtypeStruct((rows, WARPGROUP), F32))
  inputs = [*arrays, *([live] if live is not None else [])]
  nloc = held * ncp  # chunks held by a CTA
  flag_bar = n_in * nloc
  LAG = 2
  if ctas:
    ctas = sm_count() if ctas == PER_SM else ctas
    # A cluster runs within one GPC (14-18 SMs on an H100 or H200): at one CTA
    # per SM, clusters of 4 or 8 cannot use every SM, and a cluster that does not
    # fit would wait for a whole second wave. So clusters take 7/8 of the CTAs.
    ctas = ctas if c == 1 else ctas * 7 // 8
    cfg = dataclasses.replace(cfg, num_ctas=max(1, ctas // c))  # clusters

  def body(num_ctas, *refs):
    ins, outs = refs[: len(inputs)], refs[len(inputs) : len(inputs) + len(out_type)]
    *bufs, xch, row_smem, bars = refs[len(inputs) + len(out_type) :]
    part = 0 if held == c else jax.lax.axis_index("cl")
    first = part * ncp  # the CTA's first chunk in a row
    cta = jax.lax.axis_index("cta")
    mine = (rows - cta + num_ctas - 1) // num_ctas

    def fetch(row, j):
      for a in range(n_in):
        src = ins[a].at[row, pl.ds(_start(p, first + j), p.kb)]
        plgpu.copy_gmem_to_smem(src, bufs[a].at[j], bars.at[n_in * j + a])

    @pl.when(mine > 0)
    def _():
      for j in range(nloc):
        fetch(cta, j)

    def one_row(k, carry):
      row = cta + k * num_ctas
      nxt = row + num_ctas
      has_next = k + 1 < mine
      if live is not None:  # waited for only before the write
        plgpu.copy_gmem_to_smem(ins[-1].at[row], row_smem, bars.at[flag_bar])

      def chunks(j):
        return tuple(load(buf.at[j]) for buf in bufs)

      def part_stats(i):
        def step(j, st):
          for a in range(n_in):
            plgpu.barrier_wait(bars.at[n_in * (i * ncp + j) + a])
          # (The chunk's index in the row, which only an overlapping last chunk
          # needs: None otherwise, so that the loop does not carry it.)
          at = first + i * ncp + j if p.ov else None
          return fold(st, chunks(i * ncp + j), at)

        return done(jax.lax.fori_loop(0, ncp, step, init()))

      stats = _combine([part_stats(i) for i in range(held)], c, xch, merge)
      flag = None
      if live is not None:
        plgpu.barrier_wait(bars.at[flag_bar])
        flag = jnp.max(row_smem[...])

      def write(j, carry):
        out = bufs[-1].at[j]
        out[...] = emit(chunks(j), stats, flag).astype(dtype)
        plgpu.commit_smem()
        # (An overlapping last chunk stores the sub-rows it shares with the one
        # before it again: the same values, from the same inputs and statistics.)
        plgpu.copy_smem_to_gmem(out, outs[0].at[row, pl.ds(_start(p, first + j), p.kb)])

        @pl.when(jnp.logical_and(j >= LAG, has_next))
        def _():
          plgpu.wait_smem_to_gmem(LAG, wait_read_only=True)  # chunk j - LAG is stored
          fetch(nxt, j - LAG)

        return carry

      jax.lax.fori_loop(0, nloc, write, 0)

      def store_finish():
        row_smem[...] = jnp.broadcast_to(finish(*stats), (WARPGROUP,))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(row_smem, outs[1].at[row])

      if finish is not None:
        if held == c:
          store_finish()
        else:
          pl.when(part == 0)(store_finish)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every chunk (and the lse) is stored

      @pl.when(has_next)
      def _():
        for j in range(max(0, nloc - LAG), nloc):
          fetch(nxt, j)

      return carry

    _cluster_rows(c, held, lambda: jax.lax.fori_loop(0, mine, one_row, 0))
    _drain()

  scratch = [plgpu.SMEM((nloc, p.kb, p.w), dtype) for _ in range(n_in)]
  scratch += [
    _xch_scratch(n_stats),
    plgpu.SMEM((WARPGROUP,), F32),
    plgpu.Barrier(num_barriers=flag_bar + 1),
  ]
  return _kernel(name, rows, cfg, tuple(out_type), scratch, body, cluster=c)(*inputs)


# ---------------------------------------------------------------------------- backward


def _bwd_term(yc, gc, *, log: bool):
  """What the row sum adds up: softmax, g * s; log_softmax, g."""
  return gc if log else gc * yc


def _bwd_grad(yc, gc, acc, flag, *, log: bool):
  """softmax: dx = s * (g - sum(g * s)); log_softmax: dx = g - exp(l) * sum(g), 0 if empty."""
  if log:
    return jnp.where(jnp.broadcast_to(flag != 0, gc.shape), gc - jnp.exp(yc) * acc, 0.0)
  return yc * (gc - acc)


def _live_mark(lc):
  """1 where the chunk of l is not -inf (NaN too), else 0: a row whose max of
  these is 0 is empty, and its log_softmax gradient 0."""
  return jnp.where(lc == -jnp.inf, jnp.zeros_like(lc), 1.0)


# ``route``'s paths that keep whole rows on chip (in SMEM, or in registers)
HELD_PATHS = ("rows", "registers")


def log_bwd_cfg(rows: int, p: Plan, dtype, cfg: Config) -> Config:
  """``cfg`` for log_softmax's backward of rows planned as ``p``: with
  ``bwd_row_bytes`` at ``Config.log_bwd_16bit_row_bytes`` for 16-bit pairs that
  then split over a cluster rather than stay whole (never streamed instead)."""
  limit = cfg.log_bwd_16bit_row_bytes
  if limit is None or jnp.dtype(dtype).itemsize != 2 or limit >= cfg.bwd_row_bytes:
    return cfg
  if route(rows, p, dtype, cfg, backward=True)[0] != "rows":
    return cfg
  split = dataclasses.replace(cfg, bwd_row_bytes=limit)
  return split if route(rows, p, dtype, split, backward=True)[0] == "split" else cfg


def bwd_reads_live(rows: int, cols: int, dtype, cfg: Config = Config()) -> bool:
  """Whether log_softmax's backward kernel reads the ``live`` flag (and so its
  forward must write the lse), rather than take it from l
  (rows kept whole)."""
  p = plan(cols, dtype, cfg)
  if isinstance(p, str):
    return True
  cfg = log_bwd_cfg(rows, p, dtype, cfg)
  return route(rows, p, dtype, cfg, backward=True)[0] not in HELD_PATHS


def softmax_bwd_2d(y: jax.Array, g: jax.Array, live=None, *, log: bool, cfg: Config = Config()):
  """The VJP over axis 1: ``y`` is ``s`` (softmax) or ``l`` (log_softmax).

  For log_softmax, ``live`` is a ``(rows, 1)`` float32 flag, 0 on empty rows
  (ignored, and may be None, where ``bwd_reads_live`` says no).
  When both rows (``y`` and ``g``) fit ``cfg.bwd_row_bytes`` they are read
  once; otherwise they stream twice (row sum, then write).
  """
  rows, cols = y.shape
  # (The backward's defaults are the same on every path.)
  cfg = _resolved(cfg, log_bwd_16bit=log and y.dtype.itemsize == 2)
  p = plan(cols, y.dtype, cfg)
  if isinstance(p, str):
    return _ragged_bwd(y, g, live, log, cfg)
  dtype = y.dtype
  if log:
    cfg = log_bwd_cfg(rows, p, dtype, cfg)
  kind, size = route(rows, p, dtype, cfg, backward=True)
  if kind == "registers":
    return _ragged_bwd(y, g, live, log, cfg, vec=_per16(dtype), from_l=log)
  name = _name(log, True, kind)
  S = cfg.stages
  fits = kind == "rows"
  lay = _strided((p.kb, p.w), dtype)
  args = [y.reshape(rows, p.n1, p.w), g.reshape(rows, p.n1, p.w)]
  # log_softmax: the live flag read from an input, or taken from l in SMEM.
  from_l = log and kind in HELD_PATHS
  reads_live = log and not from_l
  if reads_live:
    args.append(jnp.broadcast_to(live.astype(F32), (rows, WARPGROUP)))
  out_type = jax.ShapeDtypeStruct(args[0].shape, dtype)

  load = partial(_load_f32, layout=lay, interpret=cfg.interpret)
  acc_of = _Acc.of(cfg, p.nc, (p.kb, p.w), lay)
  fold = partial(acc_of.bwd_fold, log=log)

  def chunk_sum(a, j, yc, gc):  # folds in chunk j, skipping what it shares with chunk j - 1
    fresh = partial(_skip_shared, p, j, fill=0.0, layout=lay, interpret=cfg.interpret)
    return fold(a, yc if log else fresh(yc), fresh(gc))

  grad = partial(_bwd_grad, log=log)

  def live_of(ybuf):
    """A whole row's live flag from l in SMEM: 0 if every entry is -inf, else 1
    (NaN too). (An overlapping last chunk counts its shared part twice: a max.)"""

    def fold(j, flag):
      return jnp.maximum(flag, jnp.max(_live_mark(load(_chunk(p, ybuf, j)))))

    return jax.lax.fori_loop(0, p.nc, fold, jnp.zeros((), F32))

  # log_softmax, rows kept whole: the live flag gathered during the row sum.
  flag_in_sum = from_l and cfg.live_in_rowsum

  def whole_row_grad(ybuf, gbuf, get_flag):
    """dx of a whole (n1, w) row in SMEM, written in place of g; ``get_flag()``
    (log_softmax) reads the row's live flag, once the row sum is taken (unless
    ``flag_in_sum``: then the sum's loop gathers it)."""
    chunk = partial(_chunk, p)  # chunk(ref, j)

    def rowsum(j, a):
      yc, gc = load(chunk(ybuf, j)), load(chunk(gbuf, j))
      if not flag_in_sum:
        return chunk_sum(a, j, yc, gc)
      # (An overlapping last chunk counts its shared part twice: a max.)
      return chunk_sum(a[0], j, yc, gc), jnp.maximum(a[1], _live_mark(yc))

    init = acc_of.bwd_init()
    if flag_in_sum:
      init = (init, _full((p.kb, p.w), 0.0, lay, cfg.interpret))
    plain = p.nc - (p.ov > 0)  # an overlapping last chunk is masked, after the loop
    acc = jax.lax.fori_loop(0, plain, rowsum, init)
    acc = rowsum(p.nc - 1, acc) if p.ov else acc
    if flag_in_sum:
      acc, flag = acc_of.bwd_done(acc[0]), jnp.max(acc[1])
    else:
      acc, flag = acc_of.bwd_done(acc), get_flag()

    def write(j, c):
      dx = grad(load(chunk(ybuf, j)), load(chunk(gbuf, j)), acc, flag)
      chunk(gbuf, j)[...] = dx.astype(dtype)  # in place of g
      return c

    def last_dx(g_ref):
      return grad(load(chunk(ybuf, p.nc - 1)), load(g_ref), acc, flag).astype(dtype)

    _in_place(p, write, partial(chunk, gbuf), last_dx)

  if kind == "split":

    def fold_part(acc, chunks, j):
      return (chunk_sum(acc[0], j, *chunks),)

    def emit(chunks, acc, flag):
      return grad(*chunks, acc[0], flag)

    init, done = lambda: (acc_of.bwd_init(),), lambda a: (acc_of.bwd_done(a[0]),)
    stats = _Stats(init, fold_part, done, _add_sums, count=1)  # the row sum
    live2 = args[2] if log else None
    (dx,) = _split_rows(
      name, args[:2], p, cfg, size, load, stats, emit, ctas=cfg.bwd_split_ctas, live=live2
    )
    return dx.reshape(rows, cols)

  # Streamed: ``size`` CTAs a row, each streaming one part of its chunks (``_parts``).
  held, cluster_part = _parts(p, size, cfg)

  def body(num_ctas, *refs):
    if reads_live:
      y_gmem, g_gmem, live_gmem, o_gmem, live_smem, ybuf, gbuf, *rest = refs
    else:
      y_gmem, g_gmem, o_gmem, ybuf, gbuf, *rest = refs
    part_of = cluster_part()

    def one_row(row):
      # log_softmax: the row's live flag loads on a barrier of its own (the last)
      # while the rows load and are summed, and is waited for only before the
      # write, rather than ahead of everything (a memory latency per row).
      get_flag = lambda: None  # noqa: E731
      if from_l:
        get_flag = lambda: live_of(ybuf)  # noqa: E731
      elif log:  # (streamed rows: rows kept whole take it from l)
        flag_bar = rest[-1].at[2 * S]
        plgpu.copy_gmem_to_smem(live_gmem.at[row], live_smem, flag_bar)

        def get_flag():
          plgpu.barrier_wait(flag_bar)
          return jnp.max(live_smem[...])

      if fits:
        (bar,) = rest
        plgpu.copy_gmem_to_smem(y_gmem.at[row], ybuf, bar.at[0])
        plgpu.copy_gmem_to_smem(g_gmem.at[row], gbuf, bar.at[1])
        plgpu.barrier_wait(bar.at[0])
        plgpu.barrier_wait(bar.at[1])
        whole_row_grad(ybuf, gbuf, get_flag)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(gbuf, o_gmem.at[row])
      else:
        outs, *xch, bars = rest
        xch = xch[0] if xch else None  # the swap's SMEM rows (``_xch_scratch``), if clustered
        both = [(y_gmem, ybuf), (g_gmem, gbuf)]
        # log_softmax's row sum is sum(g): that pass streams g alone, not l too.
        summed = both[1:] if log else both

        def add_chunk(j, slot, a):
          yc = None if log else load(ybuf.at[slot])
          return chunk_sum(a, j, yc, load(gbuf.at[slot]))

        def part_sum(i):
          init = acc_of.bwd_init()
          acc = _stream(row, p, S, summed, bars, add_chunk, init, part=part_of(i))
          return (acc_of.bwd_done(acc),)

        (acc,) = _combine([part_sum(i) for i in range(held)], size, xch, _add_sums)
        flag = get_flag()

        def write(j, slot, c):
          plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # outs[j % 2] is free
          dx = grad(load(ybuf.at[slot]), load(gbuf.at[slot]), acc, flag)
          outs.at[j % 2][...] = dx.astype(dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(outs.at[j % 2], o_gmem.at[row, pl.ds(_start(p, j), p.kb)])
          return c

        rev = cfg.reverse_write  # (parts last to first too: the chunks alternate outs)
        for i in reversed(range(held)) if rev else range(held):
          _stream(row, p, S, both, bars, write, 0, reverse=rev, part=part_of(i))
      _drain()  # before the buffers are reused for the next row

    _cluster_rows(size, held, lambda: _row_loop(rows, num_ctas, one_row))

  scratch = [plgpu.SMEM((WARPGROUP,), F32)] if reads_live else []
  flag_bars = 1 if reads_live else 0
  if fits:
    scratch += [plgpu.SMEM((p.n1, p.w), dtype)] * 2 + [plgpu.Barrier(num_barriers=2)]
  else:
    scratch += [plgpu.SMEM((S, p.kb, p.w), dtype)] * 2 + [plgpu.SMEM((2, p.kb, p.w), dtype)]
    scratch += [_xch_scratch(1)] if size > 1 else []
    scratch += [plgpu.Barrier(num_barriers=2 * S + flag_bars)]
  dx = _kernel(name, rows, cfg, out_type, scratch, body, cluster=size)(*args)
  return dx.reshape(rows, cols)


# ------------------------------------------------------------------------ ragged rows

RAGGED_CHUNK = 2048  # elements a chunk, in registers: 16 a thread
# Ragged rows of at most this many chunks stay in registers (16 float32 values a
# thread each; the backward holds two arrays) from the first pass to the second,
# so that they are read once.
RAGGED_HELD_CHUNKS = 4


def _ragged_plan(cols: int, vec: int = 1) -> Plan:
  """A ragged row as a ``Plan`` of single elements (``w = 1``): chunks of ``kb``
  elements (a multiple of WARPGROUP * ``vec``, at most the row), ``Plan.nc`` of
  them, the last one the row's last ``kb`` (``_start``), sharing ``Plan.ov``
  with the one before it (``_skip_shared``). Each thread loads ``vec``
  consecutive elements at a time (``vec`` 1: any alignment)."""
  unit = WARPGROUP * vec
  if cols < unit:
    reason = unsupported_reason(1, cols, None) if vec == 1 else None
    raise ValueError(reason or f"the row length {cols} is shorter than a chunk of {unit} elements")
  return Plan(n1=cols, w=1, kb=min(RAGGED_CHUNK, cols // unit * unit), fits=False)


def register_chunks(cols: int, dtype, cfg: Config, arrays: int = 1) -> int:
  """The chunks of a row of ``cols`` elements that the "registers" path holds
  (``Config.register_elems``; ``arrays`` 2 for the backward's pair of rows), or
  0 where it does not take the row: longer than the budget, or than
  RAGGED_HELD_CHUNKS chunks, or shorter than a chunk of 16-byte vectors."""
  vec = _per16(dtype)
  if arrays * cols > cfg.register_elems or cols % vec or cols < WARPGROUP * vec:
    return 0
  nc = _ragged_plan(cols, vec).nc
  return nc if arrays * nc <= RAGGED_HELD_CHUNKS else 0


def _ragged(name: str, arrays, out_type, cfg: Config, body):
  """``body(row, *refs)`` for each row, every ref in HBM: no SMEM, no TMA."""
  rows = arrays[0].shape[0]

  def kernel(num_ctas, *refs):
    _row_loop(rows, num_ctas, lambda row: body(row, *refs))

  return _kernel(name, rows, cfg, out_type, [], kernel)(*arrays)


def _ragged_chunks(cols: int, cfg: Config, vec: int = 1):
  """``(nc, ov, chunk, load, skip_shared, acc)`` for rows of ``cols`` elements:
  ``chunk(ref, row, j)`` is chunk j of a row in HBM; ``load`` reads it in float32,
  ``vec`` elements a thread at a time (1: any alignment; the "registers" path,
  16 bytes); ``skip_shared(v, fill)`` sets the last chunk's first ``ov``
  elements (counted in the one before) to ``fill``; ``acc`` the row statistics'
  ``_Acc``."""
  p = _ragged_plan(cols, vec)
  lay = plgpu.Layout.WG_STRIDED((p.kb,), vec_size=vec)

  def chunk(ref, row, j):
    return ref.at[row, pl.ds(_start(p, j), p.kb)]

  def skip_shared(v, fill):
    return _skip_shared(p, p.nc - 1, v, fill, lay, cfg.interpret)

  load = partial(_load_f32, layout=lay, interpret=cfg.interpret)
  return p.nc, p.ov, chunk, load, skip_shared, _Acc.of(cfg, p.nc, (p.kb,), lay)


def _write_order(j, nc: int, cfg: Config):
  """The chunk that step ``j`` of a ragged row's second pass writes: the last
  first (``Config.reverse_write``), those the first pass read last."""
  return nc - 1 - j if cfg.reverse_write else j


def _ragged_row_stats(get, nc: int, ov: int, skip_shared, acc: _Acc):
  """The max and normaliser of a ragged row from its ``nc`` float32 chunks
  ``get(j)``, read in turn; the last chunk's first ``ov`` elements are the one
  before's."""
  md = jax.lax.fori_loop(0, nc - (ov > 0), lambda j, md: acc.fwd_fold(md, get(j)), acc.fwd_init())
  if ov:
    md = acc.fwd_fold(md, skip_shared(get(nc - 1), -jnp.inf))
  return acc.fwd_done(md)


def _held_fwd(vs, ov: int, skip_shared, log: bool):
  """The outputs of a row held in registers as float32 chunks ``vs`` (the last
  one's first ``ov`` elements the one before's), and its max and normaliser:
  the max in one warpgroup reduction, then the normaliser with it in one more,
  no rescaling; softmax reuses the exps. (A NaN makes the max NaN, a +inf the
  normaliser NaN: the row's output NaN, as in ``_online_stats``.)"""
  m = jnp.max(functools.reduce(jnp.maximum, vs))  # (a shared element twice: a max)
  shift = _safe_shift(m)  # 0 for an empty row: its exps are 0, d 0
  es = [jnp.exp(v - shift) for v in vs]
  counted = es[:-1] + [skip_shared(es[-1], 0.0) if ov else es[-1]]
  d = jnp.sum(functools.reduce(jnp.add, counted))
  if log:
    outs = [(v - shift) - jnp.where(d == 0, 0.0, jnp.log(d)) for v in vs]
  else:
    r = 1.0 / jnp.where(d == 0, 1.0, d)
    outs = [e * r for e in es]
  return outs, (m, d)


def _held_bwd(ys, gs, ov: int, skip_shared, flag, log: bool):
  """dx of a pair of rows held in registers as float32 chunks (``ys``: s or l;
  the last chunk's first ``ov`` elements the one before's): the row sum in one
  warpgroup reduction. ``flag`` (log_softmax) is the row's live flag, or None to
  take it from l (0 if every entry is -inf) in one more."""
  terms = [_bwd_term(y, g, log=log) for y, g in zip(ys, gs, strict=True)]
  if ov:
    terms[-1] = skip_shared(terms[-1], 0.0)
  acc = jnp.sum(functools.reduce(jnp.add, terms))
  if log and flag is None:
    flag = jnp.max(functools.reduce(jnp.maximum, [_live_mark(y) for y in ys]))
  return [_bwd_grad(y, g, acc, flag, log=log) for y, g in zip(ys, gs, strict=True)]


def _ragged_fwd(x: jax.Array, log: bool, stat: bool, cfg: Config, vec: int = 1):
  """``softmax_fwd_2d`` for ragged rows: each row read twice (once if it is held,
  ``RAGGED_HELD_CHUNKS``, or bulk copied, ``Config.ragged_bulk_bytes``), written
  once; the lse too if ``stat``. With ``vec`` > 1, the "registers" path
  (``Config.register_elems``): rows of a multiple of 16 bytes, held."""
  rows, cols = x.shape
  if vec == 1 and (n := ragged_fwd_bulk(rows, cols, x.dtype, cfg)):
    return _ragged_bulk_fwd(x, n, log, stat, cfg)
  nc, ov, chunk, load, skip_shared, acc = _ragged_chunks(cols, cfg, vec)
  held = nc <= RAGGED_HELD_CHUNKS  # held in registers: the row is read once
  assert held or vec == 1, (cols, nc)
  out_type = (jax.ShapeDtypeStruct(x.shape, x.dtype),)
  if stat:
    out_type += (jax.ShapeDtypeStruct((rows, WARPGROUP), F32),)

  def body(row, x_gmem, o_gmem, *lse):
    get = lambda j: load(chunk(x_gmem, row, j))  # noqa: E731
    if held:
      outs, md = _held_fwd([get(j) for j in range(nc)], ov, skip_shared, log)
      for j, out in enumerate(outs):
        chunk(o_gmem, row, j)[...] = out.astype(x.dtype)  # (the shared part twice, alike)
    else:
      md = _ragged_row_stats(get, nc, ov, skip_shared, acc)

      def write(j, c):
        j = _write_order(j, nc, cfg)
        chunk(o_gmem, row, j)[...] = _fwd_out(get(j), *md, log).astype(x.dtype)
        return c

      jax.lax.fori_loop(0, nc, write, 0)
    if stat:
      lse[0].at[row][...] = jnp.broadcast_to(_lse(*md), (WARPGROUP,))

  name = _name(log, False, "ragged" if vec == 1 else "registers")
  out = _ragged(name, [x], out_type, cfg, body)
  return out[0], out[1][:, :1] if stat else None


def _bulk_interior(cols: int, dtype, cfg: Config, arrays: int = 1) -> int:
  """The elements of a ragged row's interior that ``_ragged_bulk_fwd`` (``arrays``
  1) or ``_ragged_bulk_bwd`` (2: l or s, and g) bulk copies
  (``Config.ragged_bulk_bytes``, for all of them; 0 where it does not): a
  multiple of WARPGROUP bytes (what Mosaic GPU's copies take) within the row
  from its first 16-byte aligned element, whatever that is. At least 2 chunks
  of WARPGROUP elements."""
  size = jnp.dtype(dtype).itemsize
  unit = WARPGROUP // size
  n = (cols - (_per16(dtype) - 1)) // unit * unit
  if n < 2 * WARPGROUP or arrays * n * size > cfg.ragged_bulk_bytes:
    return 0
  return n


class _Bulk(NamedTuple):
  """How ``_ragged_bulk_fwd`` and ``_ragged_bulk_bwd`` see rows of ``cols``
  elements: the interior (``_bulk_interior``) as a ``Plan`` of chunks of ``kb``
  elements in SMEM (``w = 1``) and their layout, and the windows' layout (the
  row's first and last WARPGROUP elements, loaded directly, one a thread)."""

  cols: int
  p: Plan
  lay: object
  win: object
  interpret: bool

  @classmethod
  def of(cls, cols: int, n: int, dtype, cfg: Config) -> _Bulk:
    kb = min(max(WARPGROUP, cfg.chunk_elems // WARPGROUP * WARPGROUP), n // WARPGROUP * WARPGROUP)
    win = plgpu.Layout.WG_STRIDED((WARPGROUP,), vec_size=1)
    return cls(cols, Plan(n1=n, w=1, kb=kb, fits=True), _strided((kb,), dtype), win, cfg.interpret)

  def spans(self, row, dtype):
    """Row ``row``'s interior, head window and tail window in the flat array
    (row r starts at ``r * cols``), and which elements of each window are the
    row's own (the lead before the interior, the tail after it)."""
    base = row * self.cols
    lead = _bulk_lead(base, dtype)
    n = self.p.n1
    head, tail = pl.ds(base, WARPGROUP), pl.ds(base + self.cols - WARPGROUP, WARPGROUP)
    i = _iota((WARPGROUP,), self.win, self.interpret)
    return pl.ds(base + lead, n), (head, i < lead), (tail, i >= lead + n - (self.cols - WARPGROUP))

  def load(self, ref):
    return _load_f32(ref, self.lay, self.interpret)

  def load_win(self, ref):
    return _load_f32(ref, self.win, self.interpret)

  def chunk(self, ref, j):
    return _chunk(self.p, ref, j)

  def fresh(self, j, v, fill):
    """Chunk j for a row statistic: its part shared with chunk j - 1 ``fill``."""
    return _skip_shared(self.p, j, v, fill, self.lay, self.interpret)

  def fold(self, f, init, reverse: bool = False):
    """``f(carry, j)`` over the interior's chunks, first to last (an overlapping
    last one after the loop), or if ``reverse`` last to first (it first)."""
    p = self.p
    plain = p.nc - (p.ov > 0)
    if not reverse:
      a = jax.lax.fori_loop(0, plain, lambda j, a: f(a, j), init)
      return f(a, p.nc - 1) if p.ov else a
    a = f(init, p.nc - 1) if p.ov else init
    return jax.lax.fori_loop(0, plain, lambda j, a: f(a, plain - 1 - j), a)


def _bulk_lead(base, dtype):
  """Elements from flat index ``base`` to the first 16-byte aligned one (the
  array's start is aligned): 0 to ``_per16(dtype) - 1``."""
  per16 = _per16(dtype)
  return (per16 - base % per16) % per16


# What a contiguous copy past 256 elements needs to be one bulk copy (jax 0.10
# and 0.11): the promise that it stays in bounds.
_OOB = getattr(plgpu, "OOBFillMode", None)
_IN_BOUNDS = {} if _OOB is None else {"oob_mode": _OOB.PROMISE_IN_BOUNDS}


def _ragged_bulk_fwd(x: jax.Array, n: int, log: bool, stat: bool, cfg: Config):
  """``softmax_fwd_2d`` for ragged rows that fit ``Config.ragged_bulk_bytes``:
  each row read once and written once. Its interior (``_bulk_interior``: ``n``
  elements from the first 16-byte aligned one) moves between HBM and SMEM by
  one bulk copy each way, which needs no 16-byte row pitch, only 16-byte aligned
  ends. The row's first and last WARPGROUP elements are loaded directly, one a
  thread (the lead, under 16 bytes, and the tail, under 16 + WARPGROUP bytes,
  are what they add; the rest of each window is the interior again, masked out
  of the statistics and written with the same values)."""
  rows, cols = x.shape
  dtype = x.dtype
  bk = _Bulk.of(cols, n, dtype, cfg)
  acc = _Acc.of(cfg, bk.p.nc, (bk.p.kb,), bk.lay)
  out_type = (jax.ShapeDtypeStruct((rows * cols,), dtype),)
  if stat:
    out_type += (jax.ShapeDtypeStruct((rows, WARPGROUP), F32),)

  def body(num_ctas, x_gmem, o_gmem, *refs):
    *lse_gmem, buf, bar = refs

    def one_row(row):
      interior, *windows = bk.spans(row, dtype)
      # (In bounds: a bulk copy, not a tensor map's boxes of at most 256.)
      plgpu.copy_gmem_to_smem(x_gmem.at[interior], buf, bar.at[0], **_IN_BOUNDS)
      # The windows, while the copy runs.
      vs = [bk.load_win(x_gmem.at[at]) for at, _ in windows]
      mds = [
        _online_stats(-jnp.inf, jnp.float32(0.0), jnp.where(own, v, -jnp.inf))
        for v, (_, own) in zip(vs, windows, strict=True)
      ]
      plgpu.barrier_wait(bar.at[0])
      chunk = lambda a, j: acc.fwd_fold(a, bk.fresh(j, bk.load(bk.chunk(buf, j)), -jnp.inf))  # noqa: E731
      m, d = _merge_stats(
        _merge_stats(acc.fwd_done(bk.fold(chunk, acc.fwd_init())), mds[0]), mds[1]
      )
      out = lambda v: _fwd_out(v, m, d, log).astype(dtype)  # noqa: E731

      def write(j, c):
        ref = bk.chunk(buf, j)
        ref[...] = out(bk.load(ref))
        return c

      _in_place(bk.p, write, partial(bk.chunk, buf), lambda ref: out(bk.load(ref)))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(buf, o_gmem.at[interior])
      for v, (at, _) in zip(vs, windows, strict=True):  # (their interior part again, alike)
        o_gmem.at[at][...] = out(v)
      if stat:
        lse_gmem[0].at[row][...] = jnp.broadcast_to(_lse(m, d), (WARPGROUP,))
      _drain()

    _row_loop(rows, num_ctas, one_row)

  scratch = [plgpu.SMEM((bk.p.n1,), dtype), plgpu.Barrier(num_barriers=1)]
  name = _name(log, False, "ragged_bulk")
  res = _kernel(name, rows, cfg, out_type, scratch, body)(x.reshape(rows * cols))
  return res[0].reshape(rows, cols), res[1][:, :1] if stat else None


# The bulk copies address the array flattened, a row's start as ``row * cols``
# in int32: arrays of more elements read their rows directly (2-D refs).
BULK_MAX_ELEMS = 2**31 - 1


def ragged_fwd_bulk(rows: int, cols: int, dtype, cfg: Config) -> int:
  """How many elements of a ragged row of ``cols`` the forward bulk copies
  (``_bulk_interior``); 0 where it reads the row directly: past
  ``Config.ragged_bulk_bytes``, too short an interior, an array past
  BULK_MAX_ELEMS elements, or a row of at most
  RAGGED_HELD_CHUNKS chunks, held in registers and so read once anyway (at 4096
  x 4097 on an H200 the held rows took 0.70x the bulk copies' time in bfloat16,
  0.92x in float32, and log_softmax's 0.92x and 1.00x: T1949Z)."""
  if rows * cols > BULK_MAX_ELEMS:
    return 0
  if cols >= WARPGROUP and _ragged_plan(cols).nc <= RAGGED_HELD_CHUNKS:
    return 0
  return _bulk_interior(cols, dtype, cfg)


def ragged_bwd_bulk(rows: int, cols: int, dtype, cfg: Config) -> tuple[int, bool]:
  """How ``_ragged_bwd`` bulk copies ragged rows of ``cols`` elements: ``(n,
  hold_g)``, the interior's elements (``_bulk_interior``) and whether g's moves
  too (the pair fits ``Config.ragged_bulk_bytes``) or is read twice directly
  (``Config.ragged_bulk_g_twice``); ``(0, False)`` where it does not, or where
  the pair is held in registers (``2 * nc <= RAGGED_HELD_CHUNKS``, untimed
  against bulk copies; at 4096 x 4097, past that, the bulk copies took 0.79x the
  time of two direct reads in bfloat16, 0.98x in float32, log_softmax's 0.92x
  and 0.88x: T1949Z)."""
  if rows * cols > BULK_MAX_ELEMS:
    return 0, False
  if cols >= WARPGROUP and 2 * _ragged_plan(cols).nc <= RAGGED_HELD_CHUNKS:
    return 0, False
  if n := _bulk_interior(cols, dtype, cfg, arrays=2):
    return n, True
  if cfg.ragged_bulk_g_twice and (n := _bulk_interior(cols, dtype, cfg)):
    return n, False
  return 0, False


def _ragged_bulk_bwd(
  y: jax.Array, g: jax.Array, live, n: int, log: bool, cfg: Config, hold_g: bool = True
):
  """``softmax_bwd_2d`` for ragged rows whose pair (``y`` and ``g``) fits
  ``Config.ragged_bulk_bytes``: each row of both read once, dx written once, as
  ``_ragged_bulk_fwd`` moves them (the interiors' ``n`` elements; dx in place of
  g in SMEM). Without ``hold_g`` (``Config.ragged_bulk_g_twice``: y's row
  alone fits) only y's interior moves into SMEM, and g's is read twice from
  HBM: for the row sum, last chunk first, then for the write, first chunk
  first; dx in place of y. Those reads wait for each chunk in turn, and the
  rows (past the SMEM of two CTAs) take one CTA an SM: the chunks are twice
  ``chunk_elems``, 32 KiB of float32 in flight an SM."""
  rows, cols = y.shape
  dtype = y.dtype
  if not hold_g:
    cfg = dataclasses.replace(cfg, chunk_elems=2 * cfg.chunk_elems)
  bk = _Bulk.of(cols, n, dtype, cfg)
  p = bk.p
  acc_of = _Acc.of(cfg, p.nc, (p.kb,), bk.lay)
  args = [y.reshape(rows * cols), g.reshape(rows * cols)]
  if log:
    args.append(jnp.broadcast_to(live.astype(F32), (rows, WARPGROUP)))
  grad = partial(_bwd_grad, log=log)

  def body(num_ctas, y_gmem, g_gmem, *refs):
    if not hold_g:
      refs = (*refs[:-1], None, refs[-1])  # (no SMEM row for g)
    *live_gmem, o_gmem, ybuf, gbuf, bars = refs

    def one_row(row):
      interior, *windows = bk.spans(row, dtype)
      held = ((y_gmem, ybuf), (g_gmem, gbuf)) if hold_g else ((y_gmem, ybuf),)
      for k, (gmem, buf) in enumerate(held):
        plgpu.copy_gmem_to_smem(gmem.at[interior], buf, bars.at[k], **_IN_BOUNDS)
      # g's interior: in SMEM, or in HBM (its chunks 16-byte aligned, as the copy's).
      gsrc = gbuf if hold_g else g_gmem.at[interior]
      vs = [(bk.load_win(y_gmem.at[at]), bk.load_win(g_gmem.at[at])) for at, _ in windows]
      outside = sum(
        jnp.sum(jnp.where(own, _bwd_term(yv, gv, log=log), 0.0))
        for (yv, gv), (_, own) in zip(vs, windows, strict=True)
      )
      flag = None
      if log:
        flag = jnp.max(bk.load_win(live_gmem[0].at[row]))  # (a row of WARPGROUP)
      for k in range(len(held)):
        plgpu.barrier_wait(bars.at[k])

      def chunk_sum(a, j):
        yc, gc = (bk.fresh(j, bk.load(bk.chunk(b, j)), 0.0) for b in (ybuf, gsrc))
        return acc_of.bwd_fold(a, yc, gc, log=log)

      # g read twice: last chunk first, so that the write starts with what this read last.
      acc = bk.fold(chunk_sum, acc_of.bwd_init(), reverse=not hold_g)
      acc = acc_of.bwd_done(acc) + outside
      out_buf = gbuf if hold_g else ybuf  # dx in place of g, or of y

      def dx_of(j):
        yc, gc = (bk.load(bk.chunk(b, j)) for b in (ybuf, gsrc))
        return grad(yc, gc, acc, flag).astype(dtype)

      def write(j, c):
        bk.chunk(out_buf, j)[...] = dx_of(j)
        return c

      _in_place(p, write, partial(bk.chunk, out_buf), lambda ref: dx_of(p.nc - 1))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_buf, o_gmem.at[interior])
      for (yv, gv), (at, _) in zip(vs, windows, strict=True):  # (their interior part again)
        o_gmem.at[at][...] = grad(yv, gv, acc, flag).astype(dtype)
      _drain()

    _row_loop(rows, num_ctas, one_row)

  rows_held = 2 if hold_g else 1  # SMEM rows, each with its barrier
  scratch = [plgpu.SMEM((p.n1,), dtype)] * rows_held + [plgpu.Barrier(num_barriers=rows_held)]
  out_type = jax.ShapeDtypeStruct((rows * cols,), dtype)
  name = _name(log, True, "ragged_bulk" if hold_g else "ragged_bulk_g_twice")
  dx = _kernel(name, rows, cfg, out_type, scratch, body)(*args)
  return dx.reshape(rows, cols)


def _ragged_stats(x: jax.Array, cfg: Config):
  """``row_stats_2d`` for ragged rows: each row read once, into registers."""
  rows, cols = x.shape
  nc, ov, chunk, load, skip_shared, acc = _ragged_chunks(cols, cfg)

  def body(row, x_gmem, m_gmem, d_gmem):
    get = lambda j: load(chunk(x_gmem, row, j))  # noqa: E731
    md = _ragged_row_stats(get, nc, ov, skip_shared, acc)
    for v, gmem in zip(md, (m_gmem, d_gmem), strict=True):
      gmem.at[row][...] = jnp.broadcast_to(v, (WARPGROUP,))

  out_type = (jax.ShapeDtypeStruct((rows, WARPGROUP), F32),) * 2
  m, d = _ragged(stats_kernel_name("ragged"), [x], out_type, cfg, body)
  return m[:, :1], d[:, :1]


def _ragged_bwd(
  y: jax.Array, g: jax.Array, live, log: bool, cfg: Config, vec: int = 1, from_l: bool = False
):
  """``softmax_bwd_2d`` for ragged rows: ``y`` and ``g`` read twice (once if held,
  or bulk copied, ``Config.ragged_bulk_bytes``), ``dx`` written once. With
  ``vec`` > 1, the "registers" path (rows of a multiple of 16 bytes, held);
  ``from_l``: log_softmax's live flag taken from l (held rows only), not ``live``."""
  rows, cols = y.shape
  n, hold_g = ragged_bwd_bulk(rows, cols, y.dtype, cfg) if vec == 1 else (0, False)
  if n:
    return _ragged_bulk_bwd(y, g, live, n, log, cfg, hold_g)
  nc, ov, chunk, load, skip_shared, acc_of = _ragged_chunks(cols, cfg, vec)
  held = 2 * nc <= RAGGED_HELD_CHUNKS  # held in registers: y and g are read once
  assert held or (vec == 1 and not from_l), (cols, nc)
  args = [y, g]
  reads_live = log and not from_l
  if reads_live:
    args.append(jnp.broadcast_to(live.astype(F32), (rows, WARPGROUP)))
  flag_layout = plgpu.Layout.WG_STRIDED((WARPGROUP,), vec_size=1)

  def body(row, y_gmem, g_gmem, *refs):
    *live_gmem, o_gmem = refs

    def chunks(j):
      return load(chunk(y_gmem, row, j)), load(chunk(g_gmem, row, j))

    flag = None
    if reads_live:
      flag = jnp.max(_load_f32(live_gmem[0].at[row], flag_layout, cfg.interpret))
    if held:
      ys, gs = zip(*[chunks(j) for j in range(nc)], strict=True)
      for j, dx in enumerate(_held_bwd(ys, gs, ov, skip_shared, flag, log)):
        chunk(o_gmem, row, j)[...] = dx.astype(y.dtype)  # (the shared part twice, alike)
      return

    # log_softmax's row sum is sum(g): that pass reads no l.
    summed = (lambda j: (None, load(chunk(g_gmem, row, j)))) if log else chunks
    fold = partial(acc_of.bwd_fold, log=log)
    acc = jax.lax.fori_loop(0, nc - (ov > 0), lambda j, a: fold(a, *summed(j)), acc_of.bwd_init())
    if ov:
      acc = fold(acc, *(v if v is None else skip_shared(v, 0.0) for v in summed(nc - 1)))
    acc = acc_of.bwd_done(acc)

    def write(j, c):
      j = _write_order(j, nc, cfg)
      dx = _bwd_grad(*chunks(j), acc, flag, log=log)
      chunk(o_gmem, row, j)[...] = dx.astype(y.dtype)  # (the shared part twice, alike)
      return c

    jax.lax.fori_loop(0, nc, write, 0)

  name = _name(log, True, "ragged" if vec == 1 else "registers")
  return _ragged(name, args, jax.ShapeDtypeStruct(y.shape, y.dtype), cfg, body)
