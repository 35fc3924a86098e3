"""Mosaic TPU kernels (``pl.pallas_call`` with a grid and BlockSpecs) on 2-D arrays.

Every kernel works on ``(rows, cols)`` and reduces over ``cols``; the adapter in
``ops.py`` moves the softmax axes last and applies ``where`` around the call.

Two shapes of grid:

* **row fits** (``cols <= max_row_cols``): grid ``(row_blocks,)``, each block
  holds whole rows; one read, one write.
* **online** (longer rows): grid ``(row_blocks, 2, col_blocks)``. Phase 0 walks
  the column blocks and keeps running statistics in VMEM scratch (for the
  forward a running max and normaliser, rescaled as in Milakov & Gimelshein
  2018); phase 1 walks them again and writes. In phase 0 the output's block
  index stays at column block 0, so nothing is written back to HBM until phase
  1 has filled it.

The losses' kernel, ``row_stats_2d``, has grid ``(row_blocks, col_blocks)``
(one column block for a row that fits) and keeps the running statistics in its
output block, which stays in VMEM along the column blocks.

Statistics are float32 whatever the input dtype. A ragged last column block is
masked in the kernel (its out-of-bounds lanes hold garbage on hardware).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import kernel_name, stats_kernel_name

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """Block sizes; ``interpret`` runs the kernels on the CPU (tests): True for
  Pallas's plain interpreter, or a ``pltpu.InterpretParams`` for its TPU
  interpreter, which also models HBM and VMEM and a chip's cores."""

  max_row_cols: int = 16384  # longest row kept whole in one block
  block_cols: int = 4096  # column block of the online kernels (multiple of 128)
  block_bytes: int = 1 << 20  # float32 bytes of one (rows, cols) block in VMEM
  interpret: bool | pltpu.InterpretParams = False


