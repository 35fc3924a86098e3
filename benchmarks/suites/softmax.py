"""softmax and log_softmax against jax.nn, autodiff of the naive definition and PyTorch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxsoftmax

from ..registry import Contender, Suite, register

SIZES = [(4096, 128), (4096, 512), (4096, 1024), (4096, 4096), (1024, 16384), (256, 65536)]
SIZES += [(32, 262144)]
QUICK_SIZES = [(4096, 512), (1024, 4096), (256, 32768)]


def _normal(rng: np.random.Generator, size, dtype: str):
  return (rng.standard_normal(size, dtype=np.float32),)


def _bytes_moved(size, itemsize: int, mode: str) -> int:
  # Forward: read x, write y (2 arrays). Backward: read s (or l) and g, write dx (3).
  n = int(np.prod(size)) * itemsize
  return 2 * n if mode == "fwd" else 5 * n


# The naive definitions, exactly as written in the math: jax.grad of these is
# what a user gets with no custom rule (and no max shift; the inputs are
# standard normal, so nothing overflows). They are also the float64 reference.
def _naive_softmax(x):
  e = jnp.exp(x)
  return e / jnp.sum(e, -1, keepdims=True)


def _naive_log_softmax(x):
  return x - jnp.log(jnp.sum(jnp.exp(x), -1, keepdims=True))


def _torch_softmax(x):
  import torch

  return torch.softmax(x, -1)


def _torch_log_softmax(x):
  import torch

  return torch.log_softmax(x, -1)


def _suite(name: str, ours, ref, naive, torch_fn, extra=()) -> Suite:
  return Suite(
    name=name,
    description=f"jaxsoftmax.{name} vs jax.nn.{name}, jax.grad of the naive definition, torch",
    make_inputs=_normal,
    contenders=[
      Contender("jaxsoftmax", ours, strict=True),
      Contender("jax.nn", ref),
      *extra,
      Contender("naive autodiff", naive),
      Contender("torch", torch_fn, framework="torch"),
    ],
    baseline="jax.nn",
    sizes=SIZES,
    quick_sizes=QUICK_SIZES,
    bytes_moved=_bytes_moved,
    reference=naive,
    targets=[("jaxsoftmax", "jax.nn"), ("jaxsoftmax", "naive autodiff")],
  )


register(
  _suite(
    "softmax",
    jaxsoftmax.softmax,
    jax.nn.softmax,
    _naive_softmax,
    _torch_softmax,
    # jax.nn.softmax's other path: a custom_jvp rule, transposed for reverse mode.
    [Contender("jax.nn custom_jvp", jax.nn.softmax, flags={"jax_softmax_custom_jvp": True})],
  )
)
register(
  _suite(
    "log_softmax",
    jaxsoftmax.log_softmax,
    jax.nn.log_softmax,
    _naive_log_softmax,
    _torch_log_softmax,
  )
)
