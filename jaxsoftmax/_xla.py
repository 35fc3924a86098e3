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
from ._stats import log_normalizer, masked, shift_and_sumexp, slice_sum

Axes = tuple[int, ...]


def softmax_fwd(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: AxisName):
  """Returns ``s`` in ``x.dtype``; statistics are kept in the compute dtype."""
  xs = masked(x.astype(compute_dtype(x.dtype)), where)
  _, e, d = shift_and_sumexp(xs, axes, axis_name)
  # An empty slice has e == 0 and d == 0: divide by 1 there to get exact zeros.
  s = e / jnp.where(d == 0, jnp.ones_like(d), d)
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
  xs = masked(x.astype(compute_dtype(x.dtype)), where)
  m, _, d = shift_and_sumexp(xs, axes, axis_name)
  live = d != 0
  # An empty slice has lse = -inf; subtract 0 there so that l = -inf, not NaN.
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
  return jnp.where(live, dx, jnp.zeros_like(dx)).astype(l.dtype)
