"""Choosing the backend that runs an op: ``implementation=None | "xla" | "pallas"``.

A backend is a module with ``softmax_fwd``, ``softmax_bwd``, ``log_softmax_fwd``
and ``log_softmax_bwd`` (see ``_xla.py``), and ``row_stats``, which the losses'
forward reads. The custom_vjp cores receive the
backend's name as a static argument and look the module up here. A name
``"<forward>/<backward>"`` (``"pallas/xla"``) runs the forward functions of one
and the backward functions of the other: they share what the forward saves
(``s``; ``l`` and the per-slice ``live`` flag).
"""

from __future__ import annotations

import functools
from types import ModuleType, SimpleNamespace

import jax

from . import _xla
from ._checks import static_shape


def pallas_unsupported_reason(x: jax.Array, axes: tuple[int, ...], axis_name) -> str | None:
  """Why the Pallas kernels cannot run this call, or None if they can.

  The kernels run on a TPU (Mosaic TPU) and on an NVIDIA GPU of compute
  capability 9.0 or newer (Mosaic GPU), never on the CPU; for float32, bfloat16
  and float16; without ``axis_name``.
  """
  from . import _pallas  # imported lazily: Pallas is only needed on accelerators

  return _pallas.unsupported_reason(x.shape, x.dtype, axes, axis_name)


def resolve(
  fn: str,
  implementation: str | None,
  x: jax.Array,
  axes: tuple[int, ...],
  axis_name,
  where: jax.Array | None = None,
) -> str:
  """The name of the backend to run: explicit, or the best one for this call.
  ``fn`` is the public op ("softmax", "log_softmax" or a loss): errors name it,
  and the GPU's size rule depends on it and on whether there is a ``where``
  (``_pallas.preferred``)."""
  from . import _pallas

  if implementation == "xla":
    return "xla"
  if not static_shape(x.shape):  # jax.export with symbolic sizes: the kernels need known ones
    if implementation == "pallas":
      raise ValueError(
        f"{fn}: implementation='pallas' cannot run this call: the shape {x.shape} has "
        "symbolic sizes (jax.export); the kernels are laid out for known sizes."
      )
    return "xla"
  if implementation is None and jax.default_backend() not in _pallas.VERIFIED_PLATFORMS:
    return "xla"  # the kernels are the default only where they have run on hardware
  reason = pallas_unsupported_reason(x, axes, axis_name)
  if reason is None:
    if implementation is None:
      # Supported; the kernels where they measured faster than XLA, forward and
      # backward each (``_pallas.preferred``).
      fwd, bwd = _pallas.preferred(fn, x.shape, x.dtype, axes, where is not None)
      names = {(True, True): "pallas", (True, False): "pallas/xla", (False, True): "xla/pallas"}
      return names.get((fwd, bwd), "xla")
    return "pallas"
  if implementation == "pallas":
    raise ValueError(f"{fn}: implementation='pallas' cannot run this call: {reason}.")
  return "xla"


@functools.cache
def get(name: str) -> ModuleType | SimpleNamespace:
  """The backend called ``name``: "xla", "pallas" (kernels for this platform), a
  test-only "pallas:<tpu|gpu>[:interpret]" naming the kernels and interpret mode,
  or "<forward>/<backward>", two of those."""
  if "/" in name:
    fwd, bwd = map(get, name.split("/", 1))
    return SimpleNamespace(
      softmax_fwd=fwd.softmax_fwd,
      log_softmax_fwd=fwd.log_softmax_fwd,
      row_stats=fwd.row_stats,
      softmax_bwd=bwd.softmax_bwd,
      log_softmax_bwd=bwd.log_softmax_bwd,
    )
  if name == "xla":
    return _xla
  if name == "pallas" or name.startswith("pallas:"):
    from . import _pallas

    return _pallas.backend(name)
  raise ValueError(f"unknown backend {name!r}")
