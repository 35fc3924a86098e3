"""Property-based tests: random shapes, axes, masks and dtypes (hypothesis)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxsoftmax

import draws
from references import eps, naive_softmax

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]


@st.composite
def cases(draw, with_mask=True):
  ndim = draw(st.integers(1, 3))
  shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
  kind = draw(st.sampled_from(["int", "tuple", "none"]))
  if kind == "int":
    axis = draw(st.integers(-ndim, ndim - 1))
  elif kind == "tuple":
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    axis = tuple(a - ndim if draw(st.booleans()) else a for a in axes)
  else:
    axis = None
  dtype = draw(st.sampled_from(DTYPES))
  seed = draw(st.integers(0, 2**31 - 1))
  x = np.asarray(draws.normal(seed, shape, scale=4.0))
  where = None
  if with_mask and draw(st.booleans()):
    where = np.asarray(draws.bernoulli(seed + 1, 0.7, shape))
  return jnp.asarray(x, dtype), axis, where


def _reduced(v, axis):
  return np.asarray(jnp.sum(jnp.asarray(v, jnp.float64), axis))


def _tol(dtype):
  # Each s_i is within a few ulps of its float64 value, so the (float64) sum of the
  # rounded outputs is within a few eps of 1 whatever the slice length.
  return 2 * eps(dtype) + 1e-13


# The CI box is small and shared: a slow draw is not a failure. (Each draw
# compiles its own programs; 14 draws a property keep the suite under 10 minutes.)
SETTINGS = settings(
  max_examples=14, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# One compiled program per drawn case is cheaper than many eager dispatches.
softmax = jax.jit(jaxsoftmax.softmax, static_argnums=1)
log_softmax = jax.jit(jaxsoftmax.log_softmax, static_argnums=1)
nn_softmax = jax.jit(jax.nn.softmax, static_argnums=1)
nn_log_softmax = jax.jit(jax.nn.log_softmax, static_argnums=1)


@SETTINGS
@given(cases())
def test_sums_to_one_or_zero_when_fully_masked(case):
  x, axis, where = case
  s = softmax(x, axis, where)
  assert s.dtype == x.dtype
  total = _reduced(s, axis)
  live = np.ones_like(total, bool) if where is None else _reduced(where, axis) > 0
  np.testing.assert_allclose(total[live], 1.0, atol=_tol(x.dtype))
  np.testing.assert_array_equal(total[~live], 0.0)
  if where is not None:
    np.testing.assert_array_equal(np.asarray(s, np.float64)[~np.asarray(where)], 0.0)


@SETTINGS
@given(cases(), st.floats(-50, 50))
def test_shift_invariance(case, c):
  x, axis, where = case
  x = x.astype(jnp.float64)
  np.testing.assert_allclose(softmax(x + c, axis, where), softmax(x, axis, where), atol=1e-13)
  a = log_softmax(x + c, axis, where)
  b = log_softmax(x, axis, where)
  np.testing.assert_allclose(a, b, atol=1e-12)


@SETTINGS
@given(cases())
def test_agrees_with_jax_nn_on_finite_input(case):
  x, axis, where = case
  ours = np.asarray(softmax(x, axis, where), np.float64)
  ref = np.asarray(nn_softmax(x.astype(jnp.float32), axis, where), np.float64)
  np.testing.assert_allclose(ours, ref, atol=4 * eps(x.dtype) + 1e-6)
  ours_l = np.asarray(log_softmax(x, axis, where), np.float64)
  ref_l = np.asarray(nn_log_softmax(x.astype(jnp.float32), axis, where), np.float64)
  finite = np.isfinite(ref_l)
  np.testing.assert_array_equal(np.isfinite(ours_l), finite)
  np.testing.assert_allclose(ours_l[finite], ref_l[finite], rtol=8 * eps(x.dtype), atol=1e-5)


@partial(jax.jit, static_argnums=(0, 1))
def _vjp(f, axis, x, g):
  return jax.vjp(lambda v: f(v, axis), x)[1](g)[0]


@SETTINGS
@given(cases(with_mask=False))
def test_vjp_matches_naive_autodiff_float64(case):
  x, axis, _ = case
  x = x.astype(jnp.float64)
  g = jnp.cos(jnp.arange(x.size, dtype=jnp.float64)).reshape(x.shape)
  dx = _vjp(jaxsoftmax.softmax, axis, x, g)
  dx_ref = _vjp(naive_softmax, axis, x, g)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-11, atol=1e-14)
