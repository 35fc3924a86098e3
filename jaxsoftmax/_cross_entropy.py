"""softmax_cross_entropy and its integer-label twin: custom_vjp cores with analytic rules.

Both losses keep, for the backward pass, only the logits (in their own dtype),
two numbers per example, the shift ``m`` and ``log d`` (``lse = m + log d``;
float32 for 16- and 32-bit logits), the labels and the mask. The backward
recomputes ``p = exp((x - m) - log d)`` in float32 (exact ``x - m``, where
``exp(x - lse)`` would carry the rounding of ``lse``) and returns the gradient in
the logits' dtype.

Notation used in the comments: ``x`` the logits, ``w`` the mask, ``t`` the
(smoothed) target over the class axes, ``n`` the number of classes in the
slice (those ``w`` keeps), ``p = softmax_w(x)`` and ``l = log_softmax_w(x)``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from . import _backend, _explicit
from ._checks import (
  Axis,
  AxisName,
  check_axis_name,
  check_implementation,
  check_where,
  class_ids,
  compiled_when_eager,
  compute_dtype,
  float_input,
  float_option,
  integer_labels,
  nan_free_intermediates,
  normalize_axes,
)
from ._stats import (
  finite_shift,
  log_normalizer,
  masked,
  nan_at,
  per_slice,
  psum_wide,
  read_apart,
  slice_stats,
  slice_sum,
  sum_exp,
  sums_in_pieces,
  total_cotangent,
  varying_like,
)


class _Static(NamedTuple):
  """The hashable, static part of a call (``nondiff_argnums`` of the cores)."""

  axes: tuple[int, ...]  # the class axes, sorted
  order: tuple[int, ...]  # the class axes in the order given: flat label index order
  axis_name: AxisName
  label_smoothing: float
  z_loss: float
  # The backend whose ``row_stats`` the forward reads (``_backend.resolve``):
  # "xla" computes the statistics inline, fused with the rest of the loss.
  backend: str = "xla"
  # The size of ``axis_name`` (1 without it), taken where the name is bound: under
  # ``vmap`` with an axis name the backward runs outside its scope.
  axis_size: int = 1


# --- Argument checks ---------------------------------------------------------------


def _logits(fn: str, logits: ArrayLike) -> jax.Array:
  dtype = jnp.result_type(logits) if hasattr(logits, "dtype") else None
  if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      f"{fn}: `logits` must have a floating dtype, got {dtype}; cast integer logits "
      "to a float dtype explicitly."
    )
  if isinstance(logits, int | bool):
    raise TypeError(f"{fn}: `logits` must be a floating array, got the int {logits!r}.")
  x = float_input(fn, "logits", logits)
  return x


def _with_backend(fn, implementation, x, where, st: _Static, cdt) -> _Static:
  """``st`` with the backend that ``implementation`` resolves to for this call,
  which computes in ``cdt``. The kernels' statistics are float32: a float64
  loss (float32 logits, float64 soft labels) takes XLA, or raises for "pallas"."""
  implementation = check_implementation(fn, implementation)
  if cdt != compute_dtype(x.dtype):
    if implementation == "pallas":
      raise ValueError(
        f"{fn}: implementation='pallas' cannot run this call: the kernel computes the "
        f"statistics in {compute_dtype(x.dtype)}, and `labels` make the loss {cdt}; "
        "pass labels in the logits' dtype, or implementation='xla'."
      )
    return st
  # A mask of one flag per example empties its statistics after the kernel
  # (``ops.row_stats``): only a mask over the classes costs a pass before it.
  if per_slice(where, st.axes):
    where = None
  return st._replace(backend=_backend.resolve(fn, implementation, x, st.axes, st.axis_name, where))


def _static(fn, x, axis, axis_name, label_smoothing, z_loss) -> _Static:
  axes = normalize_axes(fn, axis, x.ndim)
  if axis is None:
    order = axes
  else:
    given = tuple(axis) if isinstance(axis, list | tuple) else (axis,)
    order = tuple(int(a) % x.ndim for a in given)
  axis_name = check_axis_name(fn, axis_name)
  return _Static(
    axes,
    order,
    axis_name,
    float_option(fn, "label_smoothing", label_smoothing, 0.0, 1.0),
    float_option(fn, "z_loss", z_loss, 0.0, math.inf),
    axis_size=1 if axis_name is None else lax.axis_size(axis_name),
  )


def _where(fn: str, where, shape: tuple[int, ...], axes: tuple[int, ...]):
  """optax's rule: a mask with fewer dims than the logits is per example (batch shape)."""
  if where is None:
    return None
  where = jnp.asarray(where)
  batch_ndim = len(shape) - len(axes)
  if where.ndim == batch_ndim:
    batch = _batch_shape(shape, axes)
    if not _broadcasts_to(where.shape, batch):
      raise ValueError(
        f"{fn}: `where` with shape {where.shape} (one flag per example) does not broadcast "
        f"to the batch shape {batch} (logits {shape} without `axis`)."
      )
    where = jnp.expand_dims(where, axes)
  elif where.ndim != len(shape):
    raise ValueError(
      f"{fn}: `where` with shape {where.shape} must have ndim {len(shape)} (a mask over the "
      f"logits, shape {shape}) or ndim {batch_ndim} (one flag per example)."
    )
  return check_where(fn, where, shape)


def _batch_shape(shape, axes):
  return tuple(n for i, n in enumerate(shape) if i not in axes)


