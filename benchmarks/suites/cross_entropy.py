"""The two cross-entropy losses against optax (as is, and with the float32 upcast) and torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsoftmax

from ..registry import Contender, Suite, register

SIZES = [(8192, 1000), (4096, 32768), (1024, 131072)]
QUICK_SIZES = [(1024, 1000), (256, 32768)]


def _logits_and_int_labels(rng: np.random.Generator, size, dtype: str):
  rows, classes = size
  logits = rng.standard_normal(size, dtype=np.float32)
  return logits, rng.integers(0, classes, rows, dtype=np.int32)


def _logits_and_probs(rng: np.random.Generator, size, dtype: str):
  logits = rng.standard_normal(size, dtype=np.float32)
  e = np.exp(rng.standard_normal(size, dtype=np.float32))
  return logits, e / e.sum(-1, keepdims=True)


def _bytes_int(size, itemsize: int, mode: str) -> int:
  # Forward: read the logits. Backward: read them again, write dlogits.
  n = int(np.prod(size)) * itemsize
  return n if mode == "fwd" else 3 * n


def _bytes_soft(size, itemsize: int, mode: str) -> int:
  # Forward: read logits and labels. Backward: read both again, write dlogits.
  n = int(np.prod(size)) * itemsize
  return 2 * n if mode == "fwd" else 5 * n


# The naive definitions, literally: the float64 correctness reference.
def _naive_int(logits, labels):
  log_p = logits - jnp.log(jnp.sum(jnp.exp(logits), -1, keepdims=True))
  return -jnp.sum(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype) * log_p, -1)


def _naive_soft(logits, labels):
  log_p = logits - jnp.log(jnp.sum(jnp.exp(logits), -1, keepdims=True))
  return -jnp.sum(labels * log_p, -1)


# The usual recipe for accurate bf16 training: upcast the logits before optax. The
# loss is cast back so that every contender takes the same cotangent.
def _optax_int_f32(logits, labels):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return loss.astype(logits.dtype)


def _optax_soft_f32(logits, labels):
  loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32))
  return loss.astype(logits.dtype)


def _torch_int(logits, labels):
  import torch

  return torch.nn.functional.cross_entropy(logits, labels.long(), reduction="none")


def _torch_soft(logits, labels):
  import torch

  return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def _suite(name, what, ours, make_inputs, optax_fn, optax_f32, naive, torch_fn, bytes_moved):
  return Suite(
    name=name,
    description=(
      f"jaxsoftmax.{ours.__name__} ({what}) vs optax (as is, and on logits upcast to "
      "float32), jax.grad of the naive definition, torch"
    ),
    make_inputs=make_inputs,
    contenders=[
      Contender("jaxsoftmax", ours, strict=True),
      Contender("optax", optax_fn),
      Contender("optax f32 upcast", optax_f32),
      Contender("naive autodiff", naive),
      Contender("torch", torch_fn, framework="torch"),
    ],
    baseline="optax",
    sizes=SIZES,
    quick_sizes=QUICK_SIZES,
    bytes_moved=bytes_moved,
    reference=naive,
    diff_argnums=(0,),  # the gradient for the logits, as in training
    cast=(0, 1) if name == "cross_entropy" else (0,),  # soft labels take the dtype too
    targets=[("jaxsoftmax", "optax"), ("jaxsoftmax", "optax f32 upcast")],
  )


register(
  _suite(
    "cross_entropy_int",
    "integer labels",
    jaxsoftmax.softmax_cross_entropy_with_integer_labels,
    _logits_and_int_labels,
    optax.softmax_cross_entropy_with_integer_labels,
    _optax_int_f32,
    _naive_int,
    _torch_int,
    _bytes_int,
  )
)
register(
  _suite(
    "cross_entropy",
    "soft labels",
    jaxsoftmax.softmax_cross_entropy,
    _logits_and_probs,
    optax.softmax_cross_entropy,
    _optax_soft_f32,
    _naive_soft,
    _torch_soft,
    _bytes_soft,
  )
)
