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
  reduction, not with a ``where`` on ``m`` afterwards, lets XLA:CPU fuse the
  max with the ``exp(x - m)`` that consumes it (one pass over ``x`` instead of
  two), and taking it before the float32 cast keeps the reduction on the
  narrow input (the max is exact in any float dtype).
  """
  init = jnp.array(jnp.finfo(xm.dtype).min, xm.dtype)
  return lax.expand_dims(lax.reduce(xm, init, lax.max, axes), axes)


def _shift_and_sumexp(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: AxisName):
  """``(xs, m, e, d)``: the masked input in the compute dtype, its shift, ``exp(xs - m)``
  and ``d = sum(e)``. An empty slice has ``e = 0`` and ``d = 0``."""
  xm = masked(x, where)
  xs = xm.astype(compute_dtype(x.dtype))
  if axis_name is not None:
    # Split across devices: the shared helper combines the statistics.
    m, e, d = shift_and_sumexp(xs, axes, axis_name)
    return xs, m, e, d
  m = _slice_max(xm, axes).astype(xs.dtype)
  e = jnp.exp(xs - m)
  return xs, m, e, jnp.sum(e, axes, keepdims=True)


def softmax_fwd(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: AxisName):
  """Returns ``s`` in ``x.dtype``; statistics are kept in the compute dtype."""
  _, _, e, d = _shift_and_sumexp(x, where, axes, axis_name)
  # One reciprocal per slice, then a multiply. An empty slice has e == 0 and
  # d == 0: scale by 1 there to get exact zeros.
  s = e * (1 / jnp.where(d == 0, jnp.ones_like(d), d))
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
  xs, m, _, d = _shift_and_sumexp(x, where, axes, axis_name)
  live = d != 0
  # An empty slice has lse = -inf; subtract 0 there so that l = -inf, not NaN.
  # ``e`` is only summed here (never stored): XLA fuses exp into the reduction.
  lse = jnp.where(live, log_normalizer(m, d), jnp.zeros_like(m))
  l = masked(xs - lse, where)
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
