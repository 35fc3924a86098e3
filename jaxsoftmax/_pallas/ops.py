"""The Pallas backend: the functions of ``_xla.py`` on top of 2-D kernels.

The kernels (``tpu.py``, ``gpu.py``; ``row_stats_2d`` for the losses) reduce
over the last axis of a ``(rows, cols)`` array. This adapter moves the softmax
axes last and flattens them (a no-op for the usual trailing axis), applies
``where`` around the kernel exactly as the XLA path does (masked logits become
-inf before, masked outputs are zeroed after), and brings the result back to
the input's layout.

The backward functions are ``custom_vjp``s themselves: the kernel runs for the
gradient, and differentiating the gradient (reverse over reverse) falls back to
the VJP of the XLA backend's backward, which computes the same function.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from .. import _xla
from .._checks import AxisName
from .._stats import masked, per_slice

Axes = tuple[int, ...]


def _perm(ndim: int, axes: Axes) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a not in axes) + tuple(axes)


def _to_2d(x: jax.Array, axes: Axes) -> jax.Array:
  perm = _perm(x.ndim, axes)
  rows = math.prod(x.shape[a] for a in perm[: x.ndim - len(axes)])
  cols = math.prod(x.shape[a] for a in axes)
  return jnp.transpose(x, perm).reshape(rows, cols)


def _from_2d(y: jax.Array, shape: tuple[int, ...], axes: Axes) -> jax.Array:
  perm = _perm(len(shape), axes)
  y = y.reshape(tuple(shape[a] for a in perm))
  inverse = tuple(perm.index(a) for a in range(len(shape)))
  return jnp.transpose(y, inverse)


def _stat_to_2d(live: jax.Array, axes: Axes) -> jax.Array:
  """A keepdims per-slice array as ``(rows, 1)`` float32."""
  return _to_2d(live, axes).astype(jnp.float32)


def _stat_from_2d(stat: jax.Array, shape: tuple[int, ...], axes: Axes) -> jax.Array:
  kept = tuple(1 if a in axes else n for a, n in enumerate(shape))
  return _from_2d(stat, kept, axes)


def _check_axis_name(axis_name: AxisName) -> None:
  if axis_name is not None:  # _backend never routes here with an axis_name
    raise ValueError("the Pallas kernels do not support axis_name")


class Backend:
  """The backend functions: softmax and log_softmax forward and backward, and the
  losses' ``row_stats`` (hashable, so that a backend can be a static argument)."""

  def __init__(self, softmax_fwd, softmax_bwd, log_softmax_fwd, log_softmax_bwd, row_stats):
    self.softmax_fwd = softmax_fwd
    self.softmax_bwd = softmax_bwd
    self.log_softmax_fwd = log_softmax_fwd
    self.log_softmax_bwd = log_softmax_bwd
    self.row_stats = row_stats


