"""softmax_cross_entropy(_with_integer_labels): values, VJPs, semantics, residuals, errors.

References: optax, jax.grad of the naive definition in float64, PyTorch float64,
and closed forms. Nothing here compares jaxsoftmax with itself.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jaxsoftmax

from references import eps, rel_err

soft_ce = jaxsoftmax.softmax_cross_entropy
int_ce = jaxsoftmax.softmax_cross_entropy_with_integer_labels

# (logits shape, axis): int, negative, tuple (in and out of order) and None.
SHAPES_AXES = [
  ((5, 9), -1),
  ((9, 5), 0),
  ((3, 4, 6), 1),
  ((3, 4, 6), (0, 2)),
  ((2, 3, 4, 5), (3, 1)),
  ((2, 3, 4, 5), (-1, -3, -2)),
]


def _normal(seed, shape, dtype=jnp.float64, scale=3.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


def _probs(seed, shape, axes, dtype=jnp.float64):
  e = np.exp(np.random.default_rng(seed).normal(size=shape) * 2.0)
  return jnp.asarray(e / e.sum(axes, keepdims=True), dtype)


def _vjp(f, *args, g=None):
  """``f(*args)`` and its VJP at ``g`` (ones if None), in one jitted call (fast to test)."""

  def run(args, g):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(jnp.ones_like(out) if g is None else g)

  return jax.jit(run)(args, g)


def _axes(axis, ndim):
  if axis is None:
    return tuple(range(ndim))
  return tuple(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,)))


def _batch(shape, axis):
  axes = _axes(axis, len(shape))
  return tuple(n for i, n in enumerate(shape) if i not in axes)


def _int_labels(seed, shape, axis):
  axes = _axes(axis, len(shape))
  n = math.prod(shape[a] for a in axes)
  return jnp.asarray(np.random.default_rng(seed).integers(0, n, _batch(shape, axis)))


def _one_hot(labels, shape, axis):
  """The one-hot array over the class axes: optax's flat index, in the order of ``axis``."""
  order = _axes(axis, len(shape))
  sizes = tuple(shape[a] for a in order)
  oh = jax.nn.one_hot(labels, math.prod(sizes), dtype=jnp.float64).reshape(labels.shape + sizes)
  batch_axes = [i for i in range(len(shape)) if i not in order]
  # oh's axes are (batch axes..., order...): move them back to their places.
  return jnp.moveaxis(oh, tuple(range(oh.ndim)), tuple(batch_axes) + order)


def _naive(x, t, axis, where=None, z_loss=0.0):
  """``-sum(t * log_softmax(x)) + z * lse**2``, literally (moderate x), over kept entries."""
  axes = _axes(axis, x.ndim)
  e = jnp.exp(x) if where is None else jnp.where(where, jnp.exp(x), 0.0)
  lse = jnp.log(jnp.sum(e, axes, keepdims=True))
  terms = t * (x - lse)
  if where is not None:
    terms = jnp.where(where, terms, 0.0)
  return -jnp.sum(terms, axes) + z_loss * jnp.squeeze(lse, axes) ** 2


def _smooth(t, eps_, n):
  return (1 - eps_) * t + eps_ / n


# --- Against optax and the naive definition, float64 -------------------------------


def _assert_close_tree(actual, expected, rtol, atol=0.0):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_soft_labels_match_optax_and_naive(shape, axis):
  x, y = _normal(0, shape), _probs(1, shape, _axes(axis, len(shape)))
  g = _normal(2, _batch(shape, axis), scale=1.0)
  loss, grads = _vjp(partial(soft_ce, axis=axis), x, y, g=g)
  assert loss.dtype == jnp.float64 and loss.shape == g.shape
  for ref in (partial(optax.softmax_cross_entropy, axis=axis), partial(_naive, axis=axis)):
    ref_loss, ref_grads = _vjp(ref, x, y, g=g)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-13, atol=1e-14)
    _assert_close_tree(grads, ref_grads, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_integer_labels_match_optax_and_naive(shape, axis):
  x, labels = _normal(3, shape), _int_labels(4, shape, axis)
  g = _normal(5, labels.shape, scale=1.0)
  loss, (dx,) = _vjp(lambda x: int_ce(x, labels, axis=axis), x, g=g)
  assert loss.dtype == jnp.float64 and loss.shape == labels.shape
  t = _one_hot(labels, shape, axis)
  for ref in (
    lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels, axis=axis),
    lambda x: _naive(x, t, axis),
  ):
    ref_loss, (ref_dx,) = _vjp(ref, x, g=g)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_label_scatter_claims_sorted_indices_only_when_they_are(axis, dtype):
  # The backward puts each example's label term with one scatter. Its index
  # tuples run row-major, so they are in lexicographic order only with the
  # class axis last; a backend may rely on the claim (jax: otherwise undefined).
  shape = (3, 4, 5)
  labels = _int_labels(6, shape, axis) % shape[axis]
  x = jnp.zeros(shape, dtype)
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: int_ce(x, labels, axis=axis).sum()))(x)
  assert _scatter_claims(jaxpr.jaxpr) == [axis == len(shape) - 1]


def _scatter_claims(jaxpr) -> list[bool]:
  """``indices_are_sorted`` of every scatter in ``jaxpr``, nested jaxprs included."""
  found = []
  for e in jaxpr.eqns:
    if e.primitive.name.startswith("scatter"):
      found.append(e.params["indices_are_sorted"])
    for p in e.params.values():
      inner = getattr(p, "jaxpr", p)  # a ClosedJaxpr or a Jaxpr
      if hasattr(inner, "eqns"):
        found += _scatter_claims(inner)
  return found


