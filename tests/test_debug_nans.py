"""Under ``jax_debug_nans`` every op run eagerly has its output checked for NaN:
``jax.grad`` outside ``jit``, ``jax.disable_jit()``, and the de-optimised re-run
with which JAX locates a NaN. The ops must make no NaN that is not in their
result (a NaN constant for invalid labels, ``0 * -inf`` before a select, a
fast path that computes first and redoes the rare NaN case), or the tool
reports a NaN on clean input and points at the library instead of the user's bug.

Each case is checked against ``jax.nn`` or optax in float64, computed outside
the debug mode; a real NaN (an out-of-range label) must still be reported.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsoftmax as js

RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 5))
MASK = np.ones((3, 5), bool)
MASK[0, 3] = False
LABELS = np.array([0, 1, 2])
Y = np.asarray(jax.nn.softmax(RNG.normal(size=(3, 5))))
W = RNG.normal(size=(5, 4))
NEG_INF = X.copy()
NEG_INF[1, 2] = -np.inf  # a -inf logit where the label weight is 0
ONE_HOT = np.eye(5)[LABELS]
PADDED = np.array([0, -100, 3])
optax_int = optax.softmax_cross_entropy_with_integer_labels


def _soft_ref(x, y, where=None):
  return optax.softmax_cross_entropy(x, y, where=where)


# name -> (ours, reference, x); both take x, the loss is summed.
CASES = {
  "softmax": (js.softmax, jax.nn.softmax, X),
  "softmax where": (
    lambda x: js.softmax(x, where=MASK),
    lambda x: jnp.where(MASK, jax.nn.softmax(x, where=MASK), 0),
    X,
  ),
  "log_softmax -inf": (js.log_softmax, jax.nn.log_softmax, NEG_INF),
  "soft labels": (lambda x: js.softmax_cross_entropy(x, Y), lambda x: _soft_ref(x, Y), X),
  "soft labels where": (
    lambda x: js.softmax_cross_entropy(x, Y, where=MASK),
    lambda x: _soft_ref(x, Y, MASK),
    X,
  ),
  # The CPU's unguarded-first form makes 0 * -inf here and redoes the slice.
  "soft labels, 0 weight at -inf": (
    lambda x: js.softmax_cross_entropy(x, ONE_HOT),
    lambda x: optax.softmax_cross_entropy_with_integer_labels(x, LABELS),
    NEG_INF,
  ),
  "integer labels": (
    lambda x: js.softmax_cross_entropy_with_integer_labels(x, LABELS),
    lambda x: optax.softmax_cross_entropy_with_integer_labels(x, LABELS),
    X,
  ),
  "integer labels where, smoothing, z-loss": (
    lambda x: js.softmax_cross_entropy_with_integer_labels(
      x, LABELS, where=MASK, label_smoothing=0.1, z_loss=1e-3
    ),
    lambda x: (
      _soft_ref(x, 0.9 * ONE_HOT + 0.1 * MASK / MASK.sum(-1, keepdims=True), MASK)
      + 1e-3 * jax.nn.logsumexp(x, -1, where=MASK) ** 2
    ),
    X,
  ),
  "integer labels -inf": (
    lambda x: js.softmax_cross_entropy_with_integer_labels(x, LABELS),
    lambda x: optax.softmax_cross_entropy_with_integer_labels(x, LABELS),
    NEG_INF,
  ),
  # Padding: label -100 at an example a mask of the batch shape leaves out.
  "integer labels, padding": (
    lambda x: js.softmax_cross_entropy_with_integer_labels(x, PADDED, where=PADDED != -100),
    lambda x: jnp.where(PADDED != -100, optax_int(x, np.maximum(PADDED, 0)), 0.0),
    X,
  ),
  "fused linear, padding": (
    lambda x: js.linear_softmax_cross_entropy(x, W, PADDED, where=PADDED != -100, reduction="none"),
    lambda x: jnp.where(PADDED != -100, optax_int(x @ W, np.maximum(PADDED, 0)), 0.0),
    X,
  ),
  "fused linear": (
    lambda x: js.linear_softmax_cross_entropy(x, W, np.array([0, 3, 2]), reduction="none"),
    lambda x: optax.softmax_cross_entropy_with_integer_labels(x @ W, np.array([0, 3, 2])),
    X,
  ),
}


def _value_and_grad(f, x):
  """The output and its VJP with a fixed random cotangent (a plain sum would give
  softmax a zero gradient)."""
  out, pullback = jax.vjp(f, x)
  ct = np.random.default_rng(1).normal(size=out.shape).astype(out.dtype)
  return out, pullback(ct)[0]


@pytest.mark.parametrize("mode", ["eager", "disable_jit"])
@pytest.mark.parametrize("name", list(CASES))
def test_no_nan_is_reported_on_clean_input(name, mode):
  ours, ref, x = CASES[name]
  want_value, want_grad = _value_and_grad(ref, jnp.asarray(x, jnp.float64))
  x = jnp.asarray(x, jnp.float32)
  with jax.debug_nans(True):
    if mode == "disable_jit":
      with jax.disable_jit():
        value, grad = _value_and_grad(ours, x)
    else:
      value, grad = _value_and_grad(ours, x)
  np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_a_real_nan_is_still_reported():
  # A label outside [0, C) gives NaN by design: the tool must still find it.
  with jax.debug_nans(True), pytest.raises(FloatingPointError):
    jax.grad(lambda x: jnp.sum(js.softmax_cross_entropy_with_integer_labels(x, LABELS + 3)))(
      jnp.asarray(X, jnp.float32)
    )


def test_the_flag_in_force_when_traced_picks_the_form():
  # The losses run through a cached jit; the flag is not part of jit's cache key,
  # so a trace made with it off must not serve a call with it on (the CPU's
  # compute-then-redo form, a cond, makes 0 * -inf here).
  x = jnp.asarray(NEG_INF, jnp.float32)

  def jaxpr():
    loss = lambda x: jnp.sum(js.softmax_cross_entropy(x, ONE_HOT))  # noqa: E731
    return str(jax.make_jaxpr(jax.grad(loss))(x))

  assert "cond" in jaxpr()  # flag off: the fast form, traced and cached first
  with jax.debug_nans(True):
    assert "cond" not in jaxpr()
