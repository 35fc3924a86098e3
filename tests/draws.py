"""Random test inputs drawn by NumPy's generator and handed to JAX.

``jax.random`` run eagerly compiles its samplers again for every new shape (about
half a second for the three draws of a Pallas test case on a 2-core machine),
and the suite draws several hundred shapes; NumPy draws them without compiling
anything. Each function takes its own seed, so a test's inputs do not depend on
what ran before it.
"""

import jax.numpy as jnp
import numpy as np


def _rng(seed: int) -> np.random.Generator:
  return np.random.default_rng(seed)


def normal(seed: int, shape, dtype=jnp.float32, scale: float = 1.0) -> jnp.ndarray:
  """Standard normal samples times ``scale``, rounded once to ``dtype``."""
  x = _rng(seed).standard_normal(shape) * scale
  return jnp.asarray(x.astype(jnp.dtype(dtype)))


def uniform(seed: int, shape, dtype=jnp.float32) -> jnp.ndarray:
  """Samples from [0, 1)."""
  return jnp.asarray(_rng(seed).random(shape).astype(jnp.dtype(dtype)))


def bernoulli(seed: int, p: float, shape) -> jnp.ndarray:
  """Booleans, each True with probability ``p``."""
  return jnp.asarray(_rng(seed).random(shape) < p)


def randint(seed: int, shape, low: int, high: int, dtype=None) -> jnp.ndarray:
  """Integers in ``[low, high)``; by default of JAX's default integer type (int64
  with float64 enabled, as ``jax.random.randint`` gives)."""
  x = _rng(seed).integers(low, high, shape)
  return jnp.asarray(x if dtype is None else x.astype(jnp.dtype(dtype)))
