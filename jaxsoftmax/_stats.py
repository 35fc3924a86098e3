"""Per-slice statistics shared by softmax, log-softmax and the losses.

This is the one place that knows how a slice is shifted and normalised, how
``where`` and -inf are treated, and how statistics are combined across devices
when ``axis_name`` names a mesh axis that splits the softmax axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from ._checks import AxisName, compute_dtype, static_shape


def read_apart(x: jax.Array) -> jax.Array:
  """``x`` for a read outside the fused pass that converts it to float32 (in the
  losses the label's logit and the backward, which runs in the same program
  under ``jax.grad``; in log_softmax the max passes where they are not fused).

  On XLA:CPU (jax 0.10), when 16-bit logits have any user outside the fused
  pass that converts them to float32, XLA writes a float32 copy of all of them
  first and runs the pass over that: 4 more bytes written and read per logit.
  An optimization barrier in front of the other reads keeps the conversion
  inside the pass (no copy: the barrier returns its operand). Elsewhere, and
  for 32-bit logits, ``x`` itself."""
  if jnp.dtype(x.dtype).itemsize >= 4:
    return x
  return lax.platform_dependent(x, cpu=lax.optimization_barrier, default=lambda v: v)


def masked(x: jax.Array, where: jax.Array | None, fill: float = -jnp.inf) -> jax.Array:
  """``x`` with entries outside ``where`` replaced by ``fill``."""
  return x if where is None else jnp.where(where, x, fill)


def per_slice(where: jax.Array | None, axes: tuple[int, ...]) -> bool:
  """Whether ``where`` (full rank) is one flag per slice: of extent 1 on ``axes``."""
  return where is not None and all(where.shape[a] == 1 for a in axes)


def slice_sum(v: jax.Array, axes: tuple[int, ...], axis_name: AxisName) -> jax.Array:
  """Sum over ``axes`` (keepdims), and over the devices of ``axis_name``."""
  total = jnp.sum(v, axes, keepdims=True)
  return total if axis_name is None else lax.psum(total, axis_name)


def slice_stats(
  x: jax.Array,
  where: jax.Array | None,
  axes: tuple[int, ...],
  axis_name: AxisName,
  apart: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(xs, m, e, d, live)`` of each slice of ``x`` over ``axes``.

  ``xs`` is the masked input (-inf outside ``where``) in the compute dtype,
  ``m`` its shift, ``e = exp(xs - m)``, ``d = sum(e)``, and ``live`` is False
  for an empty slice (no finite entry), which has ``e = 0`` and ``d = 0``
  rather than ``exp(-inf - -inf) = NaN``. A slice holding +inf or NaN has
  ``m`` = +inf or NaN and so turns to NaN, and only that slice.

  In a live slice ``d >= 1`` (the entry at the max contributes ``exp(0) = 1``),
  so callers may use ``max(d, 1)`` instead of a ``where`` on ``d``: on XLA:CPU
  a select between the reductions splits the fused forward kernel in two.

  With ``axis_name``, ``x`` is one block of a slice split across devices, and
  ``m``, ``e``, ``d`` and ``live`` are those of the whole slice (see
  ``_combine_across``).

  ``apart``: the two maxes read ``x`` through `read_apart`, for callers whose
  reductions XLA:CPU does not fuse (fewer than 4096 slices): then the exp-sum
  converts a 16-bit ``x`` within its own pass rather than from a float32 copy.
  """
  xm = masked(x, where)
  xs = xm.astype(compute_dtype(x.dtype))
  if axis_name is not None:
    m_local = jnp.max(xs, axes, keepdims=True)
    e = jnp.exp(xs - finite_shift(m_local))
    m, d, rescale = _combine_across(m_local, jnp.sum(e, axes, keepdims=True), axis_name)
    return xs, m, e * rescale, d, d != 0
  xr = read_apart(xm) if apart else xm
  m = _slice_max(xr, axes).astype(xs.dtype)
  e = jnp.exp(xs - m)
  # `live` from a max of its own rather than from `d`: reading `d` outside the
  # fused forward kernel would split it, and one extra read of x costs less.
  # (NaN != -inf, so a NaN slice counts as live and stays NaN.) Where the
  # reductions are apart anyway (`apart`), `d != 0` timed the same: 0.94-1.06x
  # (benchmarks/README.md, "Tried and not taken").
  live = jnp.max(xr, axes, keepdims=True, initial=-jnp.inf) != -jnp.inf
  return xs, m, e, sum_exp(xs, m, axes), live