def _broadcasts_to(shape, target) -> bool:
  try:
    return jnp.broadcast_shapes(shape, target) == tuple(target)
  except ValueError:
    return False


def _check_labels_shape(fn, labels, target, what):
  if not _broadcasts_to(labels.shape, target):
    raise ValueError(
      f"{fn}: `labels` with shape {labels.shape} does not broadcast to {what} {tuple(target)}."
    )


# --- Shared pieces of both cores ---------------------------------------------------


def _stats(x, where, st: _Static, cdt, select_free: bool = False):
  """``xs`` (masked, in ``cdt``), the shift ``m``, ``log d`` (0 for an empty slice),
  ``lse`` (-inf for an empty slice, NaN for a slice holding +inf or NaN) and ``d``.

  The shared ``slice_stats`` takes the max on the narrow input and fuses it
  with the ``exp`` pass; ``m`` is any finite number for an empty slice.
  ``select_free`` takes ``log max(d, 1)`` for ``log d`` (the same, as ``d >= 1``
  in a live slice) rather than a select, for `_soft_unguarded_first`.
  """
  if st.backend != "xla":
    xs, m, d = _kernel_stats(x, where, st, cdt)
  else:
    if compute_dtype(x.dtype) != cdt:
      x = x.astype(cdt)
    xs, m, _, d, _ = slice_stats(x, where, st.axes, st.axis_name)
  if select_free:
    log_d = jnp.log(jnp.maximum(d, 1.0))
  else:
    log_d = jnp.where(d == 0, jnp.zeros_like(d), jnp.log(d))
  return xs, m, log_d, log_normalizer(m, d), d


def _kernel_stats(x, where, st: _Static, cdt):
  """``(xs, m, d)`` as ``_stats`` takes them from ``slice_stats``, with ``m`` and ``d``
  from the backend's ``row_stats``: a Pallas kernel that reads the logits once,
  in their own dtype (after a pass that applies a ``where`` over the classes or
  moves the class axes last, if needed), and writes the two float32 statistics
  per example. ``xs`` is then only built where the loss reads it again (soft
  labels, label smoothing). An empty slice's max is -inf: its shift is 0."""
  m, d = _backend.get(st.backend).row_stats(x, where, st.axes, st.axis_name)
  return masked(x.astype(cdt), where), finite_shift(m).astype(cdt), d.astype(cdt)


def _num_classes(where, shape, st: _Static, dtype):
  """``n``: the classes in each slice, those ``where`` keeps (summed across devices)."""
  if where is None:
    return math.prod(shape[a] for a in st.axes) * st.axis_size
  w = jnp.broadcast_to(where, shape).astype(dtype)
  return slice_sum(w, st.axes, st.axis_name)


def _saved(shift, d, lse):
  """The per-example statistics the backward keeps: ``(shift, 1 / d)``, not ``lse``
  or ``log d``. The backward's ``p = exp(x - shift) * (1 / d)`` is then exact to
  about an ulp (``x - shift`` is exact near the max), where ``exp(x - lse)``
  carries the rounding of ``lse = shift + log d`` at the scale of the logits
  (1e-4 relative in the gradient at logits near 3e4 in float32), and ``exp((x -
  shift) - log d)`` that of ``log d`` and of the difference, ``|log p|`` ulps
  (30-60 at small probabilities). ``1 / d`` lies in (0, 1] in a live slice (the
  max contributes 1 to ``d``), so an empty slice (``lse = -inf``) is marked by
  -1; its shift is finite."""
  return shift, jnp.where(lse == -jnp.inf, -1.0, 1 / jnp.maximum(d, 1.0))


def _unsaved(stats):
  """``(shift, 1 / d, log d, live, lse)`` from ``_saved``'s pair, with ``1 / d`` and
  ``log d`` 0 and ``lse`` 0 for an empty slice. (NaN is not < 0: a slice with +inf
  or NaN counts as live and stays NaN.)"""
  shift, r = stats
  live = ~(r < 0)
  log_d = -jnp.log(jnp.where(live, r, 1.0))
  return shift, jnp.maximum(r, 0.0), log_d, live, jnp.where(live, shift + log_d, 0.0)


def _shifted(x, where, shift, cdt):
  """``x - shift`` (masked, exact near the max): -inf on an empty slice, whose
  entries are all -inf and whose shift is finite."""
  return masked(x.astype(cdt), where) - shift


def _finite_lse(lse):
  """``lse`` with 0 for an empty slice (-inf)."""
  return jnp.where(lse != -jnp.inf, lse, jnp.zeros_like(lse))


def _squeeze(v, axes):
  return jnp.squeeze(v, axes)


# --- Soft labels ---------------------------------------------------------------------