def _row_block(rows: int, cols: int, cfg: Config) -> int:
  """Rows per block: a multiple of 16 (bf16 packing), or all rows if fewer. The
  budget counts the lanes a row takes in VMEM, its columns padded to a multiple
  of 128: 513 columns take 640 (counted as 513, a block of 496 rows took 1.21
  times ``block_bytes``)."""
  if rows <= 16:
    return rows
  lanes = pl.cdiv(cols, 128) * 128
  fit = max(16, (cfg.block_bytes // (4 * lanes)) // 16 * 16)
  return min(fit, pl.cdiv(rows, 16) * 16, 512)


def _safe_shift(m):
  """The shift of a slice with no finite entry is 0, so exp(-inf - 0) = 0, not NaN."""
  return jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)


def _col_mask(shape, j, bc: int, cols: int):
  """True on lanes inside the array; None when every block is full."""
  if cols % bc == 0:
    return None
  return j * bc + jax.lax.broadcasted_iota(jnp.int32, shape, 1) < cols


def _where(mask, a, fill):
  return a if mask is None else jnp.where(mask, a, fill)


def _finish_fwd(x, m, d, log: bool):
  """Output from float32 ``x`` and the row statistics ``m`` (raw max) and ``d``."""
  shift = _safe_shift(m)
  if log:
    # (x - shift) - log d: x - shift is exact, x - (shift + log d) would round
    # shift + log d at the scale of the logits. An empty row (d == 0, shift 0)
    # subtracts 0, so that it stays all -inf.
    return (x - shift) - jnp.where(d == 0, jnp.zeros_like(d), jnp.log(d))
  return jnp.exp(x - shift) / jnp.where(d == 0, jnp.ones_like(d), d)


def _lse(m, d):
  return _safe_shift(m) + jnp.log(d)


# ----------------------------------------------------------------------------- forward


def _fwd_row_kernel(x_ref, o_ref, *lse_ref, log):
  x = x_ref[...].astype(F32)
  m = jnp.max(x, axis=1, keepdims=True)
  d = jnp.sum(jnp.exp(x - _safe_shift(m)), axis=1, keepdims=True)
  o_ref[...] = _finish_fwd(x, m, d, log).astype(o_ref.dtype)
  for ref in lse_ref:  # (if the caller wants the lse)
    ref[...] = _lse(m, d)


def _online_update(m_ref, d_ref, x):
  """Folds the float32 block ``x`` into the running max and normaliser in ``m_ref``
  and ``d_ref`` (Milakov & Gimelshein 2018)."""
  m_old = m_ref[...]
  m_new = jnp.maximum(m_old, jnp.max(x, axis=1, keepdims=True))  # NaN propagates
  shift = _safe_shift(m_new)
  # d is 0 while m_old is -inf: rescale by 0 rather than exp(-inf - -inf).
  alpha = jnp.where(m_old == -jnp.inf, jnp.zeros_like(m_old), jnp.exp(m_old - shift))
  d_ref[...] = d_ref[...] * alpha + jnp.sum(jnp.exp(x - shift), axis=1, keepdims=True)
  m_ref[...] = m_new


def _fwd_online_kernel(x_ref, o_ref, *refs, log, bc, cols):
  *lse_ref, m_sc, d_sc = refs
  p, j = pl.program_id(1), pl.program_id(2)
  x = x_ref[...].astype(F32)
  x = _where(_col_mask(x.shape, j, bc, cols), x, -jnp.inf)

  @pl.when((p == 0) & (j == 0))
  def _():
    m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
    d_sc[...] = jnp.zeros_like(d_sc)

  pl.when(p == 0)(lambda: _online_update(m_sc, d_sc, x))

  @pl.when(p == 1)
  def _():
    m, d = m_sc[...], d_sc[...]
    o_ref[...] = _finish_fwd(x, m, d, log).astype(o_ref.dtype)
    for ref in lse_ref:
      ref[...] = _lse(m, d)


def softmax_fwd_2d(x: jax.Array, *, log: bool, cfg: Config = Config(), lse: bool | None = None):
  """``(softmax or log_softmax of x over axis 1, lse as (rows, 1) float32)``.

  ``lse`` is -inf exactly for an empty row (every entry -inf) and NaN for a row
  holding NaN or +inf. The ``lse`` argument says whether to write it (default:
  for log_softmax); otherwise the second result is None.
  """
  rows, cols = x.shape
  stat = log if lse is None else lse
  br = _row_block(rows, min(cols, cfg.block_cols if cols > cfg.max_row_cols else cols), cfg)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  out_shape += [jax.ShapeDtypeStruct((rows, 1), F32)] if stat else []
  if cols <= cfg.max_row_cols:
    out = pl.pallas_call(
      functools.partial(_fwd_row_kernel, log=log),
      grid=(pl.cdiv(rows, br),),
      in_specs=[pl.BlockSpec((br, cols), lambda i: (i, 0))],
      out_specs=[pl.BlockSpec((br, cols), lambda i: (i, 0))]
      + ([pl.BlockSpec((br, 1), lambda i: (i, 0))] if stat else []),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=cfg.interpret,
      name=kernel_name(log, False, "row"),
    )(x)
  else:
    bc = cfg.block_cols
    out = pl.pallas_call(
      functools.partial(_fwd_online_kernel, log=log, bc=bc, cols=cols),
      grid=(pl.cdiv(rows, br), 2, pl.cdiv(cols, bc)),
      in_specs=[pl.BlockSpec((br, bc), lambda i, p, j: (i, j))],
      out_specs=[pl.BlockSpec((br, bc), lambda i, p, j: (i, j * p))]
      + ([pl.BlockSpec((br, 1), lambda i, p, j: (i, 0))] if stat else []),
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((br, 1), F32), pltpu.VMEM((br, 1), F32)],
      compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary", "arbitrary")
      ),
      interpret=cfg.interpret,
      name=kernel_name(log, False, "online"),
    )(x)
  return out[0], out[1] if stat else None


# ---------------------------------------------------------------------- row statistics


def _stats_kernel(x_ref, m_ref, d_ref, *, bc, cols):
  # The outputs' block stays in VMEM along the column blocks (the last grid axis,
  # "arbitrary"): it is the running statistics, written back once.
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    d_ref[...] = jnp.zeros_like(d_ref)

  x = x_ref[...].astype(F32)
  _online_update(m_ref, d_ref, _where(_col_mask(x.shape, j, bc, cols), x, -jnp.inf))


def row_stats_2d(x: jax.Array, *, cfg: Config = Config()):
  """``(m, d)`` of each row, each ``(rows, 1)`` float32: the max (-inf for an empty
  row) and ``d = sum(exp(x - shift))``, ``shift`` the max (0 for an empty row,
  whose ``d`` is 0); NaN or +inf in a row make its ``d`` NaN. Each row is read
  once, in one block if it fits (``max_row_cols``), else in column blocks."""
  rows, cols = x.shape
  bc = cols if cols <= cfg.max_row_cols else cfg.block_cols
  br = _row_block(rows, bc, cfg)
  stat = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
  return pl.pallas_call(
    functools.partial(_stats_kernel, bc=bc, cols=cols),
    grid=(pl.cdiv(rows, br), pl.cdiv(cols, bc)),
    in_specs=[pl.BlockSpec((br, bc), lambda i, j: (i, j))],
    out_specs=[stat, stat],
    out_shape=(jax.ShapeDtypeStruct((rows, 1), F32),) * 2,
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    interpret=cfg.interpret,
    name=stats_kernel_name("row" if bc == cols else "online"),
  )(x)