# A row longer than this is summed in pieces on the CPU (see `sum_exp`).
LONG_ROW = 65536


def sum_exp(xs: jax.Array, m: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``sum(exp(xs - m))`` over ``axes`` (keepdims), ``m`` a per-slice shift.

  On XLA:CPU a reduction of ``exp`` along one long trailing axis is slow: with
  jax 0.10 such a fused reduction runs about 4x slower per element once a row
  is longer than 32768 entries than the same work on rows of a few thousand
  (``benchmarks/README.md`` has the measurement). There, a row of ``n`` entries
  is viewed as ``n / k`` pieces of ``k`` (a free reshape), each piece summed,
  then the ``n / k`` partial sums. A per-slice select between the two sums
  keeps XLA from fusing them back into one long-row reduction; it is exact
  (where ``m`` is NaN every partial sum is NaN already). Other platforms, and
  rows that are short or have no suitable ``k``, take the plain sum.
  """

  def plain(xs, m):
    return jnp.sum(jnp.exp(xs - m), axes, keepdims=True)

  k = _piece_width(xs.shape, axes)
  if k is None:
    return plain(xs, m)

  def pieces(xs, m):
    parts = jnp.sum(jnp.exp(xs.reshape(*xs.shape[:-1], -1, k) - m[..., None]), -1)
    parts = jnp.where(jnp.isnan(m), m, parts)
    return jnp.sum(parts, -1, keepdims=True)

  return lax.platform_dependent(xs, m, cpu=pieces, default=plain)


def sums_in_pieces(shape: tuple[int, ...], axes: tuple[int, ...]) -> bool:
  """Whether `sum_exp` sums these slices in pieces on the CPU."""
  return _piece_width(shape, axes) is not None


def _piece_width(shape: tuple[int, ...], axes: tuple[int, ...]) -> int | None:
  """``k`` for `sum_exp`: a divisor of a long trailing row, 2048, 4096 or 1024 if one
  divides it, else the largest from 4096 down to 512."""
  if axes != (len(shape) - 1,) or not static_shape(shape[-1:]) or shape[-1] < LONG_ROW:
    return None
  n = shape[-1]
  for k in (2048, 4096, 1024, *range(4096, 511, -1)):
    if n % k == 0:
      return k
  return None


def _slice_max(xm: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """The slice max (keepdims) of a masked ``xm``, in ``xm``'s own dtype.

  The reduction starts from ``finfo.min`` rather than -inf, so a slice with no
  finite entry gets a finite max and ``exp(-inf - m) = 0`` there, never NaN,
  while +inf or NaN still make ``m`` +inf or NaN. Doing this inside the
  reduction, not with a ``where`` on ``m`` afterwards, keeps the whole forward
  one fused kernel on XLA:CPU, and taking it before the float32 cast keeps the
  reduction on the narrow input (the max is exact in any float dtype).

  XLA takes a reduction's initial value for its identity, and drops it where a
  slice has one entry (the reduction becomes a reshape): there, and where the
  size is symbolic, ``finfo.min`` is applied after the reduction instead.
  """
  init = jnp.array(jnp.finfo(xm.dtype).min, xm.dtype)
  m = lax.reduce(xm, init, lax.max, axes)
  sizes = tuple(xm.shape[a] for a in axes)
  if not static_shape(sizes) or math.prod(sizes) == 1:
    m = jnp.maximum(m, init)
  return lax.expand_dims(m, axes)


def nan_at(bad: jax.Array, x: jax.Array) -> jax.Array:
  """``x`` with NaN where ``bad`` (broadcast against it).

  The NaN is made as ``inf * 0`` at the bad entries only, never as a NaN
  constant: under ``jax_debug_nans`` every op run eagerly (``jax.grad`` outside
  ``jit``, ``jax.disable_jit``, and the re-run that locates a NaN) has its
  output checked, and a constant would be reported on every call, valid input
  or not.
  """
  poison = jnp.where(bad, jnp.inf, 0.0).astype(x.dtype) * 0
  return jnp.where(bad, poison, x)


def finite_shift(m: jax.Array) -> jax.Array:
  """The max ``m`` as a shift: 0 for a slice with no finite entry (m == -inf)."""
  return jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)


def _combine_across(
  m_local: jax.Array, d_local: jax.Array, axis_name: AxisName
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Global shift and normaliser from each device's block, in ONE collective.

  Each device holds its block's raw max ``m_j`` and ``d_j = sum exp(x - shift_j)``.
  Rather than ``pmax`` then ``psum`` (two dependent collectives), the pairs
  ``(m_j, d_j)`` of every device are all-gathered at once, and each device
  combines them itself, as the online softmax does:

    m = max_j m_j,    d = sum_j d_j * exp(m_j - m).

  This costs one collective latency instead of two. The price is bytes: each
  device receives ``2 x devices`` numbers per slice, where the all-reduce pair
  moves about 4 (ring), so for a very wide ``axis_name`` with many slices the
  pair moves less data. At tensor-parallel widths it stays small: float32 at 8
  devices is 64 bytes per slice, 512 KiB for 8192 tokens. (On the 8
  simulated CPU devices of the tests both forms time the same: there a
  collective is a memory copy.) Returns the global shift ``m`` (0 for an
  empty slice), ``d``, and ``rescale = exp(m_local - m)``, which turns the local
  ``exp(x - shift_local)`` into ``exp(x - m)``.

  Special values stay exact: a block with no finite entry has ``m_j = -inf`` and
  so weight ``exp(-inf - m) = 0`` (``m`` is never -inf); +inf or NaN on any
  device makes ``m`` +inf or NaN, so ``exp(m_j - m)`` and hence ``d`` and the
  whole slice are NaN on every device, as in the unsharded function.

  Inside ``shard_map`` the gathered pairs are typed invariant along
  ``axis_name`` (as a ``psum`` result is), so a per-example result built from
  ``m`` and ``d`` alone, such as a loss, can leave with ``out_specs`` that do
  not name ``axis_name``.
  """
  # The pair on a new last dim: stacked in front, under vmap over a dim split by
  # an explicit mesh axis the gathered pairs came back typed as split along the
  # pair's dim (jax 0.10.2), and taking m and d apart failed.
  gathered = _all_gather(jnp.stack([m_local, d_local], axis=-1), axis_name)
  m_all, d_all = gathered[..., 0], gathered[..., 1]
  m = finite_shift(jnp.max(m_all, axis=0))
  d = jnp.sum(d_all * jnp.exp(m_all - m), axis=0)
  return m, d, jnp.exp(m_local - m)


def _all_gather(v: jax.Array, axis_name: AxisName) -> jax.Array:
  """``lax.all_gather``, invariant along ``axis_name`` where ``v`` is typed varying there.

  Under ``shard_map``'s varying-axes typing (``check_vma``) the plain all-gather
  stays varying; ``to="invarying"`` says every device receives the same array.
  Under ``vmap`` or ``check_vma=False`` there is no such typing, and the
  invariant form is not available there.
  """
  names = {axis_name} if isinstance(axis_name, str) else set(axis_name)
  if names <= varying_axes(v):
    return lax.all_gather(v, axis_name, to="invarying")
  if isinstance(axis_name, str) or len(axis_name) == 1:
    return lax.all_gather(v, axis_name)
  # Several names, untyped: one gather per name, the last (innermost) first, in
  # the tuple gather's order. (lax.all_gather over a tuple of vmap axes fails
  # in JAX's batching rule, jax 0.10.2: "axis size doesn't match".)
  for name in reversed(axis_name):
    v = lax.all_gather(v, name)
  return v.reshape(-1, *v.shape[len(axis_name) :])


def total_cotangent(g: jax.Array, block: jax.Array, axis_name: AxisName) -> jax.Array:
  """The cotangent of a per-slice result that every device computes whole (a loss
  over a class axis split across devices), for the rule that differentiates it
  with respect to this device's ``block`` of the slices.

  Each device's copy of the result depends on every device's block, so the
  gradient of a block sums the cotangents of all the copies. Under
  ``shard_map``'s varying-axes typing the copies are typed as one invariant value
  with one cotangent, which is then the total; ``block`` is typed varying there.
  With ``check_vma=False`` the copies are values of their own (a result returned
  unmapped gets ``1 / n`` of its cotangent on each of the ``n`` devices): their
  cotangents are summed here, one ``psum`` of a number per slice. Under ``vmap``
  with ``axis_name`` the result of the collectives is one unbatched value, whose
  cotangent ``vmap`` has summed over the copies already; a backward of
  ``jax.grad(vmap(...))`` runs outside the name's scope, which is how it is told
  apart. (Differentiated inside the map, ``vmap(jax.grad(f), axis_name=...)``
  or ``shard_map(jax.grad(f), check_vma=False)``, each copy's gradient is taken
  on its own and the ``psum`` gives ``n`` times the unsharded one, as a loss
  written with ``lax.psum`` does there.)
  """
  if axis_name is None:
    return g
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  untyped = tuple(a for a in names if a not in varying_axes(block))
  if not untyped or not _bound(untyped):
    return g
  return psum_wide(g, untyped).astype(g.dtype)


def varying_like(v: jax.Array, *others, axis_name: AxisName = None) -> jax.Array:
  """``v`` typed varying over the mesh axes that any of ``others`` (arrays or
  None) vary over inside a ``shard_map``, as an operation combining them would
  make it, and over ``axis_name``'s axes (a block of a split class axis that is
  the same on every device is still each device's own block: the global slice
  is it repeated). Outside a ``shard_map`` with varying-axes typing (``vmap``,
  ``check_vma=False``) ``v`` as it is. The transpose of the cast sums the
  devices' cotangents (in float32 for 16-bit ``v``: a 16-bit all-reduce aborted
  XLA:CPU in a shard_map over part of a mesh, jax 0.10.2)."""
  extra = frozenset().union(*(varying_axes(o) for o in others if o is not None))
  if axis_name is not None:
    # Only a shard_map's (manual) mesh axes: a name bound by vmap has no typing.
    mesh = jax.sharding.get_abstract_mesh()
    manual = frozenset() if mesh.empty else frozenset(mesh.manual_axes)
    extra |= manual & ({axis_name} if isinstance(axis_name, str) else set(axis_name))
  extra = tuple(sorted(extra - varying_axes(v)))
  if not extra:
    return v
  wide = lax.pcast(v.astype(compute_dtype(v.dtype)), extra, to="varying")
  return wide.astype(v.dtype) if wide.dtype != v.dtype else wide


def summed_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """A custom_vjp rule's cotangent ``ct`` for ``primal``, summed over the mesh axes
  that ``ct`` varies over and ``primal`` does not (inside a ``shard_map``): an
  input that is the same on every device (the fused loss's replicated weights)
  met varying ones in the forward, and its cotangent is the sum of the devices'
  parts (the transpose of that implicit ``pvary``). The rule must return the
  primal's type, which JAX checks. (The other ops cast such inputs with
  ``varying_like`` before their custom_vjp instead, whose transpose is the sum;
  a weight matrix is not cast, which for 16-bit weights would convert them.)"""
  extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
  return psum_wide(ct, extra).astype(ct.dtype) if extra else ct


def psum_wide(v: jax.Array, axis_name: AxisName) -> jax.Array:
  """``lax.psum`` in the compute dtype (float32 for 16-bit ``v``), returned in it.
  More exact for 16-bit parts; and a bfloat16 all-reduce in a ``shard_map`` that
  leaves a mesh axis to the partitioner aborted XLA:CPU (jax 0.10.2: "Invalid
  binary instruction opcode copy")."""
  return lax.psum(v.astype(compute_dtype(v.dtype)), axis_name)


def _bound(axis_name: AxisName) -> bool:
  """Whether ``axis_name`` is in scope (a backward under ``vmap`` runs outside it)."""
  try:
    lax.axis_size(axis_name)
  except NameError:
    return False
  return True


def varying_axes(v: jax.Array) -> frozenset[str]:
  """The manual mesh axes along which ``v`` is typed varying (empty outside shard_map)."""
  aval = jax.typeof(v)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def log_normalizer(m: jax.Array, d: jax.Array) -> jax.Array:
  """``lse = m + log(d)``: -inf for an empty slice (``d == 0``)."""
  return m + jnp.log(d)


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(hi, lo)`` with ``hi = fl(a + b)`` and ``hi + lo = a + b`` exactly (Knuth's
  TwoSum: no condition on the magnitudes). Non-finite input makes ``lo`` NaN or
  infinite: callers keep ``hi`` only where that matters."""
  hi = a + b
  bb = hi - a
  return hi, (a - (hi - bb)) + (b - bb)