@compiled_when_eager("axis", "label_smoothing", "z_loss", "axis_name", "implementation")
def softmax_cross_entropy(
  logits: ArrayLike,
  labels: ArrayLike,
  axis: Axis = -1,
  where: ArrayLike | None = None,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  axis_name: AxisName = None,
  implementation: str | None = None,
) -> jax.Array:
  r"""Softmax cross-entropy against soft labels, with an analytic VJP for both arguments.

  .. math::
    \ell = -\sum_j t_j \log \mathrm{softmax}(x)_j + z \cdot \mathrm{lse}(x)^2,
    \qquad t = (1 - \varepsilon)\, y + \varepsilon / n

  A drop-in replacement for :func:`optax.softmax_cross_entropy`, with the same
  shapes, ``axis`` and ``where`` semantics; a fully masked example gives 0.
  ``label_smoothing`` (:math:`\varepsilon`) follows PyTorch's
  ``F.cross_entropy``; ``n`` is the number of classes in the slice (those that
  ``where`` keeps). ``z_loss`` (:math:`z`) adds ``z * logsumexp(x)**2`` as in
  PaLM and T5X.

  The custom VJP keeps the logits, the labels and two numbers per example (the
  shift and log-normaliser of its softmax), and computes, in float32 for 16-bit
  logits:

  * ``d logits = g * (softmax(x) * (sum(t) + 2 z lse) - t)``;
  * ``d labels = -(1 - eps) * g * log_softmax(x)`` (soft labels are
    differentiable, e.g. for distillation); 0 where ``g`` is 0 or ``where`` is
    False.

  Unlike optax, an entry whose label weight ``t`` is 0 contributes exactly 0 to
  the loss and to the logits' gradient, even where its logit is -inf (optax gives
  NaN). The label's gradient there is ``+inf * g``, the true derivative.

  Args:
    logits: unnormalised log-probabilities, a floating array (integer logits
      raise ``TypeError``).
    labels: the target distribution, broadcastable to ``logits.shape``; integer
      or boolean labels are cast to the logits' dtype.
    axis: the class axis or axes: an int, a tuple of ints or None (all axes).
    where: optional boolean mask, either broadcastable to ``logits.shape``
      (masked classes are left out of the softmax and of the sum) or of the
      batch shape (``logits`` with ``axis`` removed: masked examples give 0).
    label_smoothing: :math:`\varepsilon \in [0, 1]`, a Python float.
    z_loss: :math:`z \ge 0`, a Python float.
    axis_name: mesh axis name(s) over which the class axis is split, inside
      ``shard_map``; the loss is then over the global class axis.
    implementation: ``None``, ``"xla"`` or ``"pallas"``. With ``"pallas"``
      each example's max and normaliser come from a Pallas kernel that reads
      the logits once (GPU and TPU, float32, bfloat16 and float16, no
      ``axis_name``, not a float64 loss; it raises ``ValueError`` where it
      cannot run, saying why; a ``where`` over the classes, or class axes
      other than the last, cost an XLA pass before it); the rest of the loss
      and the whole backward stay on XLA. ``None`` takes the kernel on a
      Hopper GPU for at least 128 examples of at least 64000 bytes of logits
      (32000 bfloat16 classes), class axes last, and no mask over the classes
      (where it measured faster than XLA and optax); XLA otherwise.

  Returns:
    The loss per example, shape ``logits.shape`` with ``axis`` removed, in
    ``result_type(logits, labels)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxsoftmax
    >>> logits = jnp.array([[0.0, jnp.log(3.0)], [0.0, 0.0]])
    >>> jaxsoftmax.softmax_cross_entropy(logits, jnp.array([[0.0, 1.0], [0.5, 0.5]])).round(4)
    Array([0.2877, 0.6931], dtype=float32)
  """
  fn = "softmax_cross_entropy"
  x = _logits(fn, logits)
  st = _static(fn, x, axis, axis_name, label_smoothing, z_loss)
  y = _soft_labels(fn, labels, x)
  where = _where(fn, where, x.shape, st.axes)
  lay = _explicit.layout(x)
  if lay is not None:
    y_dims = range(x.ndim - y.ndim, x.ndim)  # labels broadcast right-aligned
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss, implementation=implementation)
    return _by_block(softmax_cross_entropy, x, y, y_dims, where, axis, st, lay, options)
  st = _with_backend(fn, implementation, x, where, st, compute_dtype(jnp.result_type(x, y)))
  # (Inside a shard_map, each differentiable input typed varying over every mesh
  # axis the loss varies over: the labels', the mask's, the other input's, and
  # axis_name's, where logits the same on every device of the class axis are
  # each device's own block. The casts' transposes sum the devices' cotangents.)
  x = varying_like(x, y, where, axis_name=st.axis_name)
  return _soft_ce(x, varying_like(y, x), where, st)


def _by_block(op, x, labels, label_dims, where, axis, st: _Static, lay, options, one_axis=False):
  """``op`` on each device's block of an explicitly sharded ``x`` (``_explicit``):
  the mesh axes that split the class axes become ``axis_name``, the others map
  the examples. ``label_dims`` are the dims of ``x`` that the labels' dims line
  up with. ``one_axis``: the loss takes ``axis_name`` with one class axis only,
  so classes split over several axes are gathered first."""
  split = _explicit.axis_names(lay.spec, st.axes)
  if one_axis and split and len(st.axes) > 1:
    spec = tuple(None if d in st.axes else e for d, e in enumerate(lay.spec))
    x = _explicit.reshard(x, lay.mesh, P(*spec))
    lay, split = lay._replace(spec=spec), ()
  inner = _explicit.with_names(st.axis_name, split)
  batch = P(*(e for d, e in enumerate(lay.spec) if d not in st.axes))
  specs = (
    P(*lay.spec),
    _explicit.operand_spec(labels.shape, label_dims, lay, x.shape),
    None if where is None else _explicit.operand_spec(where.shape, range(x.ndim), lay, x.shape),
  )

  def block(xb, yb, wb):
    return op(xb, yb, axis=axis, where=wb, axis_name=inner, **options)

  if all(e is None for e in lay.spec):  # nothing left split: one block
    whole = (a if a is None else _explicit.reshard(a, lay.mesh, P()) for a in (x, labels, where))
    return block(*whole)
  return _explicit.run(block, lay, (x, labels, where), specs, batch)