# ---------------------------------------------------------------------------- backward


def _bwd_row_kernel(*refs, log):
  if log:
    # dx = g - exp(l) * sum(g), and 0 on an empty row.
    l_ref, live_ref, g_ref, o_ref = refs
    g = g_ref[...].astype(F32)
    dx = g - jnp.exp(l_ref[...].astype(F32)) * jnp.sum(g, axis=1, keepdims=True)
    dx = jnp.where(live_ref[...] != 0, dx, jnp.zeros_like(dx))
  else:
    # dx = s * (g - sum(g * s))
    s_ref, g_ref, o_ref = refs
    s, g = s_ref[...].astype(F32), g_ref[...].astype(F32)
    dx = s * (g - jnp.sum(g * s, axis=1, keepdims=True))
  o_ref[...] = dx.astype(o_ref.dtype)


def _bwd_online_kernel(*refs, log, bc, cols):
  if log:
    l_ref, live_ref, g_ref, o_ref, acc = refs
  else:
    s_ref, g_ref, o_ref, acc = refs
  p, j = pl.program_id(1), pl.program_id(2)
  g = g_ref[...].astype(F32)
  mask = _col_mask(g.shape, j, bc, cols)

  @pl.when((p == 0) & (j == 0))
  def _():
    acc[...] = jnp.zeros_like(acc)

  @pl.when(p == 0)
  def _():
    term = g if log else g * s_ref[...].astype(F32)
    acc[...] += jnp.sum(_where(mask, term, 0.0), axis=1, keepdims=True)

  @pl.when(p == 1)
  def _():
    if log:
      dx = g - jnp.exp(l_ref[...].astype(F32)) * acc[...]
      dx = jnp.where(live_ref[...] != 0, dx, jnp.zeros_like(dx))
    else:
      s = s_ref[...].astype(F32)
      dx = s * (g - acc[...])
    o_ref[...] = dx.astype(o_ref.dtype)


def bwd_reads_live(rows: int, cols: int, dtype, cfg: Config = Config()) -> bool:
  """Whether log_softmax's backward kernel reads the ``live`` flag, which the
  forward's lse gives: always, here."""
  return True


def softmax_bwd_2d(y: jax.Array, g: jax.Array, live=None, *, log: bool, cfg: Config = Config()):
  """The VJP over axis 1: ``y`` is ``s`` (softmax) or ``l`` (log_softmax).

  For log_softmax, ``live`` is a ``(rows, 1)`` float32 flag, 0 on empty rows.
  """
  rows, cols = y.shape
  row_fits = cols <= cfg.max_row_cols
  br = _row_block(rows, cols if row_fits else cfg.block_cols, cfg)
  out_shape = jax.ShapeDtypeStruct(y.shape, y.dtype)
  args = (y, live, g) if log else (y, g)
  if row_fits:
    full = pl.BlockSpec((br, cols), lambda i: (i, 0))
    stat = pl.BlockSpec((br, 1), lambda i: (i, 0))
    return pl.pallas_call(
      functools.partial(_bwd_row_kernel, log=log),
      grid=(pl.cdiv(rows, br),),
      in_specs=[full, stat, full] if log else [full, full],
      out_specs=full,
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=cfg.interpret,
      name=kernel_name(log, True, "row"),
    )(*args)
  bc = cfg.block_cols
  block = pl.BlockSpec((br, bc), lambda i, p, j: (i, j))
  # Fetched in phase 1 only: in phase 0 the index stays at column block 0.
  late = pl.BlockSpec((br, bc), lambda i, p, j: (i, j * p))
  stat = pl.BlockSpec((br, 1), lambda i, p, j: (i, 0))
  return pl.pallas_call(
    functools.partial(_bwd_online_kernel, log=log, bc=bc, cols=cols),
    grid=(pl.cdiv(rows, br), 2, pl.cdiv(cols, bc)),
    in_specs=[late, stat, block] if log else [block, block],
    out_specs=late,
    out_shape=out_shape,
    scratch_shapes=[pltpu.VMEM((br, 1), F32)],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "arbitrary", "arbitrary")
    ),
    interpret=cfg.interpret,
    name=kernel_name(log, True, "online"),
  )(*args)
