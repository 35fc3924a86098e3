"""Argument checks and normalisation shared by every op.

Each public function calls these once, before any math, so that every op
names the offending argument, its shape or dtype, and what was expected.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Axis = int | Sequence[int] | None
AxisName = str | tuple[str, ...] | None

IMPLEMENTATIONS = (None, "xla", "pallas")


def float_input(fn: str, name: str, x: ArrayLike) -> jax.Array:
  """Returns ``x`` as a floating array.

  Integers are promoted to the default float dtype (float64 under x64, where
  ``jax.nn`` keeps float32). Complex and boolean input raise ``TypeError``
  (``jax.nn`` refuses booleans too: a boolean ``x`` is most likely a mask meant
  for ``where``). The dtype to compute in is :func:`compute_dtype` of the result.
  """
  if isinstance(x, complex):
    raise TypeError(f"{fn}: `{name}` is a complex number; expected a real floating array.")
  if isinstance(x, jax.ShapeDtypeStruct) or not (isinstance(x, int | float) or hasattr(x, "dtype")):
    raise TypeError(f"{fn}: `{name}` must be an array, got {type(x).__name__}.")
  dtype = jnp.result_type(x)
  if dtype == jnp.bool_:
    raise TypeError(
      f"{fn}: `{name}` has boolean dtype; expected a real floating (or integer) array. "
      "A mask goes in `where`."
    )
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(  # x's own dtype: without x64, result_type says complex64
      f"{fn}: `{name}` has complex dtype {getattr(x, 'dtype', dtype)}; expected a real "
      "floating dtype (softmax is not defined for complex input)."
    )
  x = jnp.asarray(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    x = x.astype(jnp.result_type(float))
  return x


def float_option(fn: str, name: str, value, lo: float, hi: float) -> float:
  """A static float hyperparameter (``label_smoothing``, ``z_loss``) in ``[lo, hi]``:
  ``TypeError`` for a string or a traced value, ``ValueError`` out of range or NaN."""
  try:
    if isinstance(value, str | bytes | bool | np.bool_):
      raise TypeError
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(
      f"{fn}: `{name}` must be a Python float (a static hyperparameter), got {value!r}."
    ) from None
  if not lo <= v <= hi:
    raise ValueError(f"{fn}: `{name}`={v} is out of range; expected a value in [{lo}, {hi}].")
  return v


def static_shape(shape) -> bool:
  """Whether every dimension is a known int, not a symbolic one (``jax.export``'s
  shape polymorphism). The size rules (fusion thresholds, chunk sizes, which
  backend) compare sizes in Python; with a symbolic size they take the branch
  that is right for any size."""
  return all(isinstance(d, int) for d in shape)


def integer_labels(fn: str, labels: ArrayLike, hint: str) -> jax.Array:
  """``labels`` as an integer array: ``TypeError`` naming the argument and its dtype
  (or type) otherwise, with ``hint`` saying what to pass instead."""
  if not (hasattr(labels, "dtype") or isinstance(labels, int | list | tuple)):
    raise TypeError(f"{fn}: `labels` must be an integer array, got {type(labels).__name__}.")
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
      f"{fn}: `labels` must hold integer class ids, got dtype {labels.dtype}; {hint}."
    )
  return labels


def class_ids(labels: jax.Array, num_classes) -> tuple[jax.Array, jax.Array]:
  """``(ids, valid)``: integer labels as int32 (int64 past int32's range) and
  whether each lies in ``[0, num_classes)``. The range is checked before the
  cast, in a dtype that holds both: a narrow dtype would wrap the class count
  (int8 holds no 200), and the cast would wrap a wide label into range. A
  symbolic class count (``jax.export``) is taken to fit in int32, as any real
  vocabulary does. ``ids`` is only meaningful where ``valid``."""
  static = static_shape((num_classes,))
  idt = jnp.int32 if not static or num_classes <= jnp.iinfo(jnp.int32).max else jnp.int64
  valid = labels >= 0
  if not static:
    valid = valid & (labels.astype(jnp.promote_types(labels.dtype, idt)) < num_classes)
  elif num_classes <= jnp.iinfo(labels.dtype).max:
    valid = valid & (labels < num_classes)
  return labels.astype(idt), valid


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for 16-bit floats, the dtype itself otherwise."""
  dtype = jnp.dtype(dtype)
  if jnp.finfo(dtype).bits < 32:
    return jnp.dtype(jnp.float32)
  return dtype


def normalize_axes(fn: str, axis: Axis, ndim: int, name: str = "axis") -> tuple[int, ...]:
  """``axis`` (int, sequence of ints or None) as a sorted tuple of non-negative axes."""
  if axis is None:
    return tuple(range(ndim))
  if isinstance(axis, Sequence) and not isinstance(axis, str):
    raw = tuple(axis)
  else:
    raw = (axis,)
  axes = []
  for a in raw:
    try:
      a = operator.index(a)
    except TypeError:
      raise TypeError(
        f"{fn}: `{name}` must be an int, a tuple of ints or None, got {axis!r}."
      ) from None
    if not -ndim <= a < ndim:
      raise ValueError(
        f"{fn}: `{name}`={axis!r} is out of range for an input with ndim={ndim}; "
        f"each axis must lie in [{-ndim}, {ndim})."
      )
    axes.append(a % ndim)
  if len(set(axes)) != len(axes):
    raise ValueError(f"{fn}: `{name}`={axis!r} repeats an axis (normalised: {tuple(axes)}).")
  if not axes:
    raise ValueError(f"{fn}: `{name}`={axis!r} names no axis; pass None for all axes.")
  return tuple(sorted(axes))


def check_where(
  fn: str,
  where: ArrayLike | None,
  shape: tuple[int, ...],
  name: str = "where",
  target: str = "the input's shape",
) -> jax.Array | None:
  """A boolean mask broadcastable to ``shape`` (``target`` names it in the error),
  kept in its own (small) shape.

  The mask is not broadcast here: ``jnp.where`` and the reductions broadcast it
  on the fly, so a ``[batch, 1, n]`` mask stays that size in the residuals.
  """
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"{fn}: `{name}` must be a boolean array, got dtype {where.dtype}.")
  try:
    out = jnp.broadcast_shapes(where.shape, shape)
  except ValueError:
    out = None
  if out != tuple(shape):
    raise ValueError(
      f"{fn}: `{name}` with shape {where.shape} does not broadcast to {target} {tuple(shape)}."
    )
  if where.ndim < len(shape):
    where = where.reshape((1,) * (len(shape) - where.ndim) + where.shape)
  return where


