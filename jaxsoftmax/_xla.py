"""The XLA backend: softmax and log-softmax in plain jnp ops.

Every backend offers the same four functions; ``_softmax.py`` calls them from
its custom_vjp rules and does not care which backend runs. The backward
functions are written in differentiable jnp ops, so that reverse-over-reverse
differentiation works through them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._checks import AxisName, compute_dtype
from ._stats import masked, slice_stats, slice_sum, two_sum

Axes = tuple[int, ...]


def softmax_fwd(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: AxisName):
  """Returns ``s`` in ``x.dtype``; statistics are kept in the compute dtype."""
  _, _, e, d, _ = slice_stats(x, where, axes, axis_name)
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
  xs, m, _, d, live = slice_stats(x, where, axes, axis_name)
  # l = x - lse with lse = m + log d held as two floats, hi + lo (`two_sum`):
  # x - hi is exact near the max (Sterbenz), and lo puts back the rounding of
  # m + log d, which at logits near 3e4 is 1e-3 in float32. (x - m) - log d is
  # as exact, but shares x - m with the exp-sum, and XLA:CPU then writes x - m
  # out as a full-size intermediate.
  # An empty slice has d == 0 and a finite m: log(max(d, 1)) = 0 keeps l = -inf
  # there, not NaN. ``e`` is only summed (never stored): the forward is one
  # fused pass over x on XLA:CPU.
  hi, lo = two_sum(m, jnp.log(jnp.maximum(d, 1)))
  l = masked((xs - hi) - lo, where)
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