def test_eager_calls_and_axis_none():
  # Eagerly (no jit): the public functions as most users first call them.
  x, y = _normal(6, (3, 4)), _probs(7, (3, 4), (0, 1))
  loss = soft_ce(x, y, axis=None)
  assert loss.shape == ()
  np.testing.assert_allclose(loss, optax.softmax_cross_entropy(x, y, axis=None), rtol=1e-13)
  t = _one_hot(jnp.array(5), (3, 4), None)
  np.testing.assert_allclose(int_ce(x, jnp.array(5), axis=None), _naive(x, t, None), rtol=1e-13)
  dx = jax.grad(lambda x: int_ce(x, jnp.array([1, 0, 3])).sum())(x)
  np.testing.assert_allclose(
    dx, jax.nn.softmax(x) - jax.nn.one_hot(jnp.array([1, 0, 3]), 4, dtype=x.dtype), rtol=1e-13
  )


@pytest.mark.parametrize("where", [None, "full", "per example"])
def test_invalid_label_on_an_empty_example_is_nan_with_or_without_where(where):
  # All -inf logits and an out-of-range label: loss NaN and gradient NaN, as its
  # loss, whether or not a `where` that keeps every class is passed. A padding
  # example (where keeps nothing) stays 0 with a zero gradient, whatever its label.
  x = jnp.array([[-jnp.inf] * 3, [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
  labels = jnp.array([5, 0, -100])
  keep = jnp.array([True, True, False])
  w = {None: None, "full": jnp.broadcast_to(keep[:, None], (3, 3)), "per example": keep}[where]
  if where is None:
    labels = labels.at[2].set(1)
  loss, vjp = jax.vjp(lambda v: int_ce(v, labels, where=w), x)
  (dx,) = vjp(jnp.ones(3))
  assert np.isnan(loss[0]) and np.isnan(dx[0]).all()
  np.testing.assert_allclose(dx[1], jax.nn.softmax(x[1]) - jnp.eye(3)[0], rtol=1e-14)
  if where is not None:
    assert loss[2] == 0.0 and (dx[2] == 0.0).all()


def test_full_label_smoothing_at_a_minus_inf_logit():
  # eps = 1: the target is uniform over the kept classes and the label drops out;
  # no 0 * (-inf) from the label's own (vanished) term.
  x = jnp.array([[1.0, 2.0, -jnp.inf]])
  # A kept -inf logit: -mean(log_softmax(x)) = +inf, at the label or not.
  for label in (2, 0):
    assert int_ce(x, jnp.array([label]), label_smoothing=1.0)[0] == jnp.inf
  # The label on a class that `where` masks: -mean over the kept classes.
  w = jnp.array([[True, True, False]])
  expected = -jnp.mean(jax.nn.log_softmax(x[:, :2]))
  got = int_ce(x, jnp.array([2]), where=w, label_smoothing=1.0)
  np.testing.assert_allclose(got[0], expected, rtol=1e-14)
  # Soft labels: the loss does not depend on them, so their gradient is exactly 0.
  y = jnp.array([[0.2, 0.3, 0.5]])
  dy = jax.grad(lambda y: soft_ce(x, y, label_smoothing=1.0).sum())(y)
  np.testing.assert_array_equal(dy, jnp.zeros_like(y))
  # The fused loss: a column of w that makes the label's logit -inf.
  h = jnp.ones((1, 2))
  wm = jnp.array([[0.5, -1.0, -jnp.inf], [0.25, 1.0, -jnp.inf]])
  lce = jaxsoftmax.linear_softmax_cross_entropy
  assert lce(h, wm, jnp.array([2]), label_smoothing=1.0, reduction="none")[0] == jnp.inf
  z = h @ wm[:, :2]
  got = lce(h, wm[:, :2], jnp.array([1]), label_smoothing=1.0, reduction="none")
  np.testing.assert_allclose(got[0], -jnp.mean(jax.nn.log_softmax(z)), rtol=1e-14)


def test_repeated_eager_calls_compile_nothing(caplog):
  # Run op by op, the losses' conditionals and loops were traced and compiled
  # anew at every call (0.1 s each); eager calls now share one cached jit.
  x, labels = _normal(30, (8, 10)), jnp.arange(8) % 10
  h, w = _normal(31, (8, 6)), _normal(32, (6, 10))
  calls = {
    "integer labels": lambda: int_ce(x, labels, label_smoothing=0.1),
    "soft labels": lambda: soft_ce(x, jax.nn.one_hot(labels, 10, dtype=x.dtype)),
    "fused": lambda: jaxsoftmax.linear_softmax_cross_entropy(h, w, labels),
    # jax.grad outside jit: under its tracer the loss runs through the same jit
    # (99 ms a call at 64 x 1000 op by op, 1.4 ms now).
    "grad, integer labels": lambda: jax.grad(lambda x: jnp.sum(int_ce(x, labels)))(x),
    "grad, soft labels": lambda: jax.grad(lambda x: jnp.sum(soft_ce(x, jax.nn.softmax(x))))(x),
    "grad, fused": lambda: jax.grad(jaxsoftmax.linear_softmax_cross_entropy, (0, 1))(h, w, labels),
  }
  for name, f in calls.items():
    first = f()
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level("WARNING"):
      again = f()
    compiled = [m for m in caplog.messages if "Finished XLA compilation" in m]
    assert not compiled, (name, compiled)
    jax.tree.map(np.testing.assert_array_equal, again, first)
  # A value the eager path cannot take static still runs, unjitted: a list axis.
  np.testing.assert_allclose(int_ce(x, labels, axis=[1]), int_ce(x, labels), rtol=1e-15)


def test_labels_broadcast_and_unnormalised_labels_match_optax():
  x = _normal(8, (4, 6))
  g = _normal(10, (4,), scale=1.0)
  rng = np.random.default_rng(12)
  for y in (_probs(9, (1, 6), -1), jnp.asarray(rng.uniform(size=(4, 6)) * 3)):
    loss, grads = _vjp(soft_ce, x, y, g=g)
    ref_loss, ref_grads = _vjp(optax.softmax_cross_entropy, x, y, g=g)
    assert grads[1].shape == y.shape  # a broadcast label's gradient is summed back
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-13)
    _assert_close_tree(grads, ref_grads, rtol=1e-12, atol=1e-14)


def test_integer_labels_broadcast_to_the_batch_shape():
  x = _normal(13, (4, 6))
  ours = _vjp(lambda x: int_ce(x, jnp.array([2])), x)
  ref = _vjp(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, jnp.full(4, 2)), x)
  _assert_close_tree(ours, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["element", "example", "classes"])
def test_where_matches_optax(kind):
  shape = (6, 3, 8)
  x, y, labels = _normal(14, shape), _probs(15, shape, -1), _int_labels(16, shape, -1)
  rng = np.random.default_rng(17)
  mask = {
    "element": rng.uniform(size=shape) < 0.6,
    "example": np.array([[True, False, True]] * 6),  # batch shape: one flag per example
    "classes": np.broadcast_to(np.arange(8) < 5, (1, 1, 8)).copy(),
  }[kind]
  if kind == "element":
    mask[:, :, 0] = True
  mask = np.broadcast_to(mask, (6, 3) + mask.shape[2:]).copy()
  mask[4] = False  # a fully masked example
  mask = jnp.asarray(mask)
  g = _normal(18, shape[:2], scale=1.0)
  live = np.asarray(jnp.broadcast_to(mask if mask.ndim == 3 else mask[..., None], shape)).any(-1)
  for ours, ref, lab in [
    (soft_ce, optax.softmax_cross_entropy, y),
    (int_ce, optax.softmax_cross_entropy_with_integer_labels, labels),
  ]:
    loss, (dx,) = _vjp(lambda x, ours=ours, lab=lab: ours(x, lab, where=mask), x, g=g)
    ref_loss, (ref_dx,) = _vjp(lambda x, ref=ref, lab=lab: ref(x, lab, where=mask), x, g=g)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(loss[4], 0.0)
    np.testing.assert_array_equal(dx[4], 0.0)
    # The fully masked example is checked above; compare the others.
    np.testing.assert_allclose(dx[live], ref_dx[live], rtol=1e-12, atol=1e-14)


def test_integer_label_at_a_masked_class_counts_its_logit_as_optax():
  x = _normal(19, (3, 5))
  labels, mask = jnp.array([1, 2, 4]), jnp.ones((3, 5), bool).at[1, 2].set(False)
  ours = _vjp(lambda x: int_ce(x, labels, where=mask), x)
  ref = _vjp(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels, where=mask), x)
  _assert_close_tree(ours, ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_label_at_a_masked_class_beside_kept_classes_all_neg_inf(dtype):
  # The README's rule, lse over the kept classes minus the label's logit, is
  # -inf - x_y = -inf here (it was -finfo.max - x_y); the gradient is 0, as for
  # any example whose kept logits are all -inf.
  x = jnp.array([[-jnp.inf, -jnp.inf, 0.5], [-jnp.inf, -jnp.inf, 3.0]], dtype)
  mask = jnp.array([[True, True, False]] * 2)
  for z in (0.0, 1e-4):
    f = partial(int_ce, labels=jnp.array([2, 0]), where=mask, z_loss=z)
    loss, dx = f(x), jax.grad(lambda x, f=f: jnp.sum(f(x).astype(jnp.float32)))(x)
    np.testing.assert_array_equal(loss, jnp.array([-jnp.inf, jnp.inf], dtype))
    np.testing.assert_array_equal(dx, jnp.zeros_like(x))


def test_check_grads_second_order_reverse():
  x, y, labels = _normal(20, (3, 5), scale=1.0), _probs(21, (3, 5), -1), jnp.array([0, 4, 2])
  f = jax.jit(partial(soft_ce, label_smoothing=0.1, z_loss=0.01))
  check_grads(f, (x, y), order=2, modes=["rev"])
  f = jax.jit(lambda x: int_ce(x, labels, label_smoothing=0.2, z_loss=0.1))
  check_grads(f, (x,), order=2, modes=["rev"])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_second_order_reverse_with_masked_classes(smoothing):
  # The labels' gradient differentiated again, through the loss's cotangent: its
  # log-probabilities are -inf at the masked classes, where no 0 * -inf may appear.
  x, y = _normal(22, (3, 5), scale=1.0), _probs(23, (3, 5), -1)
  mask = jnp.array([[True, True, True, False, True]] * 2 + [[False, True, True, True, True]])
  f = jax.jit(partial(soft_ce, where=mask, label_smoothing=smoothing, z_loss=0.01))
  check_grads(f, (x, y), order=2, modes=["rev"])
  # d/da of sum(d(a * loss)/dy) = sum(d loss/dy), written out: -(1 - eps) log p at
  # the kept classes, 0 at the masked ones.
  # At a = 0 too (a loss weight that starts at 0), where the labels' gradient is 0.
  logp = jnp.where(mask, x - jax.nn.logsumexp(jnp.where(mask, x, -jnp.inf), -1, keepdims=True), 0)
  for a0 in (1.0, 0.0):
    dy_sum = jax.grad(lambda a: jnp.sum(jax.grad(lambda y: jnp.sum(a * f(x, y)))(y)))(a0)
    assert rel_err(dy_sum, -(1 - smoothing) * jnp.sum(logp)) <= 1e-12, a0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_second_order_reverse_in_16_bits(dtype):
  # A Hessian-vector product through the backward of 16-bit logits (whose label
  # entry is set by a scatter on the bit patterns, differentiated as the float
  # scatter) against float64 autodiff of the naive definitions, at the same
  # rounded inputs.
  x, v = _normal(60, (6, 40)).astype(dtype), _normal(61, (6, 40)).astype(dtype)
  y, labels = _probs(62, (6, 40), -1).astype(dtype), _int_labels(63, (6, 40), -1)
  x64, v64, y64 = (a.astype(jnp.float64) for a in (x, v, y))

  def hvp(loss, x, v):
    grad = jax.grad(lambda x: jnp.sum(loss(x).astype(jnp.float64)))
    return jax.grad(lambda x: jnp.vdot(grad(x).astype(jnp.float64), v))(x)

  cases = [
    (
      lambda x: int_ce(x, labels),
      lambda x: _naive(x, jax.nn.one_hot(labels, 40, dtype=x.dtype), -1),
    ),
    (lambda x: soft_ce(x, y), lambda x: _naive(x, y64, -1)),
  ]
  for ours, naive in cases:
    got = jax.jit(partial(hvp, ours))(x, v.astype(jnp.float64))
    assert got.dtype == dtype
    assert rel_err(got, hvp(naive, x64, v64)) <= 8 * eps(dtype)


def test_vmap_composes():
  x, labels = _normal(22, (4, 3, 7)), _int_labels(23, (4, 3, 7), -1)

  def grads(loss):
    return jax.jit(jax.vmap(jax.grad(lambda x, l: loss(x, l).sum())))(x, labels)

  def naive(x, l):
    return _naive(x, _smooth(jax.nn.one_hot(l, 7, dtype=x.dtype), 0.1, 7), -1)

  np.testing.assert_allclose(
    grads(partial(int_ce, label_smoothing=0.1)), grads(naive), rtol=1e-12, atol=1e-14
  )


# --- Label smoothing and z-loss ----------------------------------------------------


def test_against_torch_cross_entropy():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  shape = (4, 6, 3)  # torch's class dim is 1
  x, y, labels = _normal(24, shape), _probs(25, shape, 1), _int_labels(26, shape, 1)
  tx = torch.tensor(np.asarray(x), requires_grad=True)
  for eps_ in (0.0, 0.1, 1.0):
    for ours, target in [(int_ce, labels), (soft_ce, y)]:
      tt = torch.tensor(np.asarray(target))
      t_loss = F.cross_entropy(tx, tt, reduction="none", label_smoothing=eps_)
      (t_dx,) = torch.autograd.grad(t_loss.sum(), tx)
      f = partial(ours, labels=target, axis=1, label_smoothing=eps_)
      loss, (dx,) = _vjp(f, x)
      np.testing.assert_allclose(loss, t_loss.detach().numpy(), rtol=1e-13, atol=1e-14)
      np.testing.assert_allclose(dx, t_dx.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES[2:4])
def test_label_smoothing_matches_naive_for_both_arguments(shape, axis):
  axes = _axes(axis, len(shape))
  n = math.prod(shape[a] for a in axes)
  x, y = _normal(27, shape), _probs(28, shape, axes)
  g = _normal(29, _batch(shape, axis), scale=1.0)
  ours = _vjp(partial(soft_ce, axis=axis, label_smoothing=0.3), x, y, g=g)
  ref = _vjp(lambda x, y: _naive(x, _smooth(y, 0.3, n), axis), x, y, g=g)
  _assert_close_tree(ours, ref, rtol=1e-12, atol=1e-14)


def test_label_smoothing_spreads_over_the_kept_classes_only():
  x, labels = _normal(30, (4, 10)), jnp.array([0, 3, 5, 1])
  mask = (jnp.arange(10) < 7)[None]  # e.g. a padded vocabulary
  t = _smooth(jax.nn.one_hot(labels, 7, dtype=jnp.float64), 0.2, 7)
  ref = _vjp(lambda x: _naive(x[:, :7], t, -1), x)
  ours = _vjp(lambda x: int_ce(x, labels, where=mask, label_smoothing=0.2), x)
  _assert_close_tree(ours, ref, rtol=1e-12, atol=1e-15)
  y = jnp.pad(jax.nn.one_hot(labels, 7, dtype=jnp.float64), ((0, 0), (0, 3)))
  ours = _vjp(lambda x: soft_ce(x, y, where=mask, label_smoothing=0.2), x)
  _assert_close_tree(ours, ref, rtol=1e-12, atol=1e-15)


def test_z_loss_closed_form():
  # Constant logits c over n classes: lse = c + log n, p = 1/n, so the loss is
  # log n + z (c + log n)^2 and d/dx_j = (1 + 2 z lse) / n - [j == y].
  n, c, z = 8, 1.5, 0.25
  x, labels = jnp.full((2, n), c, jnp.float64), jnp.array([3, 0])
  lse = c + math.log(n)
  expected = np.full((2, n), (1 + 2 * z * lse) / n)
  expected[0, 3] -= 1
  expected[1, 0] -= 1
  y = jax.nn.one_hot(labels, n, dtype=jnp.float64)
  for f in (lambda x: int_ce(x, labels, z_loss=z), lambda x: soft_ce(x, y, z_loss=z)):
    loss, (dx,) = _vjp(f, x)
    np.testing.assert_allclose(loss, math.log(n) + z * lse**2, rtol=1e-14)
    np.testing.assert_allclose(dx, expected, rtol=1e-13)
  # And on random logits, against the naive definition with its own z-loss term.
  x, y = _normal(31, (5, 9)), _probs(32, (5, 9), -1)
  ours = _vjp(lambda x, y: soft_ce(x, y, z_loss=z), x, y)
  _assert_close_tree(ours, _vjp(lambda x, y: _naive(x, y, -1, z_loss=z), x, y), rtol=1e-12)


# --- Non-finite input --------------------------------------------------------------


def test_neg_inf_logit_with_zero_label_weight_contributes_nothing():
  x = jnp.array([[0.5, -jnp.inf, 1.0, -0.3]], jnp.float64)
  y = jnp.array([[0.2, 0.0, 0.5, 0.3]], jnp.float64)
  keep = np.array([0, 2, 3])
  g = jnp.array([2.0])
  loss, (dx, dy) = _vjp(soft_ce, x, y, g=g)
  ref_loss, (ref_dx, ref_dy) = _vjp(optax.softmax_cross_entropy, x[:, keep], y[:, keep], g=g)
  assert np.isnan(optax.softmax_cross_entropy(x, y)).all()  # optax gives NaN here
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-14)
  assert dx[0, 1] == 0.0
  np.testing.assert_allclose(dx[:, keep], ref_dx, rtol=1e-13)
  np.testing.assert_allclose(dy[:, keep], ref_dy, rtol=1e-13)
  assert dy[0, 1] == np.inf  # d loss / d y_j = -log p_j = +inf: the true derivative
  # A zero cotangent gives a zero label gradient, not inf * 0 = NaN.
  np.testing.assert_array_equal(_vjp(soft_ce, x, y, g=jnp.zeros(1))[1][1], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_soft_labels_jitted_batch_with_and_without_a_guarded_row(dtype):
  # On the CPU the forward first sums t * l unguarded and redoes the batch with the
  # t == 0 guard if any loss is NaN: a batch that needs it and one that does not,
  # jitted, against the naive definition in float64 on the finite columns.
  x = _normal(36, (4, 64), dtype)
  y = _probs(37, (4, 64), -1, dtype).at[1, 7].set(0.0)
  guarded = x.at[1, 7].set(-jnp.inf)
  f = jax.jit(lambda x, y: soft_ce(x, y, label_smoothing=0.0, z_loss=0.01))
  for logits in (x, guarded):
    keep = np.asarray(jnp.isfinite(logits))
    x64, y64 = logits.astype(jnp.float64), y.astype(jnp.float64)
    ref = _naive(jnp.where(keep, x64, 0.0), y64, -1, where=jnp.asarray(keep), z_loss=0.01)
    loss = f(logits, y)
    assert loss.dtype == dtype
    assert rel_err(loss, ref) <= 4 * eps(dtype), (logits is guarded, loss, ref)


def test_neg_inf_logit_at_the_true_label_gives_inf_loss_and_finite_gradient():
  x = jnp.array([[0.5, -jnp.inf, 1.0], [0.1, 0.2, 0.3]], jnp.float32)
  labels = jnp.array([1, 2])
  p = jax.nn.softmax(jnp.array([0.5, 1.0], jnp.float64))
  y = jax.nn.one_hot(labels, 3, dtype=jnp.float32)
  for f in (lambda x: int_ce(x, labels), lambda x: soft_ce(x, y)):
    loss, (dx,) = _vjp(f, x)
    assert loss[0] == np.inf and np.isfinite(loss[1])
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dx[0], [p[0], -1.0, p[1]], rtol=1e-6)


