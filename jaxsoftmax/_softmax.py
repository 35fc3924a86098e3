"""softmax and log_softmax: custom_vjp cores with analytic backward rules."""

from __future__ import annotations

from functools import partial

import jax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from . import _backend, _explicit
from ._checks import (
  Axis,
  AxisName,
  check_axis_name,
  check_implementation,
  check_where,
  float_input,
  normalize_axes,
)
from ._stats import varying_like


def _prepare(fn, x, axis, where, axis_name, implementation):
  x = float_input(fn, "x", x)
  axes = normalize_axes(fn, axis, x.ndim)
  where = check_where(fn, where, x.shape)
  axis_name = check_axis_name(fn, axis_name)
  implementation = check_implementation(fn, implementation)
  # An explicitly sharded x runs by block (``_by_block``), which resolves the
  # backend for each block's shape.
  lay = _explicit.layout(x)
  backend = None if lay else _backend.resolve(fn, implementation, x, axes, axis_name, where)
  return x, where, axes, axis_name, backend, lay


def softmax(
  x: ArrayLike,
  axis: Axis = -1,
  where: ArrayLike | None = None,
  *,
  axis_name: AxisName = None,
  implementation: str | None = None,
) -> jax.Array:
  r"""Softmax with an analytic reverse-mode rule that keeps only its output.

  .. math::
    \mathrm{softmax}(x)_i = \frac{\exp(x_i)}{\sum_j \exp(x_j)}

  A drop-in replacement for :func:`jax.nn.softmax`. Its custom VJP computes
  ``dx = s * (g - sum(g * s, axis))`` from the saved output ``s``; the
  ``n x n`` Jacobian ``diag(s) - s s^T`` is never built.

  Differences from :func:`jax.nn.softmax`, on purpose:

  * a slice whose entries are all -inf (with no ``where``) gives all zeros and a
    zero gradient, not NaN; so does a slice that ``where`` masks out entirely;
  * the gradient reaching a masked entry is exactly zero, whatever its logit.

  A slice holding +inf or NaN (at an unmasked entry) is NaN, and only that slice.
  bfloat16 and float16 inputs are computed in float32 and returned in their
  own dtype. Forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``,
  ``jax.hessian``) is not available on a ``custom_vjp``; use reverse over
  reverse (``jax.jacrev(jax.jacrev(f))``) instead.

  Args:
    x: input array of real numbers. Integers are promoted to the default float
      dtype; complex input raises ``TypeError``.
    axis: the axis or axes to normalise over: an int, a tuple of ints, or None
      (all axes).
    where: optional boolean mask broadcastable to ``x.shape``. Masked entries of
      the output are exactly 0 and receive a zero gradient.
    axis_name: a mesh axis name (or tuple of names) along which the softmax axis
      is split across devices, for use inside ``shard_map``. The result is the
      softmax over the global axis, block by block.
    implementation: ``None`` (the best available for the platform), ``"xla"`` or
      ``"pallas"``.

  Returns:
    An array of the same shape and dtype as ``x`` (integers: the default float).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxsoftmax
    >>> jaxsoftmax.softmax(jnp.array([1.0, 1.0, 1.0, 1.0]))
    Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
    >>> jaxsoftmax.softmax(jnp.array([1.0, 2.0]), where=jnp.array([True, False]))
    Array([1., 0.], dtype=float32)
  """
  x, where, axes, axis_name, backend, lay = _prepare(
    "softmax", x, axis, where, axis_name, implementation
  )
  if lay is not None:
    return _by_block(softmax, x, where, axes, lay, axis_name, implementation)
  # (Inside a shard_map, x the same on every device beside a mask that varies:
  # x typed varying first, whose transpose sums the devices' cotangents.)
  x = varying_like(x, where, axis_name=axis_name)
  return _softmax(x, where, axes, axis_name, backend)


