"""Explicit sharding: under an ``AxisType.Explicit`` mesh the ops run block by block.

``jax.make_mesh`` makes its axes explicit by default. An array placed on such a
mesh carries its sharding in its type, and JAX refuses an op whose operands are
sharded in ways that do not match: a gather or a scatter along a sharded axis, a
``select`` between a sharded array and a mask that is not, a loop carry that
starts unsharded and comes back sharded. The cores are written for one device's
block, so each public op looks at its input's type first. If explicit mesh axes
shard it, the op runs itself on each device's block inside a ``shard_map`` over
those axes, and passes the axes that split the softmax (class) axes on as
``axis_name``: the same code and the same collectives as a user's own
``shard_map``. The smaller operands (masks, labels) are resharded to the input's
layout first; where they are replicated, that takes a slice on each device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


class Layout(NamedTuple):
  """How explicit mesh axes split an array: its mesh and one spec entry per dim
  (None, a mesh axis name, or a tuple of names)."""

  mesh: object
  spec: tuple


def _explicit_mesh(v):
  """The mesh in ``v``'s type, if it has explicit axes; else None."""
  mesh = getattr(getattr(jax.typeof(v), "sharding", None), "mesh", None)
  if mesh is None or mesh.empty or not mesh.explicit_axes:
    return None
  return mesh


def layout(v) -> Layout | None:
  """``v``'s explicit layout, or None when no explicit mesh axis splits it (no
  mesh, Auto axes, replicated, or inside a ``shard_map`` over those axes)."""
  mesh = _explicit_mesh(v)
  if mesh is None:
    return None
  explicit = set(mesh.explicit_axes)
  sharding = jax.typeof(v).sharding
  spec = tuple(sharding.spec) + (None,) * (v.ndim - len(sharding.spec))
  spec = tuple(_keep(entry, explicit) for entry in spec)
  if all(entry is None for entry in spec):
    return None
  return Layout(mesh, spec)


def _keep(entry, explicit: set) -> str | tuple[str, ...] | None:
  kept = tuple(name for name in names(entry) if name in explicit)
  if not kept:
    return None
  return kept[0] if len(kept) == 1 else kept


def names(entry) -> tuple[str, ...]:
  """The mesh axis names in one spec entry."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def axis_names(spec: Sequence, dims: Sequence[int]) -> tuple[str, ...]:
  """The mesh axes that split any of ``dims``, in dim order."""
  return tuple(name for d in sorted(dims) for name in names(spec[d]))


def with_names(axis_name, extra: tuple[str, ...]):
  """``axis_name`` (None, a name or a tuple) followed by ``extra``; None if both are empty."""
  combined = names(axis_name) + extra
  if not combined:
    return None
  return combined[0] if len(combined) == 1 else combined


def operand_spec(shape: Sequence[int], dims: Sequence[int], lay: Layout, x_shape) -> P:
  """The spec of an operand whose dim ``i`` lines up with the input's dim
  ``dims[i]``: split like the input where it has the input's size, whole where it
  broadcasts (size 1)."""
  return P(*(lay.spec[d] if n == x_shape[d] else None for n, d in zip(shape, dims, strict=True)))


def reshard(v, mesh, spec: P):
  """``v`` laid out as ``spec`` on ``mesh`` (with or without a mesh in context)."""
  return jax.sharding.reshard(v, NamedSharding(mesh, spec))


def full(shape, value, dtype, *like):
  """``jnp.full(shape, value, dtype)``, typed on the explicit mesh of the arrays
  ``like`` when no mesh is in context (``jit`` of arrays placed on an explicit
  mesh, without ``jax.set_mesh``). A new array there has no mesh, and JAX
  refuses to mix it with the inputs in a loop carry or an update."""
  if jax.sharding.get_abstract_mesh().empty:
    for v in like:
      mesh = _explicit_mesh(v)
      if mesh is not None:
        return jnp.full(shape, value, dtype, out_sharding=NamedSharding(mesh, P()))
  return jnp.full(shape, value, dtype)


def run(
  f: Callable,
  lay: Layout,
  args: Sequence,
  specs: Sequence[P | None],
  out_specs,
):
  """``f(*args)`` on each device's block: ``shard_map`` over the mesh axes of
  ``lay``. ``None`` arguments are passed through as None; the others are
  resharded to their spec first (a no-op where they are laid out so already)."""
  present = [i for i, a in enumerate(args) if a is not None]
  blocks = [reshard(args[i], lay.mesh, specs[i]) for i in present]

  def local(*blocks):
    given = list(args)
    for i, b in zip(present, blocks, strict=True):
      given[i] = b
    return f(*given)

  # Manual over the axes that split the input only: under vmap, the axes that
  # split the mapped dim are vmap's to add.
  mapped = jax.shard_map(
    local,
    mesh=lay.mesh,
    in_specs=tuple(specs[i] for i in present),
    out_specs=out_specs,
    axis_names=frozenset(n for entry in lay.spec for n in names(entry)),
  )
  return mapped(*blocks)
