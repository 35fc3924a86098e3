"""Logits far from zero: log-probabilities and gradients stay at float32 rounding.

At logits near 3e4, ``lse = m + log d`` rounds at the scale of ``m`` (an ulp of
3e4 is 2e-3 in float32), so ``x - lse`` and ``exp(x - lse)`` are off by about
1e-3 absolute where ``(x - m) - log d`` is exact up to the last subtraction (as
``jax.nn.log_softmax`` computes it). Every op here once took the first form and
missed float64 by 400-6000 eps; the references are float64 ``jax.nn`` and
autodiff of the naive definitions, on the same float32-rounded inputs.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsoftmax
from jaxsoftmax._pallas import gpu, ops, tpu

import draws
from references import eps, rel_err

TOL = 16 * eps(jnp.float32)  # the old forms: 5e-5 (values) to 2e-4 (gradients)
OFFSET = 3e4


def _logits(shape, seed=0):
  return OFFSET + draws.normal(seed, shape, scale=3.0)


def _cotangent(shape, seed=1):
  return draws.normal(seed, shape)


def _log_softmax64(x, g):
  y, vjp = jax.vjp(partial(jax.nn.log_softmax, axis=-1), x.astype(jnp.float64))
  return y, vjp(g.astype(jnp.float64))[0]


# The XLA path takes (x - m) - log d for the output alone, and under autodiff
# from 4096 slices; x - hi - lo under autodiff below that (`_xla._shared_shift`):
# the output alone and the VJP's output are checked on both sides.
@pytest.mark.parametrize("shape", [(16, 1000), (4096, 16)])
def test_log_softmax_xla(shape):
  from jaxsoftmax import _xla

  x, g = _logits(shape), _cotangent(shape)
  f = lambda x: jaxsoftmax.log_softmax(x, implementation="xla")  # noqa: E731
  y, vjp = jax.vjp(f, x)
  ry, rdx = _log_softmax64(x, g)
  assert rel_err(jax.jit(f)(x), ry) <= TOL  # the output alone: shared shift
  assert rel_err(y, ry) <= TOL
  assert rel_err(vjp(g)[0], rdx) <= TOL
  assert _xla._shared_shift(shape, (1,), for_grad=True) == (shape[0] >= 4096)
  assert _xla._shared_shift(shape, (1,), for_grad=False)


@pytest.mark.parametrize(
  "be",
  [
    ops.make(gpu, gpu.Config(interpret=True)),  # rows kept whole
    ops.make(gpu, gpu.Config(interpret=True, row_bytes=256, chunk_elems=256)),  # streamed
    ops.make(tpu, tpu.Config(interpret=True)),
  ],
  ids=["gpu-rows", "gpu-streamed", "tpu"],
)
def test_log_softmax_pallas_kernels(be):
  x, g = _logits((8, 1024)), _cotangent((8, 1024))
  y, live = be.log_softmax_fwd(x, None, (1,), None)
  dx = be.log_softmax_bwd(y, live, None, g, (1,), None)
  ry, rdx = _log_softmax64(x, g)
  assert rel_err(y, ry) <= TOL
  assert rel_err(dx, rdx) <= TOL


def _ce64(x, t, w):
  """float64 ``-sum(t * log_softmax(x))`` over the classes ``w`` keeps, and its
  gradient (of the sum over examples)."""

  def f(x):
    l = jax.nn.log_softmax(x, axis=-1, where=w)
    return -jnp.sum(jnp.where(t == 0, 0.0, t * l), axis=-1)

  x64 = x.astype(jnp.float64)
  return f(x64), jax.grad(lambda x: jnp.sum(f(x)))(x64)


@pytest.mark.parametrize(
  "kind, where, smoothing",
  [("integer", w, s) for w in (False, True) for s in (0.0, 0.1)]
  + [("soft", False, 0.0), ("soft", True, 0.0)],
)
def test_cross_entropy(kind, where, smoothing):
  # Integer labels without `where` take the CPU's label-shifted path, with it the
  # max-shifted one; the smoothing term is a mean of the logits over the kept classes.
  x = _logits((32, 500))
  labels = draws.randint(2, (32,), 0, 400)
  w = (jnp.arange(500) < 450)[None] if where else None
  if kind == "integer":
    f = partial(
      jaxsoftmax.softmax_cross_entropy_with_integer_labels,
      labels=labels,
      where=w,
      label_smoothing=smoothing,
    )
    kept = 500 if w is None else 450
    t = (1 - smoothing) * jax.nn.one_hot(labels, 500, dtype=jnp.float64) + smoothing / kept
    t = t if w is None else t * w
  else:
    t = jax.nn.softmax(_cotangent((32, 500)), axis=-1) * (1.0 if w is None else w)
    t = t / jnp.sum(t, axis=-1, keepdims=True)
    f = partial(jaxsoftmax.softmax_cross_entropy, labels=t, where=w)
  loss, dx = jax.value_and_grad(lambda x: jnp.sum(f(x)))(x)
  ref_loss, ref_dx = _ce64(x, jnp.asarray(t, jnp.float64), w)
  assert rel_err(f(x), ref_loss) <= TOL
  assert rel_err(dx, ref_dx) <= TOL
  assert np.isfinite(float(loss))


@pytest.mark.parametrize("where", [False, True], ids=["label-shifted", "max-shifted"])
def test_small_probabilities_keep_their_gradient_entries_to_a_few_ulps(where):
  # Logits spread over +-100 around 3e4: most probabilities are small. Each
  # gradient entry g * p must keep p to a few ulps, as optax's exp(x - m) / d
  # does; exp((x - m) - log d) carried |log p| ulps (3.8e-6 relative here).
  x = OFFSET + draws.normal(4, (64, 1000), scale=30.0)
  labels = draws.randint(5, (64,), 0, 900)
  w = (jnp.arange(1000) < 900)[None] if where else None
  f = partial(jaxsoftmax.softmax_cross_entropy_with_integer_labels, labels=labels, where=w)
  dx = jax.grad(lambda x: jnp.sum(f(x)))(x)

  def ref(x):
    l = jax.nn.log_softmax(x if w is None else jnp.where(w, x, -jnp.inf), axis=-1)
    return -jnp.sum(jnp.take_along_axis(l, labels[:, None], -1))

  ref_dx = np.asarray(jax.grad(ref)(x.astype(jnp.float64)))
  # Off-label entries: the label's is p - 1, which cancels where p is near 1 (as
  # in optax); subnormal entries round coarser.
  off_label = np.arange(1000)[None] != np.asarray(labels)[:, None]
  normal = off_label & (np.abs(ref_dx) > np.finfo(np.float32).tiny)
  err = np.abs(np.asarray(dx, np.float64) - ref_dx)[normal] / np.abs(ref_dx)[normal]
  assert err.max() <= 8 * eps(jnp.float32), err.max()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy(smoothing):
  # z = x @ w with a constant feature whose weight lifts every logit by OFFSET.
  # x in quarters and w in 64ths: every product and partial sum is a multiple of
  # 1/256 below 2^15, exact in float32, so the float32 matmul gives the exact z
  # and any error is the loss's own.
  n, h, v = 16, 8, 300
  x = (draws.randint(3, (n, h), -4, 5) / 4).astype(jnp.float32).at[:, 0].set(1.0)
  w = (draws.randint(4, (h, v), -64, 65) / 64).astype(jnp.float32).at[0].set(OFFSET)
  labels = draws.randint(5, (n,), 0, v)
  kw = dict(chunk_size=128, reduction="none", label_smoothing=smoothing)
  f = lambda x, w: jaxsoftmax.linear_softmax_cross_entropy(x, w, labels, **kw)  # noqa: E731

  def ref(x, w):
    z = jnp.dot(x, w, precision="highest")
    t = (1 - smoothing) * jax.nn.one_hot(labels, v, dtype=z.dtype) + smoothing / v
    return -jnp.sum(t * jax.nn.log_softmax(z, axis=-1), -1)

  ct = _cotangent((n,))
  loss, vjp = jax.vjp(f, x, w)
  x64, w64 = x.astype(jnp.float64), w.astype(jnp.float64)
  ref_loss, ref_vjp = jax.vjp(ref, x64, w64)
  assert rel_err(loss, ref_loss) <= TOL
  (dx, dw), (ref_dx, ref_dw) = vjp(ct), ref_vjp(ct.astype(jnp.float64))
  assert rel_err(dw, ref_dw) <= TOL
  # dx[:, 0] = dz @ w[0] = OFFSET * sum(dz), which cancels to 0: its float32
  # rounding is the matmul's, not the loss's. The other features are checked.
  assert rel_err(dx[:, 1:], ref_dx[:, 1:]) <= TOL


@pytest.mark.parametrize(
  "where", [None, jnp.ones((1, 4), bool)], ids=["label-shifted", "max-shifted"]
)
def test_label_smoothing_near_float_max(where):
  # The smoothing term is a mean of x - shift: a sum of those terms would overflow
  # (to -inf or +inf) where the mean, and the loss, do not.
  x = jnp.array([[2e38, 2e38, 1.0, 0.0]], jnp.float32)
  x64 = np.asarray(x, np.float64)[0]
  lse = 2e38 + np.log(2.0)
  want = lse - 0.9 * x64[1] - 0.1 * np.mean(x64)  # 1e37
  got = jaxsoftmax.softmax_cross_entropy_with_integer_labels(
    x, jnp.array([1]), where=where, label_smoothing=0.1
  )
  assert rel_err(got, np.array([want])) <= TOL


def test_z_loss_where_lse_squared_overflows():
  # z * lse**2 = 1e-4 * (1e20)**2 = 1e36 fits in float32; lse**2 alone does not.
  x = jnp.array([[1e20, 0.0, -1.0]], jnp.float32)
  want = np.array([1e-4 * 1e20**2])  # lse - x_y is 0 at this scale
  int_ce = jaxsoftmax.softmax_cross_entropy_with_integer_labels
  got = {
    "integer": int_ce(x, jnp.array([0]), z_loss=1e-4),
    "soft": jaxsoftmax.softmax_cross_entropy(x, jnp.array([[1.0, 0.0, 0.0]]), z_loss=1e-4),
    "fused": jaxsoftmax.linear_softmax_cross_entropy(
      jnp.ones((1, 1)), x, jnp.array([0]), z_loss=1e-4, reduction="none"
    ),
  }
  for name, loss in got.items():
    assert rel_err(loss, want) <= TOL, name
  # The gradient 2 z lse dlse/dx = 2e16 at the max.
  dx = jax.grad(lambda x: jnp.sum(int_ce(x, jnp.array([0]), z_loss=1e-4)))(x)
  assert rel_err(dx, np.array([[2e16, 0.0, 0.0]])) <= TOL
