"""docs/derivation.md, checked: every numbered formula against autodiff of the naive definition.

Each test names the equations of the document it checks. Everything runs in
float64; the references are ``jax.jacrev`` / ``jax.grad`` / ``jax.vjp`` of the
definitions written out naively below, never of jaxsoftmax's own rules.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsoftmax

import draws

F64 = jnp.float64
ROOT = Path(__file__).resolve().parents[1]


# --- The naive definitions ----------------------------------------------------------


def softmax_naive(z):  # (1)
  return jnp.exp(z) / jnp.sum(jnp.exp(z))


def log_softmax_naive(z):  # (12)
  return z - jnp.log(jnp.sum(jnp.exp(z)))


def cross_entropy_naive(z, y):  # (15)
  return -jnp.sum(y * log_softmax_naive(z))


def masked_softmax_naive(z, m):  # (18)
  e = jnp.where(m, jnp.exp(z), 0.0)
  return e / jnp.sum(e)


def masked_log_softmax_naive(z, m):
  lse = jnp.log(jnp.sum(jnp.where(m, jnp.exp(z), 0.0)))
  return jnp.where(m, z - lse, -jnp.inf)


def _z(seed, n=6):
  return draws.normal(seed, (n,), F64, scale=2.0)


def _g(seed, n=6):
  return draws.normal(1000 + seed, (n,), F64)


def _close(a, b, rtol=1e-12, atol=1e-14):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


SEEDS = [0, 1]
SIZES = [1, 5, 17]


# --- 1. The Jacobian ----------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_eq2_eq3_the_two_pieces(seed):
  z = _z(seed)
  # (2): d e^{z_i} / dz_k = delta_ik e^{z_i}.
  _close(jax.jacrev(jnp.exp)(z), jnp.diag(jnp.exp(z)))
  # (3): dS/dz_k = e^{z_k}, and not S.
  d_sum = jax.grad(lambda z: jnp.sum(jnp.exp(z)))(z)
  _close(d_sum, jnp.exp(z))
  assert not np.allclose(d_sum, jnp.sum(jnp.exp(z)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
def test_eq4_to_eq7_jacobian(seed, n):
  z = _z(seed, n)
  jac = jax.jacrev(softmax_naive)(z)
  e, S, s = jnp.exp(z), jnp.sum(jnp.exp(z)), softmax_naive(z)
  delta = jnp.eye(n, dtype=F64)
  # (4): the quotient rule, before simplifying.
  _close((delta * e[:, None] * S - e[:, None] * e[None, :]) / S**2, jac)
  # (5): s_i (delta_ik - s_k).
  _close(s[:, None] * (delta - s[None, :]), jac)
  # (6): the diagonal s_i (1 - s_i) and the off-diagonal -s_i s_k.
  _close(jnp.diag(jac), s * (1 - s))
  off = ~np.eye(n, dtype=bool)
  _close(np.asarray(jac)[off], np.asarray(-jnp.outer(s, s))[off])
  # (7): diag(s) - s s^T.
  _close(jnp.diag(s) - jnp.outer(s, s), jac)


@pytest.mark.parametrize("seed", SEEDS)
def test_eq8_symmetric_rows_sum_to_zero_shift_invariant(seed):
  z = _z(seed)
  jac = jax.jacrev(softmax_naive)(z)
  _close(jac, jac.T)
  _close(jac @ jnp.ones(6, F64), jnp.zeros(6, F64), atol=1e-15)
  _close(softmax_naive(z + 7.5), softmax_naive(z))
  assert np.all(np.asarray(jac)[~np.eye(6, dtype=bool)] < 0)


def test_eq9_worked_example():
  z = jnp.array([1.0, 2.0, 0.5, -1.0, 3.0], F64)
  s = softmax_naive(z)
  _close(np.round(s, 3), [0.084, 0.229, 0.051, 0.011, 0.624], atol=1e-12)
  jac = jax.jacrev(softmax_naive)(z)
  assert round(float(jac[4, 4]), 3) == 0.235
  assert round(float(jac[1, 4]), 3) == -0.143


@pytest.mark.parametrize("seed", SEEDS)
def test_wrong_derivations_disagree_with_autodiff(seed):
  z, n = _z(seed), 6
  jac = jax.jacrev(softmax_naive)(z)
  s, delta = softmax_naive(z), jnp.eye(n, dtype=F64)
  # (W1): dS/dz_k taken as S.
  w1 = s[:, None] * (delta - 1.0)
  assert np.abs(w1 - jac).max() > 1e-3
  assert np.abs(w1.sum(axis=1)).min() > 1e-3  # its rows do not sum to zero
  # (W2): the diagonal only.
  w2 = jnp.diag(s * (1 - s))
  assert np.abs(w2 - jac).max() > 1e-3
  # With a constant g the true gradient is 0, W2's backward is not.
  g = jnp.full((n,), 2.0, F64)
  _close(g @ jac, jnp.zeros(n, F64), atol=1e-15)
  assert np.abs(g * s * (1 - s)).min() > 1e-6


# --- 2. The VJP ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
def test_eq10_vjp(seed, n):
  z, g = _z(seed, n), _g(seed, n)
  s = softmax_naive(z)
  reference = g @ jax.jacrev(softmax_naive)(z)
  _close(s * (g - jnp.dot(g, s)), reference)
  # jaxsoftmax's backward rule computes the same thing.
  _, vjp = jax.vjp(jaxsoftmax.softmax, z)
  _close(vjp(g)[0], reference)


def test_eq11_cost():
  n = 128_256
  assert 1.6e10 <= n**2 < 1.65e10
  assert round(n**2 * 4 / 1e9, 1) == 65.8  # float32 bytes, GB
  # The VJP never builds an n x n array; the Jacobian does.
  n = 300
  z, g = _z(0, n), _g(0, n)
  square = f"{n}x{n}x"
  vjp_hlo = jax.jit(lambda z, g: jax.vjp(jaxsoftmax.softmax, z)[1](g)[0]).lower(z, g).as_text()
  assert square not in vjp_hlo
  assert square in jax.jit(jax.jacrev(softmax_naive)).lower(z).as_text()


def _load_make_figure():
  spec = importlib.util.spec_from_file_location("make_figure", ROOT / "docs" / "make_figure.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_figure_numbers():
  """The figure shows J and the VJP for its z and g: check both against autodiff."""
  fig = _load_make_figure()
  r = fig.compute()
  z, g = jnp.asarray(fig.Z, F64), jnp.asarray(fig.G, F64)
  jac = jax.jacrev(softmax_naive)(z)
  _close(r["jacobian"], jac, rtol=1e-6, atol=1e-7)
  _close(r["vjp_through_jacobian"], g @ jac, rtol=1e-5, atol=1e-7)
  _close(r["vjp_without_jacobian"], g @ jac, rtol=1e-5, atol=1e-7)
  assert (ROOT / "docs" / "jacobian.png").is_file()


# --- 3. Log-softmax -----------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
def test_eq13_eq14_log_softmax(seed, n):
  z, g = _z(seed, n), _g(seed, n)
  s, l = softmax_naive(z), log_softmax_naive(z)
  _close(l, jnp.log(s))  # (12): l = log s
  jac = jax.jacrev(log_softmax_naive)(z)
  _close(jnp.eye(n, dtype=F64) - s[None, :], jac)  # (13)
  _close(g - jnp.exp(l) * jnp.sum(g), g @ jac)  # (14)
  _, vjp = jax.vjp(jaxsoftmax.log_softmax, z)
  _close(vjp(g)[0], g @ jac)


def test_eq14_avoids_dividing_by_an_underflowed_probability():
  z = jnp.array([0.0, 1000.0], F64)  # s_0 = e^-1000 underflows to 0
  g = jnp.array([1.0, 0.0], F64)
  s = softmax_naive(z - z.max())
  assert s[0] == 0.0
  # The chain rule through log(s_i) divides by s_0 = 0.
  chain = jax.grad(lambda z: jnp.log(softmax_naive(z - z.max()))[0])(z)
  assert not np.all(np.isfinite(chain))
  # (14) does not: d l_0 / dz = delta_0k - s_k = (1, -1).
  l = log_softmax_naive(z - z.max())
  _close(g - jnp.exp(l) * jnp.sum(g), [1.0, -1.0])
  _close(jax.vjp(jaxsoftmax.log_softmax, z)[1](g)[0], [1.0, -1.0])


# --- 4. Cross-entropy ---------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_eq15_to_eq17_cross_entropy(seed):
  n = 6
  z = _z(seed, n)
  s = softmax_naive(z)
  # (15): the two forms of the loss agree.
  y = draws.uniform(seed + 50, (n,), F64) * 2.0  # sums to != 1
  _close(-jnp.sum(y * z) + jnp.sum(y) * jnp.log(jnp.sum(jnp.exp(z))), cross_entropy_naive(z, y))
  # (16): s * sum(y) - y for any y.
  _close(s * jnp.sum(y) - y, jax.grad(cross_entropy_naive)(z, y))
  # (17): s - y for a distribution y: one-hot, and smoothed.
  label = seed % n
  one_hot = jax.nn.one_hot(label, n, dtype=F64)
  smooth = 0.9 * one_hot + 0.1 / n
  for target in (one_hot, smooth):
    _close(s - target, jax.grad(cross_entropy_naive)(z, target))
  # jaxsoftmax's losses compute the same gradients.
  g_int = jax.grad(jaxsoftmax.softmax_cross_entropy_with_integer_labels)(z, jnp.asarray(label))
  _close(g_int, s - one_hot)
  _close(jax.grad(jaxsoftmax.softmax_cross_entropy)(z, smooth), s - smooth)


# --- 5. Masks -----------------------------------------------------------------------

MASK = jnp.array([True, False, True, True, False, True])


@pytest.mark.parametrize("seed", SEEDS)
def test_eq18_eq19_masked_jacobian(seed):
  z = _z(seed)
  s = masked_softmax_naive(z, MASK)
  _close(s, jaxsoftmax.softmax(z, where=MASK))  # (18) is jaxsoftmax's masked softmax
  jac = jax.jacrev(masked_softmax_naive)(z, MASK)
  # (19): the unmasked formula (5) with s = 0 at masked entries ...
  _close(s[:, None] * (jnp.eye(6, dtype=F64) - s[None, :]), jac)
  # ... whose rows and columns at masked entries are zero.
  dead = ~np.asarray(MASK)
  assert np.all(np.asarray(jac)[dead] == 0) and np.all(np.asarray(jac)[:, dead] == 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_eq20_masked_vjp_zeroes_g_first(seed):
  z = _z(seed)
  g = _g(seed).at[1].set(jnp.inf).at[4].set(jnp.nan)  # junk at the masked entries
  s = masked_softmax_naive(z, MASK)
  g_tilde = jnp.where(MASK, g, 0.0)
  reference = g_tilde @ jax.jacrev(masked_softmax_naive)(z, MASK)
  _close(s * (g_tilde - jnp.dot(g_tilde, s)), reference)  # (20)
  # (10) with the raw g is NaN: 0 * inf.
  assert np.isnan(s * (g - jnp.dot(g, s))).any()
  _, vjp = jax.vjp(lambda z: jaxsoftmax.softmax(z, where=MASK), z)
  _close(vjp(g)[0], reference)


@pytest.mark.parametrize("seed", SEEDS)
def test_eq21_masked_log_softmax(seed):
  z = _z(seed)
  g = _g(seed)  # non-zero at the masked entries too
  l = masked_log_softmax_naive(z, MASK)
  _close(jaxsoftmax.log_softmax(z, where=MASK), l)
  g_tilde = jnp.where(MASK, g, 0.0)
  reference = jax.vjp(lambda z: masked_log_softmax_naive(z, MASK), z)[1](g)[0]
  _close(g_tilde - jnp.exp(l) * jnp.sum(g_tilde), reference)  # (21)
  assert np.all(np.asarray(reference)[~np.asarray(MASK)] == 0)
  _, vjp = jax.vjp(lambda z: jaxsoftmax.log_softmax(z, where=MASK), z)
  _close(vjp(g)[0], reference)


@pytest.mark.parametrize("label", [0, 3])
def test_eq22_masked_cross_entropy(label):
  z = _z(label)
  y = jax.nn.one_hot(label, 6, dtype=F64)

  def naive(z):
    return -jnp.sum(jnp.where(MASK, y * masked_log_softmax_naive(z, MASK), 0.0))

  s = masked_softmax_naive(z, MASK)
  grad = jax.grad(naive)(z)
  _close(s - y, grad)  # (17) with the masked s
  assert np.all(np.asarray(grad)[~np.asarray(MASK)] == 0)
  ours = jax.grad(
    lambda z: jaxsoftmax.softmax_cross_entropy_with_integer_labels(
      z, jnp.asarray(label), where=MASK
    )
  )(z)
  _close(ours, grad)


def test_fully_masked_slice():
  z, g = _z(7), _g(7)
  none = jnp.zeros(6, jnp.bool_)
  label = jnp.asarray(2)
  ce = jaxsoftmax.softmax_cross_entropy_with_integer_labels
  out_s, vjp_s = jax.vjp(lambda z: jaxsoftmax.softmax(z, where=none), z)
  out_l, vjp_l = jax.vjp(lambda z: jaxsoftmax.log_softmax(z, where=none), z)
  np.testing.assert_array_equal(out_s, 0.0)
  np.testing.assert_array_equal(out_l, -np.inf)
  assert float(ce(z, label, where=none)) == 0.0
  np.testing.assert_array_equal(vjp_s(g)[0], 0.0)
  np.testing.assert_array_equal(vjp_l(g)[0], 0.0)
  np.testing.assert_array_equal(jax.grad(ce)(z, label, where=none), 0.0)
  # (14) applied blindly, with exp(l) = 0, would return g: hence the per-slice flag.
  _close(g - jnp.exp(out_l) * jnp.sum(g), g)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_eq23_large_negative_fill_gives_a_uniform_softmax(n):
  c = float(jnp.finfo(jnp.float32).min)
  _close(softmax_naive(jnp.full((n,), c, F64) - c), jnp.full((n,), 1.0 / n, F64))
  scores = draws.normal(n, (n,))
  filled = jnp.where(jnp.zeros(n, jnp.bool_), scores, c)  # the -1e30 trick, all masked
  _close(jax.nn.softmax(filled), jnp.full((n,), 1.0 / n), rtol=1e-6)
  np.testing.assert_array_equal(jaxsoftmax.softmax(scores, where=jnp.zeros(n, jnp.bool_)), 0.0)


# --- 6. Residuals -------------------------------------------------------------------


def _residuals(f, *args):
  from jax._src.ad_checkpoint import saved_residuals

  return [aval for aval, _ in saved_residuals(f, *args)]


def test_eq24_only_the_output_is_saved():
  z = draws.normal(3, (8, 32))
  # softmax: its output, nothing else.
  assert [(r.shape, r.dtype) for r in _residuals(jaxsoftmax.softmax, z)] == [(z.shape, z.dtype)]
  # log-softmax: its output and one flag per slice.
  res = _residuals(jaxsoftmax.log_softmax, z)
  assert sorted((r.shape, str(r.dtype)) for r in res) == [((8, 1), "bool"), (z.shape, "float32")]
  # The naive definition keeps more than one full-size array.
  naive = _residuals(lambda z: jnp.exp(z) / jnp.sum(jnp.exp(z), -1, keepdims=True), z)
  assert sum(r.size == z.size for r in naive) >= 2
  # Cross-entropy: one logits-sized array and per-example scalars.
  labels = jnp.zeros(8, jnp.int32)
  res = _residuals(lambda z: jaxsoftmax.softmax_cross_entropy_with_integer_labels(z, labels), z)
  assert sum(r.size == z.size for r in res) == 1
  assert all(r.size <= 8 for r in res if r.size != z.size)
