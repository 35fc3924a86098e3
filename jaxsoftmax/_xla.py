"""The XLA backend: softmax and log-softmax in plain jnp ops.

Every backend offers the same four functions; ``_softmax.py`` calls them from
its custom_vjp rules and does not care which backend runs. The backward
functions are written in differentiable jnp ops, so that reverse-over-reverse
differentiation works through them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._checks import AxisName, compute_dtype
from ._stats import log_normalizer, masked, shift_and_sumexp, slice_sum

Axes = tuple[int, ...]


def _slice_max(xm: jax.Array, axes: Axes) -> jax.Array:
  """The slice max (keepdims) of a masked ``xm``, in ``xm``'s own dtype.

  The reduction starts from ``finfo.min`` rather than -inf, so a slice with no
  finite entry gets a finite max and ``exp(-inf - m) = 0`` there, never NaN,
  while +inf or NaN still make ``m`` +inf or NaN. Doing this inside the
  reduction, not with a ``where`` on ``m`` afterwards, keeps the whole forward
  one fused kernel on XLA:CPU (a select between the reductions splits it), and
  taking it before the float32 cast keeps the reduction on the narrow input
  (the max is exact in any float dtype).
  """
  init = jnp.array(jnp.finfo(xm.dtype).min, xm.dtype)
  return lax.expand_dims(lax.reduce(xm, init, lax.max, axes), axes)


def _slice_stats(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: AxisName):
  """``(xs, m, e, d, live)`` of each slice.

  ``xs`` is the masked input in the compute dtype, ``m`` its shift, ``e =
  exp(xs - m)``, ``d = sum(e)`` and ``live`` is False for an empty slice (no
  finite entry), which has ``e = 0`` and ``d = 0``. In a live slice ``d >= 1``:
  the entry at the max contributes ``exp(0) = 1``. So ``max(d, 1)`` is ``d``
  where it matters and 1 in an empty slice, which the callers use instead of a
  ``where`` (a select on ``d`` would split XLA:CPU's fused kernel in two).
  """
  xm = masked(x, where)
  xs = xm.astype(compute_dtype(x.dtype))
  if axis_name is not None:
    # Split across devices: the shared helper combines the statistics.
    m, e, d = shift_and_sumexp(xs, axes, axis_name)
    return xs, m, e, d, d != 0
  m = _slice_max(xm, axes).astype(xs.dtype)
  e = jnp.exp(xs - m)
  # `live` from a max of its own rather than from `d`: reading `d` outside the
  # fused forward kernel would split it, and one extra read of x costs less.
  # (NaN != -inf, so a NaN slice counts as live and stays NaN.)
  live = jnp.max(xm, axes, keepdims=True) != -jnp.inf
  return xs, m, e, jnp.sum(e, axes, keepdims=True), live


def _shift_and_sumexp(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: AxisName):
  """``(xs, m, e, d)`` of :func:`_slice_stats` (the cross-entropy losses use it)."""
  return _slice_stats(x, where, axes, axis_name)[:4]


def softmax_fwd(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: AxisName):
  """Returns ``s`` in ``x.dtype``; statistics are kept in the compute dtype."""
  _, _, e, d, _ = _slice_stats(x, where, axes, axis_name)
  # One reciprocal per slice, then a multiply; an empty slice (e == 0, d == 0)
  # is scaled by 1 and so gives exact zeros.
  s = e * (1 / jnp.maximum(d, 1))
  return masked(s, where, 0.0).astype(x.dtype)


def softmax_bwd(
  s: jax.Array, where: jax.Array | None, g: jax.Array, axes: Axes, axis_name: AxisName
):
  # dx = s * (g - sum(g * s))
  cdt = compute_dtype(s.dtype)
  sc, gc = s.astype(cdt), masked(g.astype(cdt), where, 0.0)
  dx = sc * (gc - slice_sum(gc * sc, axes, axis_name))
  return masked(dx, where, 0.0).astype(s.dtype)


def log_softmax_fwd(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: AxisName):
  """Returns ``l`` in ``x.dtype`` and ``live``, a per-slice flag: False if the slice is empty."""
  xs, m, _, d, live = _slice_stats(x, where, axes, axis_name)
  # An empty slice has d == 0 and a finite m: lse = m + log(1) keeps l = -inf
  # there, not NaN. ``e`` is only summed (never stored): the forward is one
  # fused pass over x on XLA:CPU.
  l = masked(xs - log_normalizer(m, jnp.maximum(d, 1)), where)
  return l.astype(x.dtype), live


def log_softmax_bwd(
  l: jax.Array,
  live: jax.Array,
  where: jax.Array | None,
  g: jax.Array,
  axes: Axes,
  axis_name: AxisName,
):
  # dx = g - exp(l) * sum(g)
  cdt = compute_dtype(l.dtype)
  lc, gc = l.astype(cdt), masked(g.astype(cdt), where, 0.0)
  dx = gc - jnp.exp(lc) * slice_sum(gc, axes, axis_name)
  # An empty slice (live == False) has exp(l) == 0, so dx == g there: scale it by
  # a per-slice 0/1 factor. A multiply by a broadcast row value fuses into the
  # same pass as the reduction; a full-size `where` on dx would be a pass of its own.
  return (dx * live.astype(cdt)).astype(l.dtype)
