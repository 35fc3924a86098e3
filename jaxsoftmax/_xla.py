"""The XLA backend: softmax and log-softmax in plain jnp ops.

Every backend offers the same four functions, and ``row_stats`` for the losses;
``_softmax.py`` calls them from its custom_vjp rules and does not care which
backend runs. The backward functions are written in differentiable jnp ops, so
that reverse-over-reverse differentiation works through them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._checks import AxisName, compute_dtype, static_shape
from ._stats import masked, read_apart, slice_stats, slice_sum, two_sum

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


def log_softmax_fwd(
  x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: AxisName, *, for_grad=False
):
  """Returns ``l`` in ``x.dtype`` and ``live``, a per-slice flag: False if the slice
  is empty. ``for_grad``: called from the custom_vjp's forward rule (``live`` is
  saved), not for the output alone."""
  shared_shift = _shared_shift(x.shape, axes, for_grad)
  # (For the two floats, on the CPU, the reads of x other than the exp-sum's go
  # through `read_apart`: a 16-bit x is then converted within the exp-sum's
  # pass, not written out in float32 first; 0.57-0.79x the time of forward and
  # backward, bfloat16, 256 x 4096 to 1024 x 16384.)
  xs, m, _, d, live = slice_stats(x, where, axes, axis_name, apart=not shared_shift)
  # An empty slice has d == 0 and a finite m: log(max(d, 1)) = 0 keeps l = -inf
  # there, not NaN.
  log_d = jnp.log(jnp.maximum(d, 1))

  def shared(xs, m, log_d):
    # (x - m) - log d, the shift m shared with the exp-sum: x - m is exact near
    # the max (Sterbenz), so l is within two roundings at any scale. It is
    # jax.nn's form, which XLA fuses into one pass over x (XLA:CPU from 4096
    # slices).
    return (xs - m) - log_d

  def two_floats(_, m, log_d):
    # x - hi - lo with lse = m + log d held exactly as two floats (`two_sum`):
    # as exact, and its shift is not the exp-sum's, so that XLA:CPU, which keeps
    # the reductions of fewer than 4096 slices in passes of their own, does not
    # write x - m out as a full-size intermediate for the two to share. (It
    # reads x apart, not the exp-sum's converted xs that `shared` takes.)
    hi, lo = two_sum(m, log_d)
    return (masked(read_apart(x), where).astype(xs.dtype) - hi) - lo

  if shared_shift:
    l = shared(xs, m, log_d)
  else:  # the two floats on the CPU only, where they were measured faster
    l = jax.lax.platform_dependent(xs, m, log_d, cpu=two_floats, default=shared)
  return masked(l, where).astype(x.dtype), live


def row_stats(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: AxisName):
  """``(m, d)`` of each slice (keepdims, compute dtype): the max (-inf for an empty
  slice) and ``d = sum(exp(x - m))`` (0 for an empty slice). The losses' forward
  reads these from a backend; on this one they compute them inline
  (``_cross_entropy._stats``), where XLA fuses them with the rest of the loss."""
  _, m, _, d, live = slice_stats(x, where, axes, axis_name)
  return jnp.where(live, m, -jnp.inf), d


# The XLA:CPU fusion threshold (jax 0.10): from this many slices the forward of a
# softmax is one fused pass; below it the reductions stay apart.
FUSED_SLICES = 4096


def _shared_shift(shape: tuple[int, ...], axes: Axes, for_grad: bool) -> bool:
  """Whether log_softmax takes ``(x - m) - log d`` (else, on the CPU, ``x - hi - lo``).

  Measured on this 2-core CPU (jax 0.10.2, 2026-11-26, `benchmarks/README.md`):
  the output alone is as fast or faster with the shared shift at every size (the
  two floats took 1.12-1.38x jax.nn's time in float32 and 1.17-2.00x in
  bfloat16 at 4096 slices, where the shared shift is one fused pass and
  0.99-1.18x), and so is forward+backward from 4096 slices; below that,
  forward+backward in float32 took 1.08-1.32x jax.nn's time with the shared
  shift and 0.97-1.21x with the two floats."""
  if not for_grad or not static_shape(shape):
    return True
  slices = math.prod(shape) // max(1, math.prod(shape[a] for a in axes))
  return slices >= FUSED_SLICES


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