def check_axis_name(fn: str, axis_name: AxisName) -> AxisName:
  """``axis_name`` as None, a str, or a tuple of str (hashable, for nondiff_argnums).

  A name must be bound where the op is traced (inside ``jax.shard_map`` over a
  mesh with that axis, or a ``vmap``/``pmap`` with that ``axis_name``).
  """
  if axis_name is None:
    return None
  names = (axis_name,) if isinstance(axis_name, str) else axis_name
  if not (isinstance(names, Sequence) and names and all(isinstance(a, str) for a in names)):
    raise TypeError(
      f"{fn}: `axis_name` must be a mesh axis name, a non-empty tuple of them or None, "
      f"got {axis_name!r}."
    )
  axis_name = axis_name if isinstance(axis_name, str) else tuple(names)
  try:
    jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
      f"{fn}: `axis_name`={axis_name!r} is not bound where {fn} is called ({e}). "
      "`axis_name` names the mesh axis that splits the softmax axis across devices: "
      f"call {fn} inside `jax.shard_map(f, mesh=mesh, in_specs=..., out_specs=...)` "
      "whose mesh has that axis. Under plain `jax.jit` with sharded inputs, drop "
      "`axis_name`: XLA partitions the reductions itself."
    ) from None
  return axis_name


def check_implementation(fn: str, implementation: str | None) -> str | None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"{fn}: `implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}."
    )
  return implementation


def check_precision(fn: str, precision):
  """``precision`` as :func:`jax.lax.dot_general` takes it, or ``ValueError`` naming
  the argument (JAX's own rule, asked by tracing a 1 x 1 product)."""
  if precision is None:
    return None
  one = jax.ShapeDtypeStruct((1, 1), jnp.float32)
  try:
    jax.eval_shape(functools.partial(jax.lax.dot, precision=precision), one, one)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"{fn}: `precision`={precision!r} is not a precision jax.lax.dot_general takes "
      f"(None, a jax.lax.Precision or its name, a pair of them, or a dot algorithm): {e}"
    ) from None
  return precision


def nan_free_intermediates() -> bool:
  """Whether ``jax_debug_nans`` is on: the losses' forms that compute first and redo
  the rare NaN case (``lax.cond`` on the CPU) then step aside for the guarded
  ones, which make no NaN that is not in the result. Read when a loss is traced,
  and so part of ``compiled_when_eager``'s cache key."""
  return bool(jax.config.jax_debug_nans)


def compiled_when_eager(*static: str) -> Callable[[Callable], Callable]:
  """Decorator: a call runs through one cached ``jax.jit`` of the function, with the
  arguments named in ``static`` static.

  The losses build a ``lax.cond`` or a loop from closures made at each call. Run
  op by op (outside ``jit``, also under ``jax.grad``), each call would then
  trace and compile them again (about 0.1 s a call on a CPU); jitted, the second
  call with the same shapes and options compiles nothing, and under an outer
  ``jit`` the inner one is inlined. Taken only when every other argument is an
  array (or a tracer of one) or None and the static ones are hashable;
  otherwise (a list, a Python scalar) the function runs as it is, and its own
  checks name what is wrong.
  """

  def wrap(fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    # One jit per value of `nan_free_intermediates`, which the losses read when
    # traced and which is not part of jit's cache key. Each jits a function of its
    # own: jits of the same function share their traces.
    def own_jit():
      @functools.wraps(fn)
      def traced(*args, **kwargs):
        return fn(*args, **kwargs)

      return jax.jit(traced, static_argnames=static)

    jitted = {flag: own_jit() for flag in (False, True)}

    @functools.wraps(fn)
    def call(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      if all(
        _array(v) if name not in static else _hashable(v) for name, v in bound.arguments.items()
      ):
        return jitted[nan_free_intermediates()](*args, **kwargs)
      return fn(*args, **kwargs)

    return call

  return wrap


def _array(v) -> bool:
  return v is None or isinstance(v, jax.Array | np.ndarray)


def _hashable(v) -> bool:
  try:
    hash(v)
  except TypeError:
    return False
  return True
