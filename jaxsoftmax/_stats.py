"""Per-slice statistics shared by softmax, log-softmax and the losses.

This is the one place that knows how a slice is shifted and normalised, how
``where`` and -inf are treated, and how statistics are combined across devices
when ``axis_name`` names a mesh axis that splits the softmax axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._checks import AxisName


def masked(x: jax.Array, where: jax.Array | None, fill: float = -jnp.inf) -> jax.Array:
  """``x`` with entries outside ``where`` replaced by ``fill``."""
  return x if where is None else jnp.where(where, x, fill)


def slice_sum(v: jax.Array, axes: tuple[int, ...], axis_name: AxisName) -> jax.Array:
  """Sum over ``axes`` (keepdims), and over the devices of ``axis_name``."""
  total = jnp.sum(v, axes, keepdims=True)
  return total if axis_name is None else lax.psum(total, axis_name)


def shift_and_sumexp(
  xs: jax.Array, axes: tuple[int, ...], axis_name: AxisName
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Shift ``m``, ``e = exp(xs - m)`` and ``d = sum(e)`` over a (masked) slice.

  ``xs`` already holds -inf at masked entries. ``m`` is the slice maximum, or 0
  for a slice with no finite entry, so that such a slice gives ``e = 0`` and
  ``d = 0`` rather than ``exp(-inf - -inf) = NaN``. A slice holding +inf or NaN
  has ``m`` = +inf or NaN and so turns to NaN, and only that slice.
  """
  m = jnp.max(xs, axes, keepdims=True)
  if axis_name is not None:
    m = lax.pmax(m, axis_name)
  m = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
  e = jnp.exp(xs - m)
  return m, e, slice_sum(e, axes, axis_name)


def log_normalizer(m: jax.Array, d: jax.Array) -> jax.Array:
  """``lse = m + log(d)``: -inf for an empty slice (``d == 0``)."""
  return m + jnp.log(d)
