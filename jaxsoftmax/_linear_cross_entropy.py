"""The fused linear + softmax cross-entropy: ``x @ w`` then cross-entropy, chunk by chunk.

The logits ``x @ w`` are never built in full. The forward walks the vocabulary
in chunks of ``chunk_size`` columns of ``w``, keeps an online log-sum-exp in
float32 (``m``, ``sum(exp(z - m))``) and picks up the label logit on the way.
The backward recomputes each chunk's logits, forms ``dz = g * (softmax - target)``
for that chunk only, and accumulates ``dx`` and ``dw`` from it. The largest
temporaries are a few ``[N, chunk_size]`` float32 blocks.
"""

from __future__ import annotations

import math
import operator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from . import _explicit
from ._checks import (
  check_precision,
  check_where,
  class_ids,
  compiled_when_eager,
  compute_dtype,
  float_input,
  float_option,
  integer_labels,
  static_shape,
)
from ._stats import finite_shift, nan_at, summed_like, varying_axes

REDUCTIONS = ("mean", "sum", "none")

# chunk_size=None: the columns of one chunk's working set, ``(N + H) * C``
# compute-dtype numbers (the logits block plus the slices of w and dw), fit in
# this many bytes; C is a multiple of 128 in [128, V].
_CHUNK_BUDGET_BYTES = 16 * 2**20
_CHUNK_MULTIPLE = 128
# chunk_size=None with a symbolic number of tokens (jax.export): sized for this many.
SYMBOLIC_TOKENS = 8192


