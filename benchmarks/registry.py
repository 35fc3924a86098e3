"""What a benchmark suite is, and how the harness finds the suites.

A suite is one op measured against its contenders. It lives in its own module
under ``benchmarks/suites/`` and calls :func:`register` at import time; the
harness imports every module there, so adding an op is one new file (see
``benchmarks/README.md``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Size = tuple[int, ...]


@dataclass(frozen=True)
class Contender:
  """One implementation of the suite's op.

  Attributes:
    name: the label in tables and plots, e.g. ``"jaxsoftmax"``.
    fn: the op as a function of the suite's inputs (``suite.make_inputs``).
      For ``framework="jax"`` it takes and returns JAX arrays and is traced
      under ``jit``; for ``"torch"`` it takes and returns torch tensors.
    framework: ``"jax"`` or ``"torch"``. Torch contenders run on the CPU, and
      only where torch is importable.
    flags: JAX config options (``{"jax_softmax_custom_jvp": True}``) set while
      the contender is traced and compiled.
    strict: whether the correctness check must pass within the suite's
      tolerance (our own ops); other contenders only need to be roughly right.
  """

  name: str
  fn: Callable[..., Any]
  framework: str = "jax"
  flags: Mapping[str, Any] = field(default_factory=dict)
  strict: bool = False


@dataclass(frozen=True)
class Suite:
  """One op, its inputs, its contenders and what it should move through memory.

  Attributes:
    name: selects the suite on the command line (``--suite NAME``).
    description: one line for ``--list`` and the report.
    make_inputs: ``make_inputs(rng, size, dtype) -> tuple of numpy arrays``.
      Floating arrays are made in float32 and cast to ``dtype`` by the harness
      only if ``cast`` says so; integer arrays (labels) are passed through.
    contenders: the implementations to time, in plotting order.
    baseline: the contender every ratio is taken against (e.g. ``"jax.nn"``).
    sizes: the full-mode sizes; ``quick_sizes`` those of ``--quick``.
    bytes_moved: ``bytes_moved(size, itemsize, mode) -> int``, the least
      traffic the op needs, with ``mode`` ``"fwd"`` or ``"fwd+bwd"``; it gives
      GB/s and the percentage of the measured roofline.
    reference: the naive definition, ``reference(*inputs)``, evaluated in
      float64 on the CPU with ``jax.grad`` as the correctness reference.
    diff_argnums: the inputs that are differentiated (the others, such as
      labels, get no cotangent).
    cast: which inputs take the benchmark dtype (default: those in
      ``diff_argnums``).
    dtypes: the dtypes to run, by name.
    targets: ``(contender, reference)`` pairs whose forward+backward time ratio
      should be at most ``target_ratio``; the report marks each.
    target_ratio: the largest forward+backward time ratio a target allows
      (1.0: at least as fast as the reference).
    check_size: the small size the correctness check runs at.
    tolerance: ``(forward, backward)`` relative L2 error allowed for strict
      contenders, in units of the dtype's epsilon.
    row_length: the x coordinate of a size in plots (default: the last entry).
  """

  name: str
  description: str
  make_inputs: Callable[[np.random.Generator, Size, str], tuple[np.ndarray, ...]]
  contenders: Sequence[Contender]
  baseline: str
  sizes: Sequence[Size]
  quick_sizes: Sequence[Size]
  bytes_moved: Callable[[Size, int, str], int]
  reference: Callable[..., Any]
  diff_argnums: tuple[int, ...] = (0,)
  cast: tuple[int, ...] | None = None
  dtypes: Sequence[str] = ("float32", "bfloat16")
  targets: Sequence[tuple[str, str]] = ()
  target_ratio: float = 1.0
  check_size: Size = (64, 1000)
  tolerance: tuple[float, float] = (4.0, 8.0)
  row_length: Callable[[Size], int] = lambda size: size[-1]

  def size_label(self, size: Size) -> str:
    return "x".join(str(n) for n in size)


SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
  """Adds ``suite`` to the registry; call it at import time of a suite module."""
  if suite.name in SUITES:
    raise ValueError(f"benchmark suite {suite.name!r} is registered twice")
  names = [c.name for c in suite.contenders]
  if suite.baseline not in names:
    raise ValueError(f"suite {suite.name!r}: baseline {suite.baseline!r} is not in {names}")
  SUITES[suite.name] = suite
  return suite


def discover() -> dict[str, Suite]:
  """Imports every module in ``benchmarks/suites/`` and returns the registry."""
  from . import suites

  names = [i.name for i in pkgutil.iter_modules(suites.__path__) if not i.name.startswith("_")]
  # The core op first (so that a run cut short by --budget has it), then by name.
  for name in sorted(names, key=lambda n: (n != "softmax", n)):
    importlib.import_module(f"{suites.__name__}.{name}")
  return SUITES