def _soft_labels(fn, labels, x):
  if not hasattr(labels, "dtype") and not isinstance(labels, int | float):
    labels = jnp.asarray(labels)
  dtype = jnp.result_type(labels)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(f"{fn}: `labels` has complex dtype {dtype}; expected a real dtype.")
  y = jnp.asarray(labels)
  if not jnp.issubdtype(dtype, jnp.floating):
    y = y.astype(x.dtype)
  _check_labels_shape(fn, y, x.shape, "the logits' shape")
  return y


def _soft_target(y, where, st: _Static, shape, cdt):
  """``t = (1 - eps) y + eps / n`` on the classes ``where`` keeps, 0 elsewhere."""
  t = y.astype(cdt)
  eps = st.label_smoothing
  if eps:
    n = _num_classes(where, shape, st, cdt)
    t = (1.0 - eps) * t + eps / jnp.maximum(n, 1)
  return masked(jnp.broadcast_to(t, shape), where, 0.0)


def _soft_forward(x, y, where, st: _Static):
  xla = st.backend == "xla"
  if (
    xla
    and where is None
    and st.axis_name is None
    and not sums_in_pieces(x.shape, st.axes)
    and not nan_free_intermediates()
  ):
    # On the CPU only (as for integer labels: a GPU runs a lax.cond by copying
    # its predicate to the host): the unguarded sum first. Not for rows that
    # sum_exp cuts in pieces: there it measured slower than the guarded sum.
    return lax.platform_dependent(
      cpu=lambda: _soft_unguarded_first(x, y, st), default=lambda: _soft_loss(x, y, where, st)
    )
  return _soft_loss(x, y, where, st)


def _soft_loss(x, y, where, st: _Static, guard: bool = True):
  cdt = compute_dtype(jnp.result_type(x, y))
  xs, m, log_d, lse, d = _stats(x, where, st, cdt, select_free=not guard)
  t = _soft_target(y, where, st, x.shape, cdt)
  # loss = -sum(t * l), l = (x - m) - log d: the shifted form keeps x - m exact.
  # A term with t == 0 is 0 even at a -inf logit (0 * -inf would be NaN): l is
  # replaced before the product, which then makes no NaN that is not in the loss.
  l = (xs - m) - log_d
  tl = t * (jnp.where(t == 0, jnp.zeros_like(l), l) if guard else l)
  loss = -slice_sum(tl, st.axes, st.axis_name)
  return _add_z_loss(loss, lse, st), (lse, _saved(m, d, lse))


def _soft_unguarded_first(x, y, st: _Static):
  """``_soft_loss`` without the ``t == 0`` guard, redone with it if any loss is NaN.

  XLA:CPU fuses the max, the exp-sum and the label-weighted sum into one
  YNNPACK reduction, but not a compare or a select: the guard makes it write
  two full-size intermediates (the forward took 2.4x optax's time at 4096 x
  32768 float32), and the select in ``log d`` splits the reductions too. Both
  go here; the README has the measurements. Without the guard a loss is NaN only where the guard
  matters (a zero label on a -inf logit) or where the input has NaN or +inf,
  which the guarded recomputation (a ``lax.cond``: the usual case pays nothing
  for it) gives NaN again.
  """
  loss, stats = _soft_loss(x, y, None, st, guard=False)
  redo = jnp.any(jnp.isnan(loss))
  return lax.cond(redo, lambda: _soft_loss(x, y, None, st), lambda: (loss, stats))


def _add_z_loss(loss, lse, st: _Static):
  if not st.z_loss:
    return loss
  lse = _finite_lse(lse)
  # (z lse) lse: lse**2 first would overflow float32 from lse ~ 1.8e19, where the
  # scaled term may not.
  return loss + (st.z_loss * lse) * lse


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _soft_ce(x, y, where, st: _Static):
  loss, _ = _soft_forward(x, y, where, st)
  return _squeeze(loss, st.axes).astype(jnp.result_type(x, y))


def _soft_ce_fwd(x, y, where, st: _Static):
  loss, stats = _soft_forward(x, y, where, st)
  # Residuals: the logits (own dtype) and labels (own shape) the backward reads,
  # the mask, and per example the shift and log d (compute dtype, ``_saved``).
  return _squeeze(loss, st.axes).astype(jnp.result_type(x, y)), (x, y, where, stats[1])


