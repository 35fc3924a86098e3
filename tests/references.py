"""Independent references: the naive definitions, differentiated by JAX's autodiff.

Nothing here calls jaxsoftmax. Shapes and axes follow ``jax.nn``.
"""

import jax.numpy as jnp


def naive_softmax(x, axis=-1):
  """``exp(x) / sum(exp(x))``, literally (callers keep x moderate)."""
  e = jnp.exp(x)
  return e / jnp.sum(e, axis, keepdims=True)


def naive_log_softmax(x, axis=-1):
  return jnp.log(naive_softmax(x, axis))


def rel_err(actual, expected):
  """``||actual - expected|| / ||expected||`` in float64."""
  a = jnp.asarray(actual, jnp.float64)
  e = jnp.asarray(expected, jnp.float64)
  return float(jnp.linalg.norm((a - e).ravel()) / jnp.linalg.norm(e.ravel()))


def eps(dtype):
  return float(jnp.finfo(dtype).eps)