def test_all_neg_inf_example_without_where():
  x = jnp.array([[-jnp.inf] * 4, [0.0, 1.0, 2.0, 3.0]], jnp.float32)
  labels = jnp.array([1, 2])
  loss, (dx,) = _vjp(lambda x: int_ce(x, labels, z_loss=0.1), x)
  assert loss[0] == np.inf  # -log_softmax = +inf at every class of an empty slice
  np.testing.assert_array_equal(dx[0], 0.0)
  ref = optax.softmax_cross_entropy_with_integer_labels(x[1:], labels[1:])
  np.testing.assert_allclose(loss[1], ref[0] + 0.1 * jax.nn.logsumexp(x[1]) ** 2, rtol=1e-6)
  y = jnp.array([[0.0] * 4, [0.0, 0.0, 1.0, 0.0]], jnp.float32)
  loss, (dx, _) = _vjp(soft_ce, x, y)
  assert loss[0] == 0.0  # no label weight on an empty slice: nothing to pay
  np.testing.assert_array_equal(dx[0], 0.0)


@pytest.mark.parametrize("bad", [jnp.inf, jnp.nan])
def test_pos_inf_or_nan_poisons_only_its_example(bad):
  x = _normal(33, (3, 5), jnp.float32).at[1, 2].set(bad)
  y = _probs(34, (3, 5), -1, jnp.float32)
  for f in (lambda x: int_ce(x, jnp.array([0, 1, 2])), lambda x: soft_ce(x, y)):
    loss, (dx,) = _vjp(f, x)
    loss, dx = np.asarray(loss), np.asarray(dx)
    assert np.isnan(loss[1]) and np.isnan(dx[1]).all()
    assert np.isfinite(loss[[0, 2]]).all() and np.isfinite(dx[[0, 2]]).all()