def _soft_ce_bwd(st: _Static, res, g):
  # dx = g * (p * (sum(t) + 2 z lse) - t);  dy = -(1 - eps) * g * l
  x, y, where, stats = res
  x = read_apart(x)
  cdt = compute_dtype(jnp.result_type(x, y))
  shift, r, log_d, live, lse = _unsaved(stats)
  g = jnp.expand_dims(total_cotangent(g, x, st.axis_name).astype(cdt), st.axes)
  xs = _shifted(x, where, shift, cdt)
  l = xs - log_d
  t = _soft_target(y, where, st, x.shape, cdt)
  coef = slice_sum(t, st.axes, st.axis_name)
  if st.z_loss:
    coef = coef + 2.0 * st.z_loss * lse
  # An empty slice (p == 0) gets a zero gradient: g is zeroed per row, which
  # fuses into the same pass (a full-size select would be a pass of its own).
  dx = jnp.where(live, g, jnp.zeros_like(g)) * (jnp.exp(xs) * (r * coef) - t)
  # d loss / d y is 0 at masked classes (where l is -inf) and where g == 0, also
  # at a -inf logit: there l is replaced by 0 before the product, not only the
  # product after it, so that differentiating this rule again (with respect to g)
  # meets no 0 * -inf. A finite l is kept where g == 0: its derivative with
  # respect to g is -(1 - eps) l.
  l0 = jnp.where((g == 0) & ~jnp.isfinite(l), jnp.zeros_like(l), masked(l, where, 0.0))
  dy = masked(-(1.0 - st.label_smoothing) * g * l0, where, 0.0)
  if st.label_smoothing == 1:  # the loss does not depend on y (0 * -inf would be NaN)
    dy = jnp.zeros_like(dy)
  return dx.astype(x.dtype), _sum_to_shape(dy, y.shape).astype(y.dtype), None


_soft_ce.defvjp(_soft_ce_fwd, _soft_ce_bwd)


