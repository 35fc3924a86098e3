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


register(
  Suite(
    name="cross_entropy_int",
    description=(
      "jaxsoftmax.softmax_cross_entropy_with_integer_labels vs optax (as is, and on "
      "logits upcast to float32), jax.grad of the naive definition, torch"
    ),
    make_inputs=_logits_and_int_labels,
    contenders=[
      Contender("jaxsoftmax", jaxsoftmax.softmax_cross_entropy_with_integer_labels, strict=True),
      Contender("optax", optax.softmax_cross_entropy_with_integer_labels),
      Contender("optax f32 upcast", _optax_int_f32),
      Contender("naive autodiff", _naive_int),
      Contender("torch", _torch_int, framework="torch"),
    ],
    baseline="optax",
    sizes=SIZES,
    quick_sizes=QUICK_SIZES,
    bytes_moved=_bytes_int,
    reference=_naive_int,
    diff_argnums=(0,),
    targets=[("jaxsoftmax", "optax"), ("jaxsoftmax", "optax f32 upcast")],
  )
)

register(
  Suite(
    name="cross_entropy",
    description=(
      "jaxsoftmax.softmax_cross_entropy (soft labels, gradient for the logits) vs optax "
      "(as is, and upcast to float32), jax.grad of the naive definition, torch"
    ),
    make_inputs=_logits_and_probs,
    contenders=[
      Contender("jaxsoftmax", jaxsoftmax.softmax_cross_entropy, strict=True),
      Contender("optax", optax.softmax_cross_entropy),
      Contender("optax f32 upcast", _optax_soft_f32),
      Contender("naive autodiff", _naive_soft),
      Contender("torch", _torch_soft, framework="torch"),
    ],
    baseline="optax",
    sizes=SIZES,
    quick_sizes=QUICK_SIZES,
    bytes_moved=_bytes_soft,
    reference=_naive_soft,
    diff_argnums=(0,),
    cast=(0, 1),
    targets=[("jaxsoftmax", "optax"), ("jaxsoftmax", "optax f32 upcast")],
  )
)