def test_fully_masked_example_gives_zero_whatever_its_logits_and_label():
  x = _normal(34, (3, 5), jnp.float32).at[1].set(jnp.nan)
  where = jnp.array([True, False, True])
  labels = jnp.array([0, -100, 4])  # padding carries an out-of-range label
  y = _probs(35, (3, 5), -1, jnp.float32)
  for f, args in [
    (lambda x: int_ce(x, labels, where=where, label_smoothing=0.1), (x,)),
    (lambda x, y: soft_ce(x, y, where=where, z_loss=0.1, label_smoothing=0.1), (x, y)),
  ]:
    loss, grads = _vjp(f, *args)
    assert loss[1] == 0.0 and np.isfinite(loss).all()
    for d in grads:
      assert (d[1] == 0.0).all() and np.isfinite(d).all()


@pytest.mark.parametrize("bad", [5, -1, -100, 2**40])
def test_out_of_range_label_is_nan_for_that_example_only(bad):
  x = _normal(36, (3, 5))
  labels = jnp.array([0, bad, 4], jnp.int64)
  loss, (dx,) = _vjp(lambda x: int_ce(x, labels, label_smoothing=0.1), x)
  assert np.isnan(loss[1]) and np.isnan(dx[1]).all()
  ok = np.array([0, 2])
  t = _smooth(jax.nn.one_hot(labels[ok], 5, dtype=jnp.float64), 0.1, 5)
  ref_loss, (ref_dx,) = _vjp(lambda x: _naive(x, t, -1), x[ok])
  np.testing.assert_allclose(loss[ok], ref_loss, rtol=1e-13)
  np.testing.assert_allclose(dx[ok], ref_dx, rtol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_out_of_range_label_masked_after_the_call_gets_zero_gradient(smoothing):
  # The idiom `jnp.where(labels != -100, loss, 0)`: the padded example's cotangent is
  # 0, and so is its gradient row (as in optax), though its loss is NaN. Through a
  # shared projection a NaN row would reach every weight.
  h, w = _normal(38, (4, 6)), _normal(39, (6, 5))
  labels = jnp.array([2, -100, 4, 7])
  keep = (labels >= 0) & (labels < 5)

  def masked_after(ce):
    return lambda w: jnp.sum(jnp.where(keep, ce(h @ w, labels), 0.0))

  ours = masked_after(partial(int_ce, label_smoothing=smoothing))
  t = _smooth(jax.nn.one_hot(jnp.where(keep, labels, 0), 5, dtype=jnp.float64), smoothing, 5)
  naive = lambda w: jnp.sum(jnp.where(keep, _naive(h @ w, t, -1), 0.0))  # noqa: E731
  dw = jax.jit(jax.grad(ours))(w)
  np.testing.assert_allclose(dw, jax.grad(naive)(w), rtol=1e-12)
  if not smoothing:
    ref = jax.grad(masked_after(optax.softmax_cross_entropy_with_integer_labels))(w)
    np.testing.assert_allclose(dw, ref, rtol=1e-12)
  # Unmasked, the bad examples' rows are still NaN, as their losses are.
  dx = jax.grad(lambda z: jnp.sum(int_ce(z, labels, label_smoothing=smoothing)))(h @ w)
  assert np.isnan(dx[~keep]).all() and np.isfinite(dx[keep]).all()


def test_narrow_integer_labels_never_wrap():
  x = _normal(37, (2, 300))
  f = jax.jit(int_ce)
  labels = jnp.array([299 - 256, 7], jnp.int8)  # int8 cannot even hold 300
  ref = optax.softmax_cross_entropy_with_integer_labels(x, labels.astype(jnp.int32))
  np.testing.assert_allclose(f(x, labels), ref, rtol=1e-13)
  assert np.isnan(f(x, jnp.array([-3, 1], jnp.int8))[0])
  np.testing.assert_allclose(
    f(x, jnp.array([299, 7], jnp.uint16)), f(x, jnp.array([299, 7], jnp.int32)), rtol=0
  )


def test_all_neg_inf_example_with_an_out_of_range_label_is_nan_like_its_loss():
  x = jnp.array([[-jnp.inf] * 4, [0.0, 1.0, 2.0, 3.0]], jnp.float32)
  loss, (dx,) = _vjp(lambda x: int_ce(x, jnp.array([7, 2])), x)
  assert np.isnan(loss[0]) and np.isnan(dx[0]).all()
  assert np.isfinite(loss[1]) and np.isfinite(dx[1]).all()


# --- Large margins and long rows ----------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_logit_far_above_the_labels_is_exact_in_float32(smoothing):
  # exp(x_j - x_y) overflows float32 once x_j exceeds the label's logit by about
  # 88; the loss (about 100 here) and gradient must still be those of float64.
  x = _normal(51, (4, 300), jnp.float32, scale=1.0)
  labels = jnp.array([3, 17, 250, 0])
  x = x.at[1, 40].set(x[1, 17] + 100.0).at[2, 250].set(-95.0)
  g = _normal(52, (4,), jnp.float32, scale=1.0)
  loss, (dx,) = _vjp(lambda x: int_ce(x, labels, label_smoothing=smoothing), x, g=g)
  t = _smooth(jax.nn.one_hot(labels, 300, dtype=jnp.float64), smoothing, 300)
  x64, g64 = x.astype(jnp.float64), g.astype(jnp.float64)
  ref_loss, (ref_dx,) = _vjp(partial(optax.softmax_cross_entropy, labels=t), x64, g=g64)
  assert 90 < loss[1] < 110 and 90 < loss[2] < 110
  np.testing.assert_allclose(loss, ref_loss, rtol=4 * eps(jnp.float32))
  assert rel_err(dx, ref_dx) <= 8 * eps(jnp.float32)


@pytest.mark.parametrize("n", [65536, 98304, 65537])
def test_long_rows_match_float64(n):
  # Rows of 65536 or more entries are summed in pieces on the CPU (98304 = 48 x
  # 2048; 65537 is prime and is summed whole). An all -inf row, a NaN row and a
  # row holding +inf keep their meaning: +inf loss and zero gradient, NaN, NaN.
  # (With them in the batch, the batch takes the max-shifted path; without, the
  # label-shifted one.)
  x = _normal(53, (5, n), jnp.float32, scale=2.0)
  x = x.at[2].set(-jnp.inf).at[3, 5].set(jnp.nan).at[4, 6].set(jnp.inf)
  labels = jnp.array([0, n - 1, 1, 2, 3])
  g = _normal(54, (5,), jnp.float32, scale=1.0)
  t = jax.nn.one_hot(labels[:2], n, dtype=jnp.float64)
  for opts in ({}, {"z_loss": 1e-3}):
    naive = partial(_naive, t=t, axis=-1, **opts)
    ref_loss, (ref_dx,) = _vjp(naive, x[:2].astype(jnp.float64), g=g[:2].astype(jnp.float64))
    for rows in (2, 5):
      loss, (dx,) = _vjp(partial(int_ce, labels=labels[:rows], **opts), x[:rows], g=g[:rows])
      np.testing.assert_allclose(loss[:2], ref_loss, rtol=4 * eps(jnp.float32))
      assert rel_err(dx[:2], ref_dx) <= 8 * eps(jnp.float32)
    assert loss[2] == np.inf and (dx[2] == 0).all()
    assert np.isnan(loss[3:]).all() and np.isnan(dx[3:]).all()
  pieces = {65536: "5x32x2048xf32", 98304: "5x48x2048xf32"}.get(n)
  text = jax.jit(lambda x: int_ce(x, labels)).lower(x).as_text()
  assert pieces in text if pieces else "x2048xf32" not in text


@pytest.mark.parametrize("n", [1000, 65536])
def test_exports_for_cpu_cuda_and_tpu(n):
  # The label-shifted forward and the pieces are CPU-only branches; the program
  # still lowers for every platform, with and without a mask.
  def fwd_bwd(x, labels, g, where):
    loss, vjp = jax.vjp(lambda x: int_ce(x, labels, where=where), x)
    return loss, vjp(g)[0]

  # The soft-label forward's unguarded first sum is a CPU-only branch too.
  def soft_fwd_bwd(x, y, g, where):
    loss, vjp = jax.vjp(lambda x, y: soft_ce(x, y, where=where), x, y)
    return loss, *vjp(g)

  spec = jax.ShapeDtypeStruct((4, n), jnp.bfloat16)
  args = (spec, jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.bfloat16))
  soft_args = (spec, spec, args[2])
  platforms = ["cpu", "cuda", "tpu"]
  for where in (None, jax.ShapeDtypeStruct((4,), jnp.bool_)):
    exported = jax.export.export(jax.jit(fwd_bwd), platforms=platforms)(*args, where)
    assert [a.dtype for a in exported.out_avals] == [jnp.bfloat16, jnp.bfloat16]
    exported = jax.export.export(jax.jit(soft_fwd_bwd), platforms=platforms)(*soft_args, where)
    assert [a.dtype for a in exported.out_avals] == [jnp.bfloat16] * 3