def _sum_to_shape(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Reverses the broadcast of an array of ``shape`` to ``v.shape``."""
  lead = v.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
    lead + i for i, n in enumerate(shape) if n == 1 and v.shape[lead + i] != 1
  )
  return jnp.sum(v, axes, keepdims=True).reshape(shape) if axes else v


# --- Integer labels ------------------------------------------------------------------


@compiled_when_eager("axis", "label_smoothing", "z_loss", "axis_name", "implementation")
def softmax_cross_entropy_with_integer_labels(
  logits: ArrayLike,
  labels: ArrayLike,
  axis: Axis = -1,
  where: ArrayLike | None = None,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  axis_name: AxisName = None,
  implementation: str | None = None,
) -> jax.Array:
  r"""Softmax cross-entropy against integer class labels, with an analytic VJP.

  .. math::
    \ell = \mathrm{lse}_w(x) - (1 - \varepsilon)\, x_y
      - \frac{\varepsilon}{n} \sum_{j \in w} x_j + z \cdot \mathrm{lse}_w(x)^2

  A drop-in replacement for :func:`optax.softmax_cross_entropy_with_integer_labels`
  with the same shapes, ``axis`` and ``where`` semantics: over a tuple ``axis``
  a label is the flat (row-major) index over those axes, in the order given; a
  fully masked example gives 0; a label at a class that ``where`` masks
  contributes its logit, as in optax. ``label_smoothing`` and ``z_loss`` are as
  in :func:`softmax_cross_entropy`.

  A label outside ``[0, num_classes)``, negative ones included, gives a NaN
  loss (and gradient, unless its cotangent is 0, as for a loss masked after the
  call) for that example only; it never picks another class
  (optax wraps -1 to the last class). Examples masked out entirely by
  ``where`` give 0 whatever their label, so padding can carry any label.

  The custom VJP keeps the logits, the labels and two numbers per example (the
  shift and log-normaliser of its softmax), and computes
  ``d logits = g * (softmax(x) * (1 + 2 z lse) - t)``,
  with ``t`` the smoothed one-hot target, in float32 for 16-bit logits. The
  labels get no cotangent.

  On the CPU, with one class axis and no ``where``, the forward reads the
  logits once: the label's own logit is the shift, and a batch in which that
  overflows (a logit more than about 88 above the label's, in float32) or that
  holds +inf or NaN is recomputed with the max shift instead (a ``lax.cond``).

  Args:
    logits: unnormalised log-probabilities, a floating array.
    labels: integer class ids, broadcastable to the batch shape (``logits``
      with ``axis`` removed). Float labels raise ``TypeError``.
    axis: the class axis or axes: an int, a tuple of ints or None.
    where: optional boolean mask, broadcastable to ``logits.shape`` or of the
      batch shape (one flag per example).
    label_smoothing: :math:`\varepsilon \in [0, 1]`, a Python float.
    z_loss: :math:`z \ge 0`, a Python float.
    axis_name: mesh axis name(s) over which the (single) class axis is split,
      inside ``shard_map`` (vocabulary parallelism): device ``i`` holds classes
      ``[i * V, (i + 1) * V)``; labels are global class ids.
    implementation: ``None``, ``"xla"`` or ``"pallas"``, as in
      :func:`softmax_cross_entropy`.

  Returns:
    The loss per example, shape ``logits.shape`` with ``axis`` removed, in the
    logits' dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxsoftmax
    >>> logits = jnp.array([[0.0, jnp.log(3.0)], [0.0, 0.0]])
    >>> jaxsoftmax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 0])).round(4)
    Array([0.2877, 0.6931], dtype=float32)
    >>> jaxsoftmax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 2])).round(4)
    Array([0.2877,    nan], dtype=float32)
  """
  fn = "softmax_cross_entropy_with_integer_labels"
  x = _logits(fn, logits)
  st = _static(fn, x, axis, axis_name, label_smoothing, z_loss)
  labels = _int_labels(fn, labels, x, st)
  where = _where(fn, where, x.shape, st.axes)
  lay = _explicit.layout(x)
  if lay is not None:
    batch_dims = tuple(d for d in range(x.ndim) if d not in st.axes)
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss, implementation=implementation)
    return _by_block(
      softmax_cross_entropy_with_integer_labels,
      x,
      labels,
      batch_dims,
      where,
      axis,
      st,
      lay,
      options,
      one_axis=True,
    )
  st = _with_backend(fn, implementation, x, where, st, compute_dtype(x.dtype))
  # (Inside a shard_map: the logits typed varying as the loss is, see
  # `softmax_cross_entropy`.)
  return _int_ce(varying_like(x, labels, where, axis_name=st.axis_name), labels, where, st)


def _int_labels(fn, labels, x, st: _Static):
  labels = integer_labels(fn, labels, "for probabilities use `softmax_cross_entropy`")
  if math.prod(x.shape[a] for a in st.axes) == 0:
    raise ValueError(
      f"{fn}: `logits` with shape {x.shape} has no classes along axis {st.order}; an "
      "integer label needs at least one class."
    )
  batch = _batch_shape(x.shape, st.axes)
  _check_labels_shape(fn, labels, batch, "the batch shape (logits without `axis`)")
  if st.axis_name is not None and len(st.axes) != 1:
    raise ValueError(
      f"{fn}: with `axis_name`, `axis` must be a single class axis, got axes {st.axes}."
    )
  # Labels in batch ndim, then with a 1 at each class axis, to broadcast against x.
  labels = labels.reshape((1,) * (len(batch) - labels.ndim) + labels.shape)
  return labels


def _label_index(labels, shape, st: _Static):
  """The labels with a 1 at each class axis, as indices into this device's classes,
  and ``valid`` per example. An invalid label becomes 0 (never wraps into range)."""
  y = jnp.expand_dims(labels, st.axes)
  local = math.prod(shape[a] for a in st.axes)
  ids, valid = class_ids(y, local * st.axis_size)
  y = jnp.where(valid, ids, jnp.zeros_like(ids))
  if st.axis_name is not None:
    # Vocabulary parallelism: this device holds global classes [i * local, (i + 1) * local).
    y = y - lax.axis_index(st.axis_name).astype(y.dtype) * local
  return y, valid


def _one_hot(y, shape, st: _Static):
  """``y`` one-hot over the class axes (bool, broadcastable to ``shape``); a tuple
  axis is indexed flat, row-major in the order the axes were given (as optax)."""
  bshape = tuple(n if i in st.axes else 1 for i, n in enumerate(shape))
  flat, stride = jnp.zeros(bshape, y.dtype), 1
  for a in reversed(st.order):
    flat = flat + lax.broadcasted_iota(y.dtype, bshape, a) * stride
    stride *= shape[a]
  return flat == y


def _label_logit(x, y, st: _Static):
  """``x`` at the label, keepdims (summed across devices: only its owner has it)."""
  if len(st.axes) > 1:
    return slice_sum(jnp.where(_one_hot(y, x.shape, st), x, 0), st.axes, st.axis_name)
  (a,) = st.axes
  y = jnp.broadcast_to(y, x.shape[:a] + (1,) + x.shape[a + 1 :])
  if st.axis_name is None:
    return jnp.take_along_axis(x, y, a, mode="clip")
  own = (y >= 0) & (y < x.shape[a])
  x_y = jnp.take_along_axis(x, jnp.where(own, y, 0), a, mode="clip")
  # (Returned in the compute dtype; exact either way: one term is not 0.)
  return psum_wide(jnp.where(own, x_y, 0), st.axis_name)


def _int_forward(x, labels, where, st: _Static):
  cdt = compute_dtype(x.dtype)
  y, valid = _label_index(labels, x.shape, st)
  # x_y is the raw logit, masked or not (optax takes it the same way), gathered,
  # not a full pass.
  x_y = _label_logit(read_apart(x), y, st).astype(cdt)
  eps = st.label_smoothing

  def shifted_by_max():
    # nll = log d - (1 - eps) (x_y - m) - eps / n * sum_w (x - m)
    xs, m, log_d, lse, d = _stats(x, where, st, cdt)
    # (With eps = 1 the label's term is gone, not 0 * (x_y - m): NaN at x_y = -inf.)
    nll = log_d - (1.0 - eps) * (x_y - m) if eps < 1 else log_d
    if where is not None and not eps:
      # A label at a masked class beside kept classes that are all -inf: lse - x_y
      # is -inf, where m - x_y would be finite (m is any finite number there).
      nll = jnp.where((lse == -jnp.inf) & (x_y > -jnp.inf), -jnp.inf, nll)
    if eps:
      # mean_w(x - m), each term divided by n before the sum: a sum of the terms
      # could overflow where their mean does not (logits near float max).
      n = _num_classes(where, x.shape, st, cdt)
      scaled = masked((xs - m) * (1 / jnp.maximum(n, 1)), where, 0.0)
      nll = nll - eps * slice_sum(scaled, st.axes, st.axis_name)
    return nll, (lse, _saved(m, d, lse))

  if (
    st.backend == "xla"
    and where is None
    and st.axis_name is None
    and len(st.axes) == 1
    and not nan_free_intermediates()
  ):
    # On the CPU only: there it saves a pass over x (measured, see the README);
    # a GPU runs a lax.cond by copying its predicate to the host, a sync per call.
    nll, stats = lax.platform_dependent(
      cpu=lambda: _shifted_by_label(x, x_y, st, cdt, shifted_by_max), default=shifted_by_max
    )
  else:
    nll, stats = shifted_by_max()
  loss = _add_z_loss(nll, stats[0], st)
  if where is None:
    loss = nan_at(~valid, loss)
  else:
    # NaN for an invalid label only where the example keeps a class: padding
    # (label -100 under a mask of the batch shape) makes none, even in between.
    kept = _num_classes(where, x.shape, st, cdt) > 0
    loss = jnp.where(kept, nan_at(~valid & kept, loss), jnp.zeros_like(loss))
    # An example that `where` leaves no class is marked for the backward, which
    # gives it a zero gradient whatever its label (padding); one whose kept
    # classes are all -inf is only empty, as without `where`.
    lse, (shift, r) = stats
    stats = (lse, (shift, jnp.where(kept, r, _NOTHING_KEPT)))
  return loss, stats, jnp.where(valid, y, _NO_CLASS(y.dtype))


# The saved 1 / d of an example that `where` leaves no class (an empty slice has
# -1, ``_saved``; a live one 1 / d in (0, 1]).
_NOTHING_KEPT = -2.0


def _shifted_by_label(x, x_y, st: _Static, cdt, shifted_by_max):
  """``(nll, (lse, (x_y, log s)))`` in one pass over ``x``, with the label's logit
  as the shift.

  ``s = sum(exp(x - x_y))`` holds the label's own ``exp(0) = 1``, so it cannot
  underflow, and then ``nll = log s - eps * mean(x - x_y)`` and
  ``lse = x_y + log s``, with no max pass. It overflows only when some logit
  exceeds the label's by more than about 88 (float32), and is NaN if the slice
  holds +inf or NaN or the label's logit is -inf: if any example of the batch
  does that, the whole batch takes the max-shifted path instead (a
  ``lax.cond``, so the usual case pays nothing for it; under ``vmap`` a
  batched predicate makes it a select that computes both).
  """
  xs = x.astype(cdt)
  s = sum_exp(xs, x_y, st.axes)
  log_s = jnp.log(s)
  nll = log_s
  if st.label_smoothing:
    # mean(x - x_y), not mean(x) - x_y: x - x_y is exact near x_y, where a sum of
    # raw logits far from 0 carries their rounding (388 eps at logits near 3e4),
    # and each term is divided by n first, so that the sum cannot overflow
    # where the mean does not.
    n = _num_classes(None, x.shape, st, cdt)
    nll = nll - st.label_smoothing * jnp.sum((xs - x_y) * (1 / n), st.axes, keepdims=True)
  # s >= 1 or NaN: its max is finite iff every example is.
  stats = (x_y + log_s, (x_y, 1 / s))  # s >= 1: never an empty slice's -1
  return lax.cond(jnp.max(s, initial=1.0) < jnp.inf, lambda: (nll, stats), shifted_by_max)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _int_ce(x, labels, where, st: _Static):
  loss, _, _ = _int_forward(x, labels, where, st)
  return _squeeze(loss, st.axes).astype(x.dtype)


def _int_ce_fwd(x, labels, where, st: _Static):
  loss, stats, y = _int_forward(x, labels, where, st)
  # Residuals: the logits (own dtype), the labels as this device's class indices
  # (int32, an invalid one as `_NO_CLASS`: the backward needs no `axis_index`,
  # which cannot be bound where it runs outside the name's scope, under `vmap`
  # with an axis name) and the mask (small), and per example the shift and log d
  # (compute dtype, ``_saved``: an empty slice's gradient is 0).
  return _squeeze(loss, st.axes).astype(x.dtype), (x, _squeeze(y, st.axes), where, stats[1])


def _NO_CLASS(dtype):  # noqa: N802
  """An index no device's class has: local indices lie in (-total, total)."""
  return jnp.array(jnp.iinfo(dtype).min, dtype)