def default_chunk_size(n: int, h: int, v: int, itemsize: int = 4) -> int:
  """The chunk size that ``chunk_size=None`` picks for ``N`` tokens, ``H`` features, ``V`` classes.

  The largest multiple of 128 such that ``(N + H) * C * itemsize`` bytes fit in
  16 MiB, clamped to ``[128, V]``; ``itemsize`` is that of the compute dtype (4
  for float32, bfloat16 and float16; 8 for float64).
  """
  c = _CHUNK_BUDGET_BYTES // (max(n + h, 1) * itemsize)
  c = max(_CHUNK_MULTIPLE, c // _CHUNK_MULTIPLE * _CHUNK_MULTIPLE)
  return max(1, min(c, v))


def _check_labels(fn: str, labels: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
  labels = integer_labels(fn, labels, "cast class ids with .astype(jnp.int32)")
  if labels.shape != shape:
    raise ValueError(
      f"{fn}: `labels` has shape {labels.shape}; expected x.shape[:-1] = {shape} "
      "(one class id per row of x)."
    )
  return labels


def _class_ids(labels: jax.Array, v: int) -> jax.Array:
  """The labels as int32 (`class_ids`), with -1 for every label outside ``[0, V)``.
  The core compares labels with a column counter in the labels' dtype: in a
  narrow one the counter would wrap (label 3 would match column 259)."""
  ids, valid = class_ids(labels, v)
  return jnp.where(valid, ids, jnp.array(-1, ids.dtype))


def _check_options(fn, reduction, chunk_size, label_smoothing, z_loss, transpose_w, soft_cap):
  if reduction not in REDUCTIONS:
    raise ValueError(f"{fn}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
  if chunk_size is not None:
    try:
      if isinstance(chunk_size, bool | np.bool_):
        raise TypeError
      chunk_size = operator.index(chunk_size)
    except TypeError:
      raise TypeError(
        f"{fn}: `chunk_size` must be a positive int or None, got {chunk_size!r}."
      ) from None
    if chunk_size < 1:
      raise ValueError(f"{fn}: `chunk_size` must be a positive int or None, got {chunk_size}.")
  label_smoothing = float_option(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
  z_loss = float_option(fn, "z_loss", z_loss, 0.0, math.inf)
  if not isinstance(transpose_w, bool | np.bool_):
    raise TypeError(f"{fn}: `transpose_w` must be a Python bool, got {transpose_w!r}.")
  if soft_cap is not None:
    try:
      cap = float_option(fn, "logits_soft_cap", soft_cap, 0.0, math.inf)
    except ValueError:  # negative or NaN: the message below says what is expected
      cap = math.nan
    if not 0.0 < cap < math.inf:
      raise ValueError(
        f"{fn}: `logits_soft_cap`={soft_cap!r} is out of range; expected None or a positive, "
        "finite float."
      )
    soft_cap = cap
  return chunk_size, label_smoothing, z_loss, bool(transpose_w), soft_cap


@compiled_when_eager(
  "reduction",
  "chunk_size",
  "label_smoothing",
  "z_loss",
  "precision",
  "transpose_w",
  "logits_soft_cap",
)
def linear_softmax_cross_entropy(
  x: ArrayLike,
  w: ArrayLike,
  labels: ArrayLike,
  *,
  where: ArrayLike | None = None,
  reduction: str = "mean",
  chunk_size: int | None = None,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  precision: lax.PrecisionLike = None,
  transpose_w: bool = False,
  logits_soft_cap: float | None = None,
) -> jax.Array:
  r"""Softmax cross-entropy of the logits ``x @ w``, without ever building them.

  .. math::
    \ell_i = \mathrm{lse}_i - (1 - \varepsilon)\, z_{i, y_i}
      - \frac{\varepsilon}{V} \sum_j z_{ij} + \zeta\, \mathrm{lse}_i^2,
    \qquad z = x w, \quad \mathrm{lse}_i = \log \sum_j \exp z_{ij}

  The same per-token loss as
  ``softmax_cross_entropy_with_integer_labels(x @ w, labels, label_smoothing=eps,
  z_loss=zeta)``, computed in chunks of ``chunk_size`` columns of ``w``: the
  forward keeps an online log-sum-exp in float32 and the label logit, and the
  backward recomputes each chunk's logits to accumulate ``dx`` and ``dw``. No
  ``[N, V]`` array exists at any point; the residuals are ``x``, ``w``, the
  labels (as int32), the mask and two float32 numbers per token (the shift of
  its softmax and the reciprocal of its normalizer).

  Label smoothing follows PyTorch (target ``(1 - eps) * onehot + eps / V``) and
  the z-loss is ``z_loss * lse**2`` per token (PaLM/T5X). With
  ``logits_soft_cap=c`` the logits are ``z = c * tanh((x @ w) / c)`` (Gemma 2's
  final-logit soft-capping), applied chunk by chunk as well. With
  ``transpose_w=True``, ``w`` is ``[V, H]`` (a tied embedding table, or a
  PyTorch ``Linear`` weight) and the logits are ``x @ w.T``, without a
  transposed copy of ``w``: the chunks are rows of ``w``, and ``dw`` comes back
  ``[V, H]``.

  * Tokens where ``where`` is False contribute 0 to the loss and receive exactly
    zero gradient, whatever their label (so padding may carry any label, e.g.
    -100). ``"mean"`` divides by the number of included tokens, and is 0 (with
    zero gradients), not NaN, when no token is included.
  * An included token whose label lies outside ``[0, V)`` has a loss of NaN and
    a NaN gradient row (unless its cotangent is 0: a loss masked after the
    call), as in the unfused cross-entropy; with ``"mean"`` or
    ``"sum"`` the NaN propagates to the total, and to all of ``dw``. Another
    class is never picked silently; mask such tokens out with ``where``.
  * bfloat16/float16 inputs are multiplied in their own dtype with float32
    accumulation; the statistics and ``dz`` are float32. The loss is returned in
    the inputs' result dtype, the gradients in the dtypes of ``x`` and ``w``.

  ``chunk_size=None`` takes the largest multiple of 128 such that
  ``(N + H) * chunk_size`` compute-dtype numbers (a chunk's logits plus its
  slices of ``w`` and ``dw``) fit in 16 MiB, within ``[128, V]``. A ``V`` that
  is not a multiple of the chunk size is handled by one smaller last chunk; ``w``
  is never padded or copied.

  Args:
    x: ``[..., H]`` hidden states (floating).
    w: ``[H, V]`` classifier weights (the tokamax layout), or ``[V, H]`` with
      ``transpose_w=True``.
    labels: integer class ids of shape ``x.shape[:-1]``.
    where: optional boolean mask broadcastable to ``x.shape[:-1]``; tokens where
      it is False are left out.
    reduction: ``"mean"`` (over included tokens), ``"sum"`` or ``"none"``
      (per-token losses of shape ``x.shape[:-1]``, 0 where excluded).
    chunk_size: vocabulary columns per chunk, or None for the rule above.
    label_smoothing: ``eps`` in ``[0, 1]``.
    z_loss: coefficient ``zeta >= 0`` of ``lse**2``.
    precision: passed to the matmuls (:func:`jax.lax.dot_general`).
    transpose_w: whether ``w`` is ``[V, H]`` (the logits are ``x @ w.T``).
    logits_soft_cap: None, or a positive cap ``c``: the logits are
      ``c * tanh((x @ w) / c)``.

  Returns:
    The loss: a scalar for ``"mean"``/``"sum"``, ``x.shape[:-1]`` for ``"none"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxsoftmax
    >>> x = jnp.ones((2, 3))
    >>> w = jnp.zeros((3, 4))
    >>> jaxsoftmax.linear_softmax_cross_entropy(x, w, jnp.array([0, 3]))  # log(4)
    Array(1.3862944, dtype=float32)
  """
  fn = "linear_softmax_cross_entropy"
  x = float_input(fn, "x", x)
  w = float_input(fn, "w", w)
  chunk_size, label_smoothing, z_loss, transpose_w, logits_soft_cap = _check_options(
    fn, reduction, chunk_size, label_smoothing, z_loss, transpose_w, logits_soft_cap
  )
  layout, h_dim = ("[V, H]", 1) if transpose_w else ("[H, V]", 0)
  if x.ndim < 1:
    raise ValueError(f"{fn}: `x` must have shape [..., H], got a scalar.")
  if w.ndim != 2:
    raise ValueError(
      f"{fn}: `w` must have shape {layout} (transpose_w={transpose_w}), got shape {w.shape}."
    )
  if x.shape[-1] != w.shape[h_dim]:
    raise ValueError(
      f"{fn}: `x` has shape {x.shape} and `w` has shape {w.shape}; expected "
      f"x.shape[-1] == w.shape[{h_dim}] (H; `w` is {layout} with transpose_w={transpose_w}), "
      f"got {x.shape[-1]} != {w.shape[h_dim]}."
    )
  precision = check_precision(fn, precision)
  batch = x.shape[:-1]
  labels = _check_labels(fn, labels, batch)
  where = check_where(fn, where, batch, target="the batch shape x.shape[:-1] =")
  x_lay, w_lay = _explicit.layout(x), _explicit.layout(w)
  if x_lay is not None or w_lay is not None:
    options = dict(
      chunk_size=chunk_size,
      label_smoothing=label_smoothing,
      z_loss=z_loss,
      precision=precision,
      transpose_w=transpose_w,
      logits_soft_cap=logits_soft_cap,
    )
    return _by_block(x, w, labels, where, x_lay, (x_lay or w_lay).mesh, reduction, options)
  h, v = w.shape[h_dim], w.shape[1 - h_dim]
  n = labels.size
  if not static_shape(w.shape):
    raise ValueError(
      f"{fn}: `w` has shape {w.shape}; H and V must be known sizes (the chunks are "
      "laid out when the function is traced); only the token dimensions of `x` may be "
      "symbolic (jax.export)."
    )
  if v == 0:
    raise ValueError(f"{fn}: `w` has V = 0 classes; expected at least one.")
  dt = jnp.result_type(x.dtype, w.dtype)
  if chunk_size is None:
    # A symbolic token count (jax.export) is sized as SYMBOLIC_TOKENS tokens.
    tokens = n if static_shape((n,)) else SYMBOLIC_TOKENS
    chunk_size = default_chunk_size(tokens, h, v, jnp.dtype(compute_dtype(dt)).itemsize)
  chunk_size = min(chunk_size, v)
  if where is not None:
    where = jnp.broadcast_to(where, batch).reshape(n)
  opts = _Options(
    reduction, chunk_size, label_smoothing, z_loss, precision, transpose_w, logits_soft_cap
  )
  loss = _lce(x.reshape(n, h), w, _class_ids(labels, v).reshape(n), where, opts)
  return loss.reshape(batch) if reduction == "none" else loss


def _by_block(x, w, labels, where, lay, mesh, reduction, options):
  """The loss of an explicitly sharded ``x`` or ``w`` (``_explicit``; ``lay`` is
  ``x``'s layout, None if only ``w`` is split, on ``mesh``), on each device's
  block of tokens. H is gathered whole on every device, and so is ``w`` (the
  fused loss has no vocabulary split: a ``w`` split over V costs an all-gather of
  it). A reduced loss sums each block in its core, in the compute dtype, and then
  adds the blocks' sums."""
  rows = (None,) * (x.ndim - 1) if lay is None else lay.spec[:-1]  # H: whole
  x = _explicit.reshard(x, mesh, P(*rows, None))
  w = _explicit.reshard(w, mesh, P())
  names = _explicit.axis_names(rows, range(len(rows)))
  if not names:  # only w or H was split: one block
    labels, where = (a if a is None else _explicit.reshard(a, mesh, P()) for a in (labels, where))
    return linear_softmax_cross_entropy(x, w, labels, where=where, reduction=reduction, **options)
  tokens = _explicit.Layout(mesh, rows)
  wspec = None
  if where is not None:
    wspec = _explicit.operand_spec(where.shape, range(len(rows)), tokens, x.shape[:-1])
  specs = (P(*rows, None), P(), P(*rows), wspec)

  def block(xb, wb, lb, mb):
    inner = "none" if reduction == "none" else "sum"
    loss = linear_softmax_cross_entropy(xb, wb, lb, where=mb, reduction=inner, **options)
    return loss if reduction == "none" else loss.reshape(1)

  if reduction == "none":
    return _explicit.run(block, tokens, (x, w, labels, where), specs, P(*rows))
  parts = _explicit.run(block, tokens, (x, w, labels, where), specs, P(names))
  dt = jnp.result_type(x.dtype, w.dtype)
  total = jnp.sum(parts.astype(compute_dtype(dt)))
  if reduction == "mean":
    count = labels.size if where is None else jnp.sum(jnp.broadcast_to(where, labels.shape))
    total = total / jnp.maximum(count, 1).astype(total.dtype)
  return total.astype(dt)


class _Options(tuple):
  """The static arguments of the core, hashable for ``nondiff_argnums``."""

  __slots__ = ()

  def __new__(cls, *values):
    return super().__new__(cls, values)

  reduction = property(operator.itemgetter(0))
  chunk_size = property(operator.itemgetter(1))
  label_smoothing = property(operator.itemgetter(2))
  z_loss = property(operator.itemgetter(3))
  precision = property(operator.itemgetter(4))
  transpose_w = property(operator.itemgetter(5))
  soft_cap = property(operator.itemgetter(6))

  @property
  def v_dim(self) -> int:
    """The axis of ``w`` that holds the classes."""
    return 0 if self.transpose_w else 1


def _matmul(a, b, contract, precision, cdt):
  """``a`` and ``b`` contracted over ``contract`` in their dtype, accumulated in ``cdt``."""
  return lax.dot_general(
    a, b, (contract, ((), ())), precision=precision, preferred_element_type=cdt
  )


def _matmul_dtype(x_dtype, w_dtype):
  """The dtype the matmuls take their operands in.

  The inputs' result dtype, except for 16-bit floats on the CPU: there a
  chunk's bfloat16 matmul with float32 accumulation runs at 80-105 GMAC/s
  against 120-140 for float32 operands (measured at N=4096..8192, H=512..1024,
  384..768 columns, jax 0.10 on a 2-core Xeon), so ``x`` is converted once up
  front and ``dz`` stays float32: the same exact products, with float32
  accumulation.
  """
  dt = jnp.result_type(x_dtype, w_dtype)
  if jnp.dtype(dt).itemsize < 4 and jax.default_backend() == "cpu":
    return compute_dtype(dt)
  return dt


def _chunks(v: int, c: int):
  """``(k, c, r)``: ``k`` full chunks of ``c`` columns, then one of ``r`` (maybe 0)."""
  k = v // c
  return k, c, v - k * c


def _class_chunk(w, start, c, v_dim):
  """Classes ``[start, start + c)`` of ``w``: columns of an ``[H, V]`` one, rows of a
  ``[V, H]`` one (``v_dim``).

  For a 16-bit ``w``, ``w`` passes through an optimization barrier together
  with the loop-varying ``start``: otherwise a compiler that upcasts 16-bit
  matmuls (XLA on the CPU) converts the whole of ``w`` to float32 once, before
  the loop, and slices that, which costs a float32 copy of ``w``.
  """
  if jnp.dtype(w.dtype).itemsize < 4:
    w, start = lax.optimization_barrier((w, start))
  return lax.dynamic_slice_in_dim(w, start, c, axis=v_dim)


def _logits(x, w_c, opts, cdt):
  """A chunk's logits ``x @ w_c`` (``x @ w_c.T`` for a ``[V, H]`` ``w``), in ``cdt``,
  and ``t = tanh(z / cap)`` if ``logits_soft_cap`` is given (then the logits are
  ``cap * t``; ``t`` is None without a cap)."""
  z = _matmul(x, w_c, ((1,), (1 - opts.v_dim,)), opts.precision, cdt)
  if opts.soft_cap is None:
    return z, None
  t = jnp.tanh(z * (1.0 / opts.soft_cap))
  return opts.soft_cap * t, t


def _forward(x, w, labels, where, opts):
  """Per-token ``(m, 1 / s)`` (the shift and the normaliser's reciprocal, ``lse = m + log s``)
  and loss before masking and reduction, all in the compute dtype."""
  n, _ = x.shape
  v = w.shape[opts.v_dim]
  dt = _matmul_dtype(x.dtype, w.dtype)
  cdt = compute_dtype(dt)
  x = x.astype(dt)
  eps = opts.label_smoothing
  k, c, r = _chunks(v, opts.chunk_size)

  def update(carry, w_c, start):
    m, s, zy, zsum = carry
    z, _ = _logits(x, w_c.astype(dt), opts, cdt)
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    # A row with no finite logit yet keeps m = -inf: shift by 0 there, not by -inf.
    shift = finite_shift(m_new)
    s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - shift[:, None]), axis=1)
    cols = start + lax.broadcasted_iota(labels.dtype, z.shape, 1)
    zy = zy + jnp.sum(jnp.where(cols == labels[:, None], z, 0), axis=1)
    if eps:
      # zsum = sum(z - shift) over the columns so far, moved to the new shift:
      # z - shift is exact near the max, where a sum of raw logits far from 0
      # carries their rounding (300 eps at logits near 3e4).
      seen = jnp.asarray(start, cdt)
      zsum = zsum + seen * (finite_shift(m) - shift) + jnp.sum(z - shift[:, None], axis=1)
    return m_new, s, zy, zsum

  zero = _start((n,), 0, cdt, x, w, labels)
  carry = (_start((n,), -jnp.inf, cdt, x, w, labels), zero, zero, zero)
  if k:

    def body(i, carry):
      start = i * c
      return update(carry, _class_chunk(w, start, c, opts.v_dim), start)

    carry = lax.fori_loop(0, k, body, carry)
  if r:
    carry = update(carry, lax.slice_in_dim(w, k * c, v, axis=opts.v_dim), k * c)
  m, s, zy, zsum = carry
  log_s = jnp.log(s)
  # lse - (1 - eps) zy - eps / V sum(z), with the shift m taken out of each term
  # first: zy - m is exact, where lse - zy would carry the rounding of lse = m +
  # log s at the scale of the logits (as optax's does: 1e-3 off at logits near 3e4).
  loss = log_s - (1.0 - eps) * (zy - m) if eps < 1 else log_s  # eps = 1: no 0 * -inf
  if eps:
    loss = loss - eps * (zsum / v + (finite_shift(m) - m))  # mean(z) - m
  if opts.z_loss:
    lse = m + log_s
    loss = loss + opts.z_loss * lse * lse
  valid = (labels >= 0) & (labels < v)
  if where is not None:  # an excluded token's label may be anything (padding)
    valid = valid | ~where
  # Saved: m and 1 / s, from which the backward takes each chunk's softmax as
  # exp(z - m) * (1 / s), about an ulp where exp((z - m) - log s) carries the
  # rounding of log s and of the difference (|log p| ulps at small p).
  return (m, 1 / s), nan_at(~valid, loss)


def _start(shape, value, dtype, *inputs):
  """A loop's first carry, ``full(shape, value)``, typed as varying over the mesh
  axes that ``inputs`` vary over inside a ``shard_map``, as the loop body's
  results are (the loop refuses a carry whose type changes)."""
  start = _explicit.full(shape, value, dtype, *inputs)
  axes = tuple(sorted(frozenset().union(*map(varying_axes, inputs))))
  return lax.pcast(start, axes, to="varying") if axes else start


def _reduce(loss, where, reduction, out_dtype):
  if where is not None:
    loss = jnp.where(where, loss, jnp.zeros_like(loss))
  if reduction == "none":
    return loss.astype(out_dtype)
  total = jnp.sum(loss)
  if reduction == "mean":
    total = total / _count(loss, where)
  return total.astype(out_dtype)


def _count(loss, where):
  """The number of included tokens, at least 1 so that an empty mean is 0."""
  count = loss.shape[0] if where is None else jnp.sum(where, dtype=jnp.int32)
  return jnp.maximum(count, 1).astype(loss.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lce(x, w, labels, where, opts):
  _, loss = _forward(x, w, labels, where, opts)
  return _reduce(loss, where, opts.reduction, jnp.result_type(x.dtype, w.dtype))


def _lce_fwd(x, w, labels, where, opts):
  stats, loss = _forward(x, w, labels, where, opts)
  out = _reduce(loss, where, opts.reduction, jnp.result_type(x.dtype, w.dtype))
  # Residuals: the inputs (no copies, but the labels as int32 class ids), and the
  # shift and the normaliser's reciprocal, two compute-dtype numbers per token,
  # from which the backward rebuilds each chunk's softmax as exp(z - m) * (1 / s):
  # exact, where exp(z - lse) is not.
  return out, (x, w, labels, where, stats)


def _lce_bwd(opts, res, g):
  # dz = g_i * ((1 + 2 zeta lse_i) * softmax(z_i) - (1 - eps) onehot(y_i) - eps / V);
  # dx = dz @ w.T, dw = x.T @ dz
  x, w, labels, where, (m, inv_s) = res
  n, h = x.shape
  v = w.shape[opts.v_dim]
  dt = _matmul_dtype(x.dtype, w.dtype)
  cdt = compute_dtype(dt)
  # An excluded token's row of x is zeroed so that even an inf or NaN there
  # leaves dw exactly untouched (x.T @ dz would give inf * 0 = NaN).
  xd = x.astype(dt) if where is None else jnp.where(where[:, None], x.astype(dt), 0)
  eps = opts.label_smoothing
  k, c, r = _chunks(v, opts.chunk_size)

  # The cotangent of each token's loss.
  g = g.astype(cdt)
  if opts.reduction == "none":
    gt = g
  elif opts.reduction == "sum":
    gt = jnp.broadcast_to(g, (n,))
  else:
    gt = jnp.broadcast_to(g / _count(m, where), (n,))
  if where is not None:
    gt = jnp.where(where, gt, jnp.zeros_like(gt))
  # An included token with a label outside [0, V) gets a NaN gradient row, like
  # its loss (and like the unfused cross-entropy): no class is picked silently.
  # Not where its cotangent is 0 (excluded by `where`, or its loss masked after
  # the call): its gradient is 0 there.
  bad = ((labels < 0) | (labels >= v)) & (gt != 0)
  # Excluded tokens get m = 0 and 1 / s = 1 so that their (zero) rows stay finite.
  if where is not None:
    m, inv_s = jnp.where(where, m, jnp.zeros_like(m)), jnp.where(where, inv_s, 1.0)
  scale = gt * (1.0 + 2.0 * opts.z_loss * (m - jnp.log(inv_s))) if opts.z_loss else gt
  hit = gt * (1.0 - eps)
  flat = gt * (eps / v)

  def chunk_grads(dx, w_c, start):
    w_c = w_c.astype(dt)
    z, t = _logits(xd, w_c, opts, cdt)
    cols = start + lax.broadcasted_iota(labels.dtype, z.shape, 1)
    dz = (scale * inv_s)[:, None] * jnp.exp(z - m[:, None])
    dz = dz - jnp.where(cols == labels[:, None], hit[:, None], 0)
    if eps:
      dz = dz - flat[:, None]
    if t is not None:
      dz = dz * (1.0 - t * t)  # d(cap tanh(u / cap))/du
    dz = nan_at(bad[:, None], dz)
    if where is not None:
      dz = jnp.where(where[:, None], dz, 0)
    dz = dz.astype(dt)
    dx = dx + _matmul(dz, w_c, ((1,), (opts.v_dim,)), opts.precision, cdt)
    if opts.transpose_w:  # dw_c = dz.T @ x, [c, H]
      dw_c = _matmul(dz, xd, ((0,), (0,)), opts.precision, cdt)
    else:  # x.T @ dz, [H, c]
      dw_c = _matmul(xd, dz, ((0,), (0,)), opts.precision, cdt)
    return dx, _to_storage(dw_c.astype(w.dtype))

  dx = _start((n, h), 0, cdt, xd, w, labels, g)
  dw = _to_storage(_start(w.shape, 0, w.dtype, xd, w, labels, g))
  if k:

    def body(i, carry):
      dx, dw = carry
      start = i * c
      dx, dw_c = chunk_grads(dx, _class_chunk(w, start, c, opts.v_dim), start)
      return dx, lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=opts.v_dim)

    dx, dw = lax.fori_loop(0, k, body, (dx, dw))
  if r:
    dx, dw_c = chunk_grads(dx, lax.slice_in_dim(w, k * c, v, axis=opts.v_dim), k * c)
    dw = lax.dynamic_update_slice_in_dim(dw, dw_c, k * c, axis=opts.v_dim)
  dx, dw = dx.astype(x.dtype), _from_storage(dw, w.dtype)
  # (dw from each device's tokens, for a w the same on every device: their sum.)
  return summed_like(dx, x), summed_like(dw, w), None, None


_lce.defvjp(_lce_fwd, _lce_bwd)


def _to_storage(a: jax.Array) -> jax.Array:
  """``a`` as the array ``dw`` is built in: a bfloat16 ``a`` as its uint16 bits.

  XLA:CPU writes a bfloat16 chunk into ``dw`` (a dynamic-update-slice fused
  with the float32-to-bfloat16 convert) about 40x slower than a float32,
  float16 or uint16 one: at H=512, V=32768 the loop's updates took 0.9 s instead
  of 0.02 s. The bits are the same, and a bitcast costs nothing on any platform.
  """
  return lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a


def _from_storage(a: jax.Array, dtype) -> jax.Array:
  return lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a