# --- Bad input ---------------------------------------------------------------------


def test_errors_name_the_argument():
  x, labels, y = jnp.zeros((4, 5)), jnp.zeros(4, jnp.int32), jnp.zeros((4, 5))
  cases = [
    (TypeError, "logits.*int", lambda: int_ce(jnp.zeros((4, 5), jnp.int32), labels)),
    (TypeError, "logits.*int", lambda: soft_ce(jnp.zeros((4, 5), jnp.int32), y)),
    (TypeError, "logits.*complex", lambda: soft_ce(x.astype(jnp.complex64), y)),
    (TypeError, "labels.*float32", lambda: int_ce(x, labels.astype(jnp.float32))),
    (TypeError, "labels.*complex", lambda: soft_ce(x, y.astype(jnp.complex64))),
    (ValueError, r"labels.*\(4, 6\).*\(4, 5\)", lambda: soft_ce(x, jnp.zeros((4, 6)))),
    (ValueError, r"labels.*\(3,\).*\(4,\)", lambda: int_ce(x, jnp.zeros(3, jnp.int32))),
    (ValueError, r"labels.*\(4, 5\)", lambda: int_ce(x, jnp.zeros((4, 5), jnp.int32))),
    (ValueError, r"where.*\(3,\)", lambda: int_ce(x, labels, where=jnp.ones(3, bool))),
    (ValueError, r"where.*\(1, 2, 5\)", lambda: soft_ce(x, y, where=jnp.ones((1, 2, 5), bool))),
    (TypeError, "where.*bool", lambda: soft_ce(x, y, where=jnp.ones((4, 5), jnp.int32))),
    (ValueError, "axis", lambda: soft_ce(x, y, axis=2)),
    (ValueError, "axis", lambda: int_ce(x, jnp.int32(0), axis=(1, -1))),
    (ValueError, "label_smoothing", lambda: soft_ce(x, y, label_smoothing=1.5)),
    (ValueError, "label_smoothing", lambda: int_ce(x, labels, label_smoothing=-0.1)),
    (ValueError, "z_loss", lambda: int_ce(x, labels, z_loss=-1.0)),
    (ValueError, "z_loss", lambda: int_ce(x, labels, z_loss=float("nan"))),
    (TypeError, "label_smoothing", lambda: soft_ce(x, y, label_smoothing="0.1")),
    # A bool is not a float: label_smoothing=True would train on uniform targets.
    (TypeError, "label_smoothing.*True", lambda: int_ce(x, labels, label_smoothing=True)),
    (TypeError, "z_loss.*True", lambda: soft_ce(x, y, z_loss=np.bool_(True))),
    (TypeError, "axis_name", lambda: soft_ce(x, y, axis_name=3)),
    (ValueError, r"logits.*\(4, 0\).*no classes", lambda: int_ce(jnp.zeros((4, 0)), labels)),
  ]
  for exc, match, call in cases:
    with pytest.raises(exc, match=match):
      call()