def _int_ce_bwd(st: _Static, res, g):
  # dx = g * (p * (1 + 2 z lse) - t); no collective unless where and label_smoothing
  # (or, without varying-axes typing, the cotangent's psum: `total_cotangent`)
  x, y, where, stats = res
  x = read_apart(x)
  cdt = compute_dtype(x.dtype)
  shift, r, _, live, lse0 = _unsaved(stats)
  y = jnp.expand_dims(y, st.axes)
  valid = y != _NO_CLASS(y.dtype)
  y = jnp.where(valid, y, jnp.zeros_like(y))
  # Per example: NaN for an invalid label, unless its cotangent is 0 (a loss
  # masked after the call, `jnp.where(mask, loss, 0)`: its gradient is 0, as in
  # optax; a constant 0, so that no derivative of this rule picks class 0 for it);
  # 0 for one that `where` leaves no class (padding, whatever its label). Selects
  # on per-example values only: they fuse into the one pass over x, where a
  # full-size select would not.
  g = jnp.expand_dims(total_cotangent(g, x, st.axis_name).astype(cdt), st.axes)
  if where is not None:
    g = jnp.where(stats[1] != _NOTHING_KEPT, g, 0.0)
  g = nan_at(~valid & (g != 0), jnp.where(valid, g, jnp.zeros_like(g)))
  # An empty slice (lse = -inf) gets p = 0 (`_shifted`, r = 0), and `0 * g` elsewhere
  # (0, or NaN for an invalid label, as its loss is).
  eps, z = st.label_smoothing, st.z_loss
  coef = r * (1.0 + 2.0 * z * lse0) if z else r
  spread = eps / jnp.maximum(_num_classes(where, x.shape, st, cdt), 1) if eps else None
  # Without smoothing or z-loss an empty slice's off-label terms are already
  # `0 * g` (p = 0), so the full pass needs no per-example select there.
  g_rest = g if spread is None and not z else jnp.where(live, g, 0.0 * g)

  def off_label(xv, wv):
    """``g * (p * coef - eps / n)`` (``eps / n`` on kept classes): dx but for the
    label's own ``-(1 - eps) * g``."""
    d = jnp.exp(_shifted(xv, wv, shift, cdt)) * coef
    if spread is not None:
      d = d - masked(jnp.broadcast_to(spread, xv.shape).astype(cdt), wv, 0.0)
    return g_rest * d

  label_term = jnp.where(live, (1.0 - eps) * g, 0.0 * g)
  if len(st.axes) > 1:
    dx = off_label(x, where) - jnp.where(_one_hot(y, x.shape, st), label_term, 0.0)
    return dx.astype(x.dtype), None, None
  # One class axis: the full pass computes the off-label terms only, and a
  # scatter of one value per example then fixes the label's entry in place. This
  # saves the iota/compare/select of a one-hot in the full pass (about a fifth
  # of its time on the CPU).
  (a,) = st.axes
  if x.dtype == cdt:
    # Logits in the compute dtype: add the label's term to the full pass's value
    # (the same arithmetic as setting it, without gathering the logit). XLA:CPU
    # does not run both the full pass and the scatter in place, so x @ w then
    # this loss keeps two [N, V] buffers where a one-hot kept one (README).
    return _put_at_label(off_label(x, where), y, a, -label_term, lax.scatter_add), None, None
  # 16-bit logits: set the label's entry to its value computed in the compute
  # dtype from the gathered logit, so that it is rounded once (adding to the
  # rounded g * p would lose it when p is near 1).
  dx = off_label(x, where).astype(x.dtype)
  w_y = None if where is None else _at_label(jnp.broadcast_to(where, x.shape), y, a)
  at_y = off_label(_at_label(x, y, a), w_y) - label_term
  return _set_bits_at_label(dx, y, at_y.astype(x.dtype), a), None, None