def make(kernels, cfg) -> Backend:
  """A backend namespace running ``kernels.softmax_fwd_2d``/``softmax_bwd_2d`` (and
  ``row_stats_2d``) with ``cfg``."""
  fwd_2d = partial(kernels.softmax_fwd_2d, cfg=cfg)
  bwd_2d = partial(kernels.softmax_bwd_2d, cfg=cfg)
  stats_2d = partial(kernels.row_stats_2d, cfg=cfg)

  @partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def row_stats(x, where, axes: Axes, axis_name: AxisName):
    # (m, d) of each slice, keepdims float32: the max (-inf if empty) and sum(exp(x - m))
    _check_axis_name(axis_name)
    # A mask of one flag per slice (a loss's padding) empties the slices it drops
    # after the kernel, on their statistics, rather than in a pass over x before.
    after = per_slice(where, axes)
    m, d = stats_2d(_to_2d(x if after else masked(x, where), axes))
    m, d = _stat_from_2d(m, x.shape, axes), _stat_from_2d(d, x.shape, axes)
    if after:
      m, d = masked(m, where), masked(d, where, 0.0)
    return m, d

  # Differentiated (a loss's reverse over reverse: the statistics are residuals
  # of its custom_vjp) as the XLA backend's row_stats, which computes the same.
  def row_stats_fwd(x, where, axes, axis_name):
    return row_stats(x, where, axes, axis_name), (x, where)

  def row_stats_bwd(axes, axis_name, res, ct):
    x, where = res
    _, vjp = jax.vjp(lambda x: _xla.row_stats(x, where, axes, axis_name), x)
    return vjp(ct)[0], None

  row_stats.defvjp(row_stats_fwd, row_stats_bwd)

  def softmax_fwd(x, where, axes: Axes, axis_name: AxisName):
    _check_axis_name(axis_name)
    s, _ = fwd_2d(_to_2d(masked(x, where), axes), log=False)
    return masked(_from_2d(s, x.shape, axes), where, 0.0)

  def log_softmax_fwd(x, where, axes: Axes, axis_name: AxisName, *, for_grad=False):
    _check_axis_name(axis_name)
    x2 = _to_2d(masked(x, where), axes)
    # Only the backward reads the kernel's lse (for the live flag), and not every
    # backward kernel (``bwd_reads_live``): otherwise none is written, and `live`
    # comes from l. Under jit that is dead code when nothing reads it (a call
    # not differentiated, or a backward kernel that takes the flag from l); an
    # eager call, or XLA's backward, pays a read of l for it.
    need = for_grad and kernels.bwd_reads_live(*x2.shape, x2.dtype, cfg)
    l2, lse = fwd_2d(x2, log=True, lse=need)
    l = masked(_from_2d(l2, x.shape, axes), where)
    if need:
      # lse is -inf exactly on empty slices (and NaN on NaN slices, which are live).
      return l, _stat_from_2d(lse != -jnp.inf, x.shape, axes)
    # An empty slice's l is all -inf; a live one's max is -log(sum(exp(x - max))),
    # finite, or NaN.
    return l, jnp.any(l != -jnp.inf, axis=axes, keepdims=True)

  @partial(jax.custom_vjp, nondiff_argnums=(3, 4))
  def softmax_bwd(s, where, g, axes: Axes, axis_name: AxisName):
    # dx = s * (g - sum(g * s))
    _check_axis_name(axis_name)
    g2 = _to_2d(masked(g, where, 0.0).astype(s.dtype), axes)
    dx = bwd_2d(_to_2d(s, axes), g2, log=False)
    return masked(_from_2d(dx, s.shape, axes), where, 0.0)

  def softmax_bwd_fwd(s, where, g, axes, axis_name):
    return softmax_bwd(s, where, g, axes, axis_name), (s, where, g)

  def softmax_bwd_bwd(axes, axis_name, res, ct):
    s, where, g = res
    _, vjp = jax.vjp(lambda s, g: _xla.softmax_bwd(s, where, g, axes, axis_name), s, g)
    ds, dg = vjp(ct)
    return ds, None, dg

  softmax_bwd.defvjp(softmax_bwd_fwd, softmax_bwd_bwd)

  @partial(jax.custom_vjp, nondiff_argnums=(4, 5))
  def log_softmax_bwd(l, live, where, g, axes: Axes, axis_name: AxisName):
    # dx = g - exp(l) * sum(g), and 0 on an empty slice
    _check_axis_name(axis_name)
    g2 = _to_2d(masked(g, where, 0.0).astype(l.dtype), axes)
    dx = bwd_2d(_to_2d(l, axes), g2, _stat_to_2d(live, axes), log=True)
    return _from_2d(dx, l.shape, axes)

  def log_softmax_bwd_fwd(l, live, where, g, axes, axis_name):
    return log_softmax_bwd(l, live, where, g, axes, axis_name), (l, live, where, g)

  def log_softmax_bwd_bwd(axes, axis_name, res, ct):
    l, live, where, g = res
    f = lambda l, g: _xla.log_softmax_bwd(l, live, where, g, axes, axis_name)  # noqa: E731
    _, vjp = jax.vjp(f, l, g)
    dl, dg = vjp(ct)
    return dl, None, None, dg

  log_softmax_bwd.defvjp(log_softmax_bwd_fwd, log_softmax_bwd_bwd)

  return Backend(
    softmax_fwd=softmax_fwd,
    softmax_bwd=softmax_bwd,
    log_softmax_fwd=log_softmax_fwd,
    log_softmax_bwd=log_softmax_bwd,
    row_stats=row_stats,
  )