def test_empty_batch_gives_empty_loss_and_gradient():
  labels = jnp.zeros((0,), jnp.int32)
  for opts in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}):
    loss, (dx,) = _vjp(partial(int_ce, labels=labels, **opts), jnp.zeros((0, 7)))
    assert loss.shape == (0,) and dx.shape == (0, 7)
    assert int_ce(jnp.zeros((0, 7)), labels, **opts).shape == (0,)  # eagerly too


def test_traced_hyperparameter_is_a_type_error():
  x, y = jnp.zeros((4, 5)), jnp.zeros((4, 5))
  with pytest.raises(TypeError, match="label_smoothing.*static"):
    jax.jit(lambda e: soft_ce(x, y, label_smoothing=e))(0.1)


def test_integer_soft_labels_are_cast_to_the_logits_dtype():
  x, labels = _normal(38, (3, 4), jnp.float32), jnp.array([1, 0, 3])
  y = jax.nn.one_hot(labels, 4, dtype=jnp.int32)
  loss = soft_ce(x, y)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, int_ce(x, labels), rtol=1e-6)


# --- Residuals ---------------------------------------------------------------------


def _residuals(f, *args):
  from jax._src.ad_checkpoint import saved_residuals

  return [aval for aval, _ in saved_residuals(f, *args)]