def _at_label(v, y, a):
  """``v`` at the (local) label along axis ``a``, keepdims; clipped if out of range."""
  y = jnp.broadcast_to(y, v.shape[:a] + (1,) + v.shape[a + 1 :])
  return jnp.take_along_axis(v, y, a, mode="clip")


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _set_bits_at_label(dx, y, v, a):
  """``_put_at_label(dx, y, a, v, lax.scatter)`` for 16-bit floats, run on their bit
  patterns (unsigned integers of the same width): XLA:CPU runs a 16-bit float
  scatter in float32, so the backward's full pass was written in float32 and all
  of it converted after the scatter. Differentiated as the float scatter (reverse
  over reverse), not as the bit patterns, which have no derivative."""
  bits = jnp.dtype(f"uint{8 * dx.dtype.itemsize}")
  as_bits = partial(lax.bitcast_convert_type, new_dtype=bits)
  out = _put_at_label(as_bits(dx), y, a, as_bits(v), lax.scatter)
  return lax.bitcast_convert_type(out, dx.dtype)


def _set_bits_at_label_fwd(dx, y, v, a):
  return _set_bits_at_label(dx, y, v, a), (y, jnp.zeros_like(v))


def _set_bits_at_label_bwd(a, res, ct):
  # The float scatter's VJP, which does not depend on the values scattered.
  y, v0 = res
  set_at = lambda d, u: _put_at_label(d, y, a, u, lax.scatter)  # noqa: E731
  d_dx, d_v = jax.vjp(set_at, jnp.zeros_like(ct), v0)[1](ct)
  return d_dx, None, d_v


_set_bits_at_label.defvjp(_set_bits_at_label_fwd, _set_bits_at_label_bwd)


def _put_at_label(dx, y, a, v, scatter):
  """``dx`` with ``v`` (one per example) put at the (local) label along axis ``a`` by
  ``scatter`` (``lax.scatter`` sets, ``lax.scatter_add`` adds); a label outside this
  block (another device's class) writes nothing."""
  bshape = dx.shape[:a] + (1,) + dx.shape[a + 1 :]
  y = jnp.broadcast_to(y, bshape)
  # The counters plus a zero made from y: under vmap over an axis that an
  # explicit mesh splits, an unbatched counter is broadcast unsplit, and
  # stacking it with the split labels is a sharding error.
  zero = y * 0  # (zeros_like would not depend on y: unbatched again)
  idx = [lax.broadcasted_iota(y.dtype, bshape, i) + zero for i in range(dx.ndim)]
  idx[a] = y
  dnums = lax.ScatterDimensionNumbers(
    update_window_dims=(),
    inserted_window_dims=tuple(range(dx.ndim)),
    scatter_dims_to_operand_dims=tuple(range(dx.ndim)),
  )
  return scatter(
    dx,
    jnp.stack(idx, -1),
    jnp.broadcast_to(v, bshape),
    dnums,
    # Row-major index tuples with the label last are in lexicographic order;
    # with a class axis before other axes they are not (the label varies first).
    indices_are_sorted=a == dx.ndim - 1,
    unique_indices=True,
    mode=lax.GatherScatterMode.FILL_OR_DROP,
  )


_int_ce.defvjp(_int_ce_fwd, _int_ce_bwd)