def _by_block(op, x, where, axes, lay, axis_name, implementation):
  """``op`` on each device's block of an explicitly sharded ``x`` (``_explicit``);
  the mesh axes that split ``axes`` become ``axis_name``."""
  inner = _explicit.with_names(axis_name, _explicit.axis_names(lay.spec, axes))
  spec = P(*lay.spec)
  wspec = None
  if where is not None:
    wspec = _explicit.operand_spec(where.shape, range(x.ndim), lay, x.shape)

  def block(xb, wb):
    return op(xb, axes, wb, axis_name=inner, implementation=implementation)

  return _explicit.run(block, lay, (x, where), (spec, wspec), spec)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _softmax(x, where, axes, axis_name, backend):
  return _backend.get(backend).softmax_fwd(x, where, axes, axis_name)


def _softmax_fwd(x, where, axes, axis_name, backend):
  s = _softmax(x, where, axes, axis_name, backend)
  # Residuals: the output s (in x.dtype), the only full-size array the backward
  # needs, and the mask (in its own, possibly smaller, shape) to zero g there.
  return s, (s, where)


def _softmax_bwd(axes, axis_name, backend, res, g):
  # dx = s * (g - sum(g * s, axes))
  s, where = res
  return _backend.get(backend).softmax_bwd(s, where, g, axes, axis_name), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def log_softmax(
  x: ArrayLike,
  axis: Axis = -1,
  where: ArrayLike | None = None,
  *,
  axis_name: AxisName = None,
  implementation: str | None = None,
) -> jax.Array:
  r"""Log-softmax with an analytic reverse-mode rule that keeps only its output.

  .. math::
    \mathrm{log\_softmax}(x)_i = x_i - \log \sum_j \exp(x_j)

  A drop-in replacement for :func:`jax.nn.log_softmax`. Its custom VJP computes
  ``dx = g - exp(l) * sum(g, axis)`` from the saved output ``l``.

  Masked entries are -inf and receive a zero gradient. A slice that is empty
  (fully masked, or all -inf with no ``where``) is all -inf with a zero
  gradient, never NaN; :func:`jax.nn.log_softmax` gives NaN for an all -inf
  slice. A slice holding +inf or NaN is NaN, and only that slice.

  Args:
    x: input array of real numbers (integers are promoted; complex raises).
    axis: an int, a tuple of ints, or None (all axes).
    where: optional boolean mask broadcastable to ``x.shape``.
    axis_name: mesh axis name(s) splitting the softmax axis, inside ``shard_map``.
    implementation: ``None``, ``"xla"`` or ``"pallas"``.

  Returns:
    An array of the same shape and dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxsoftmax
    >>> jaxsoftmax.log_softmax(jnp.array([0.0, 0.0]))
    Array([-0.6931472, -0.6931472], dtype=float32)
  """
  x, where, axes, axis_name, backend, lay = _prepare(
    "log_softmax", x, axis, where, axis_name, implementation
  )
  if lay is not None:
    return _by_block(log_softmax, x, where, axes, lay, axis_name, implementation)
  x = varying_like(x, where, axis_name=axis_name)
  return _log_softmax(x, where, axes, axis_name, backend, False)[0]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _log_softmax(x, where, axes, axis_name, backend, for_grad=False):
  fwd = _backend.get(backend).log_softmax_fwd
  return fwd(x, where, axes, axis_name, for_grad=for_grad)


def _log_softmax_fwd(x, where, axes, axis_name, backend, for_grad):
  # The backend may pick another (equally exact) form when the result is saved
  # for the backward: on XLA:CPU the fastest form differs (`_xla.log_softmax_fwd`).
  # (Through the custom_vjp itself, so that reverse over reverse differentiates
  # it by this rule again, never a kernel.)
  l, live = _log_softmax(x, where, axes, axis_name, backend, True)
  # Residuals: the output l (in x.dtype); the per-slice flag `live`, False for
  # an empty slice whose gradient must be 0; and the mask, to zero g there.
  return (l, live), (l, live, where)


def _log_softmax_bwd(axes, axis_name, backend, for_grad, res, cts):
  # dx = g - exp(l) * sum(g, axes)
  l, live, where = res
  g, _ = cts
  return _backend.get(backend).log_softmax_bwd(l, live, where, g, axes, axis_name), None


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)