def _nbytes(rs):
  return sum(r.size * r.dtype.itemsize for r in rs)


def test_residual_bytes_integer_labels_bfloat16():
  b, n = 64, 512
  x = _normal(39, (b, n), jnp.bfloat16)
  labels = _int_labels(40, (b, n), -1).astype(jnp.int32)

  def ours(x):
    return int_ce(x, labels)

  def optax_bf16(x):
    return optax.softmax_cross_entropy_with_integer_labels(x, labels)

  def optax_f32(x):  # the usual recipe for accurate bf16 training
    return optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), labels)

  res = _residuals(ours, x)
  # The logits, the labels, and per example the shift and log d.
  assert sorted((r.shape, str(r.dtype)) for r in res) == [
    ((b,), "int32"),
    ((b, 1), "float32"),
    ((b, 1), "float32"),
    ((b, n), "bfloat16"),
  ]
  assert _nbytes(res) <= 0.55 * _nbytes(_residuals(optax_f32, x))
  assert _nbytes(res) <= _nbytes(_residuals(optax_bf16, x)) + 8 * b
  # ... at the float32 recipe's accuracy: the same loss and gradient, up to rounding to bf16.
  g = _normal(41, (b,), jnp.bfloat16, scale=1.0)
  loss, (dx,) = _vjp(ours, x, g=g)
  ref_loss, (ref_dx,) = _vjp(optax_f32, x, g=g.astype(jnp.float32))
  np.testing.assert_allclose(
    np.asarray(loss, np.float32), np.asarray(ref_loss), rtol=eps(jnp.bfloat16) / 2
  )
  assert dx.dtype == ref_dx.dtype == jnp.bfloat16
  assert rel_err(dx, ref_dx) <= eps(jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_residuals_soft_labels_and_mask_in_their_own_shapes(dtype):
  x, y = _normal(42, (16, 32), dtype), _probs(43, (16, 32), -1, dtype)
  where = (jnp.arange(32) < 30)[None]
  res = _residuals(lambda x, y: soft_ce(x, y, where=where, label_smoothing=0.1), x, y)
  assert sorted((r.shape, str(r.dtype)) for r in res) == sorted(
    [
      ((16, 32), str(jnp.dtype(dtype))),
      ((16, 32), str(jnp.dtype(dtype))),
      ((1, 32), "bool"),
      ((16, 1), "float32"),
      ((16, 1), "float32"),
    ]
  )


# --- Dtypes and accuracy ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_accuracy_against_float64_on_rounded_inputs(dtype):
  shape = (16, 257)
  x = _normal(44, shape, dtype, scale=2.0)
  y = _probs(45, shape, -1, dtype)
  labels = _int_labels(46, shape, -1)
  g = _normal(47, (16,), dtype, scale=1.0)
  x64, y64, g64 = (a.astype(jnp.float64) for a in (x, y, g))
  opts = dict(label_smoothing=0.1, z_loss=1e-3)
  t_int = _smooth(jax.nn.one_hot(labels, 257, dtype=jnp.float64), 0.1, 257)
  for ours, naive, args, args64 in [
    (
      lambda x: int_ce(x, labels, **opts),
      lambda x: _naive(x, t_int, -1, z_loss=1e-3),
      (x,),
      (x64,),
    ),
    (
      lambda x, y: soft_ce(x, y, **opts),
      lambda x, y: _naive(x, _smooth(y, 0.1, 257), -1, z_loss=1e-3),
      (x, y),
      (x64, y64),
    ),
  ]:
    loss, grads = _vjp(ours, *args, g=g)
    ref_loss, ref_grads = _vjp(naive, *args64, g=g64)
    assert loss.dtype == dtype
    assert rel_err(loss, ref_loss) <= 4 * eps(dtype)
    for d, d_ref, a in zip(grads, ref_grads, args, strict=True):
      assert d.dtype == a.dtype
      assert rel_err(d, d_ref) <= 8 * eps(dtype)


def test_low_precision_computes_in_float32():
  # 1000 classes at 11.0 and one at 12.0: the normaliser overflows float16.
  x = jnp.full((1, 1000), 11.0, jnp.float16).at[0, 0].set(12.0)
  loss = jax.jit(int_ce)(x, jnp.array([0]))
  ref = optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float64), jnp.array([0]))
  assert np.isfinite(loss).all()
  assert rel_err(loss, ref) <= 4 * eps(jnp.float16)


# --- axis_name: a 1-device sanity check (the 8-device tests live in tests/multidevice) ---


def test_axis_name_on_one_device_matches_the_unsharded_loss():
  mesh = jax.make_mesh((1,), ("v",))
  shape = (4, 12)
  x, y, labels = _normal(48, shape), _probs(49, shape, -1), _int_labels(50, shape, -1)
  where = (jnp.arange(12) < 10)[None]
  opts = dict(label_smoothing=0.1, z_loss=0.01)

  def sharded(f, *args):
    # Each device returns the (replicated) loss and its own block of the gradients.
    spec = P(None, "v")
    g = jax.shard_map(
      f, mesh=mesh, in_specs=(spec,) * len(args), out_specs=(P(), (spec,) * len(args))
    )
    return jax.jit(g)(*(jax.device_put(a, NamedSharding(mesh, spec)) for a in args))

  def soft(x, y, **kw):
    return soft_ce(x, y, where=where, **opts, **kw).sum()

  def hard(x, **kw):
    return int_ce(x, labels, where=where, **opts, **kw).sum()

  for f, args in [(soft, (x, y)), (hard, (x,))]:
    argnums = tuple(range(len(args)))
    ref = jax.jit(jax.value_and_grad(f, argnums))(*args)
    ours = sharded(jax.value_and_grad(partial(f, axis_name="v"), argnums), *args)
    _assert_close_tree(ours, ref, rtol=1e-14, atol=1e-16)


def test_axis_name_with_a_tuple_class_axis_is_refused():
  mesh = jax.make_mesh((1,), ("v",))
  f = jax.shard_map(
    lambda x: int_ce(x, jnp.zeros(2, jnp.int32), axis=(1, 2), axis_name="v"),
    mesh=mesh,
    in_specs=P(),
    out_specs=P(),
  )
  with pytest.raises(ValueError, match="axis_name.*single class axis"):
    f(jnp.zeros((2, 3, 4)))
