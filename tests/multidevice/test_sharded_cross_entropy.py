"""Both cross-entropies over a class axis split across 8 CPU devices.

Inside ``jax.shard_map`` with ``axis_name``, the per-example loss and the
gradients must equal the unsharded loss on the gathered logits, special rows
included; ordinary rows are also checked against optax in float64. Integer
labels are global class ids (vocabulary parallelism), and the backward of the
integer-label loss needs no collective under shard_map's default typing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.nn import logsumexp
from jax.sharding import PartitionSpec as P
from mesh_utils import LAYOUTS, TOL, B, N, collectives, inputs, make_mesh

import jaxsoftmax

soft_ce = jaxsoftmax.softmax_cross_entropy
int_ce = jaxsoftmax.softmax_cross_entropy_with_integer_labels

# Global labels: class-block edges (0, 7, 8, 24), a label at a -inf logit (row 2),
# -1 in a NaN row and an out-of-range 32 in the row that `where` masks out.
LABELS = np.array([0, 7, 10, 31, 4, -1, 24, N], np.int32)
OPTIONS = [dict(), dict(label_smoothing=0.1, z_loss=1e-3)]


def _soft_labels(dtype):
  e = jnp.exp(2.0 * jax.random.normal(jax.random.key(7), (B, N), jnp.float64))
  return (e / e.sum(-1, keepdims=True)).astype(dtype)


def _all_losses(x, y, labels, where, row_where, g, **kw):
  """Losses and VJPs of both cross-entropies, with and without masks and options.

  ``where`` masks classes; ``row_where``, of the batch shape, masks examples.
  """
  outs = []
  for opts in OPTIONS:
    for w in (None, where, row_where):
      loss, vjp = jax.vjp(lambda x, y, w=w, opts=opts: soft_ce(x, y, where=w, **opts, **kw), x, y)
      outs += [loss, *vjp(g)]
      loss, vjp = jax.vjp(lambda x, w=w, opts=opts: int_ce(x, labels, where=w, **opts, **kw), x)
      outs += [loss, *vjp(g)]
  return outs


def _sharded_losses(layout, x, y, labels, where, g):
  return _compiled(layout)(x, y, labels, where, where.any(-1), g)


@functools.cache
def _compiled(layout):
  """``_all_losses`` under jit(shard_map), cached so that tests sharing a layout compile once."""
  shape, names, spec, axis_name = LAYOUTS[layout]
  batch = P(spec[0])  # the loss is per example: invariant along the class axis

  def local(*args):
    return _all_losses(*args, axis_name=axis_name)

  out_specs = [batch, spec, spec, batch, spec] * (len(OPTIONS) * 3)
  in_specs = (spec, spec, batch, spec, batch, batch)
  f = jax.shard_map(local, mesh=make_mesh(shape, names), in_specs=in_specs, out_specs=out_specs)
  return jax.jit(f)


# Every mesh and both shardings, each dtype on each mesh (not the full product:
# each case compiles 30 outputs; the softmax tests run the full product).
CASES = [
  ("8:classes", jnp.float64),
  ("8:classes", jnp.float32),
  ("2x4:classes", jnp.float32),
  ("4x2:classes", jnp.float64),
  ("2x4:batch+classes", jnp.float64),
  ("4x2:batch+classes", jnp.float32),
  ("2x4:classes over both axes", jnp.float64),
  ("2x4:classes", jnp.bfloat16),
]


@pytest.mark.parametrize("layout,dtype", CASES)
def test_sharded_equals_unsharded(layout, dtype):
  x, where, _ = inputs(dtype)
  y, labels = _soft_labels(dtype), jnp.asarray(LABELS)
  g = jax.random.normal(jax.random.key(3), (B,), jnp.float64).astype(dtype)
  expected = jax.jit(_all_losses)(x, y, labels, where, where.any(-1), g)
  actual = _sharded_losses(layout, x, y, labels, where, g)
  assert len(actual) == len(expected) == 30
  for a, e in zip(actual, expected, strict=True):
    assert a.dtype == e.dtype == dtype
    # assert_allclose also requires NaN and +-inf at exactly the same places.
    np.testing.assert_allclose(np.float64(a), np.float64(e), **TOL[dtype])


def test_sharded_matches_optax_and_the_special_rows():
  # Independent references: optax in float64 on the ordinary rows 0 and 1, and
  # the semantics of the special rows, from the sharded run alone.
  x, where, _ = inputs(jnp.float64)
  y, labels = _soft_labels(jnp.float64), jnp.asarray(LABELS)
  g = jnp.ones((B,), jnp.float64)
  out = [np.asarray(a) for a in _sharded_losses("2x4:batch+classes", x, y, labels, where, g)]
  soft, dsoft, int_, dint = out[0], out[1], out[3], out[4]  # no where, no options
  ref_soft, ref_dsoft = jax.value_and_grad(lambda x: optax.softmax_cross_entropy(x, y[:2]).sum())(
    x[:2]
  )
  ref_int, ref_dint = jax.value_and_grad(
    lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels[:2]).sum()
  )(x[:2])
  np.testing.assert_allclose(soft[:2].sum(), ref_soft, rtol=1e-12)
  np.testing.assert_allclose(dsoft[:2], ref_dsoft, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(int_[:2].sum(), ref_int, rtol=1e-12)
  np.testing.assert_allclose(dint[:2], ref_dint, rtol=1e-10, atol=1e-13)
  assert int_[2] == np.inf  # the label's logit is -inf
  assert np.isnan(int_[5]) and np.isnan(int_[7])  # label -1; label N out of range
  assert np.isfinite(int_[[0, 1, 3]]).all()
  # With `where`, the fully masked row 7 is 0 whatever its label, grad 0.
  int_w, dint_w = out[8], out[9]
  assert int_w[7] == 0.0
  np.testing.assert_array_equal(dint_w[7], np.zeros(N))


def test_integer_label_backward_has_no_collective():
  mesh = make_mesh((2, 4), ("b", "v"))
  x, _, _ = inputs(jnp.float32)
  x = jnp.nan_to_num(x)
  labels = jnp.asarray(np.abs(LABELS) % N)

  def f(x, labels):
    return int_ce(x, labels, axis_name="v")

  sm = jax.shard_map(f, mesh=mesh, in_specs=(P("b", "v"), P("b")), out_specs=P("b"))
  fwd = collectives(jax.jit(sm).lower(x, labels).compile().as_text())
  counts = {k: len(v) for k, v in fwd.items() if v}
  # The (max, sum exp) pairs in one all-gather; the label's logit in one all-reduce.
  assert counts == {"all-gather": 1, "all-reduce": 1}, counts
  _, vjp = jax.vjp(lambda x: jax.jit(sm)(x, labels), x)
  bwd = collectives(jax.jit(vjp).lower(jnp.ones((B,), jnp.float32)).compile().as_text())
  assert not any(bwd.values()), bwd


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_16_bit_losses_in_a_shard_map_over_the_class_axis_only(dtype):
  # shard_map over "v" alone leaves "b" to the partitioner; a 16-bit all-reduce
  # there aborted XLA:CPU, so the collectives run in float32.
  mesh = make_mesh((2, 4), ("b", "v"))
  x, _, _ = inputs(jnp.float64)
  x = jnp.where(jnp.isfinite(x), x, -30.0).astype(dtype).astype(jnp.float64)  # as rounded
  labels = jnp.asarray(np.abs(LABELS) % N)
  expected = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels).sum())(x)
  f = jax.shard_map(
    lambda x, y: int_ce(x, y, axis_name="v"),
    mesh=mesh,
    in_specs=(P(None, "v"), P()),
    out_specs=P(),
    axis_names={"v"},
  )
  xs = jax.device_put(x.astype(dtype), jax.NamedSharding(mesh, P(None, "v")))
  loss, g = jax.jit(jax.value_and_grad(lambda x: f(x, labels).astype(jnp.float32).sum()))(xs)
  ref = optax.softmax_cross_entropy_with_integer_labels(x, labels).sum()
  np.testing.assert_allclose(loss, ref, rtol=2e-2)
  np.testing.assert_allclose(np.asarray(g, np.float64), expected, rtol=2e-2, atol=2e-2)


def test_loss_leaves_shard_map_without_the_class_axis():
  # The loss is typed invariant along axis_name, so out_specs may omit it, and it
  # is the same on every device of the class axis.
  mesh = make_mesh((8,), ("v",))
  x, _, _ = inputs(jnp.float64)
  labels = jnp.asarray(np.abs(LABELS) % N)
  f = jax.shard_map(
    lambda x, labels: int_ce(x, labels, axis_name="v"),
    mesh=mesh,
    in_specs=(P(None, "v"), P()),
    out_specs=P(),
  )
  np.testing.assert_allclose(jax.jit(f)(x, labels), jax.jit(int_ce)(x, labels), rtol=1e-12)
  per_device = jax.shard_map(
    lambda x, labels: int_ce(x, labels, axis_name="v")[None],
    mesh=mesh,
    in_specs=(P(None, "v"), P()),
    out_specs=P("v"),
    check_vma=False,
  )
  per_device = jax.jit(per_device)(x, labels)
  np.testing.assert_array_equal(per_device, np.broadcast_to(per_device[0], per_device.shape))


@pytest.mark.parametrize("fn", [soft_ce, int_ce], ids=["soft", "integer"])
def test_unbound_axis_name_is_a_clear_error(fn):
  x = jnp.zeros((2, 8), jnp.float32)
  labels = jnp.zeros((2, 8), jnp.float32) if fn is soft_ce else jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=r"`axis_name`='v' is not bound.*shard_map"):
    fn(x, labels, axis_name="v")


def test_tuple_axis_name_bound_by_nested_vmaps():
  # The class axis split over two nested vmaps, axis_name=("i", "j"): every
  # copy of each example's loss equals optax's on the whole logits (float64).
  x, _, _ = inputs(jnp.float64)
  x, y, labels = x[:3], _soft_labels(jnp.float64)[:3], jnp.asarray(np.abs(LABELS[:3]) % N)

  def split(a):  # row, i, j, entry
    return a.reshape(3, 2, 4, N // 8)

  def losses(x, y):
    kw = dict(axis_name=("i", "j"), label_smoothing=0.1, z_loss=1e-3)
    return soft_ce(x, y, **kw), int_ce(x, labels, **kw)

  f = jax.vmap(jax.vmap(losses, in_axes=1, axis_name="j"), in_axes=1, axis_name="i")
  soft, integer = jax.jit(f)(split(x), split(y))  # (2, 4, 3): one per copy
  smooth = 0.9 * jax.nn.one_hot(labels, N) + 0.1 / N
  z = 1e-3 * jax.nn.logsumexp(x, -1) ** 2
  want_soft = optax.softmax_cross_entropy(x, 0.9 * y + 0.1 / N) + z
  want_int = optax.softmax_cross_entropy(x, smooth) + z
  np.testing.assert_allclose(soft, jnp.broadcast_to(want_soft, soft.shape), **TOL[jnp.float64])
  np.testing.assert_allclose(integer, jnp.broadcast_to(want_int, soft.shape), **TOL[jnp.float64])


@pytest.mark.parametrize("mode", ["check_vma=False", "vmap"])
def test_gradients_without_varying_axes_typing(mode):
  # Without shard_map's varying-axes typing (check_vma=False, or vmap with an
  # axis name) each device's copy of the loss is a value of its own, with its own
  # cotangent: a loss returned unmapped gets 1/8 of it on each device, a mean
  # over the copies the same. The gradient must still be the unsharded one;
  # references: optax on the whole logits, in float64.
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  x = 3.0 * jax.random.normal(k1, (B, N), jnp.float64)
  y = _soft_labels(jnp.float64)
  labels = jnp.asarray(np.abs(LABELS) % N)
  where = (
    jax.random.bernoulli(k2, 0.8, (B, N)).at[:, 0].set(True).at[jnp.arange(B), labels].set(True)
  )
  ct = jax.random.normal(k3, (B,), jnp.float64)

  def losses(x, y, where, axis_name):
    return soft_ce(x, y, axis_name=axis_name), int_ce(x, labels, where=where, axis_name=axis_name)

  if mode == "vmap":
    split = lambda a: a.reshape(B, 8, N // 8)  # noqa: E731
    per_copy = jax.vmap(functools.partial(losses, axis_name="v"), (1, 1, 1), 0, axis_name="v")

    def total(x, y):
      soft, integer = per_copy(split(x), split(y), split(where))  # (8, B) each: one per copy
      return jnp.sum(ct * soft.mean(0)), jnp.sum(ct * integer.mean(0))

  else:
    spec = P(None, "v")
    sm = jax.shard_map(
      functools.partial(losses, axis_name="v"),
      mesh=make_mesh((8,), ("v",)),
      in_specs=(spec, spec, spec),
      out_specs=(P(), P()),
      check_vma=False,
    )

    def total(x, y):
      soft, integer = sm(x, y, where)
      return jnp.sum(ct * soft), jnp.sum(ct * integer)

  dsoft = jax.jit(jax.grad(lambda x, y: total(x, y)[0], (0, 1)))(x, y)
  dint = jax.jit(jax.grad(lambda x: total(x, y)[1]))(x)
  ref_soft = jax.grad(lambda x, y: jnp.sum(ct * optax.softmax_cross_entropy(x, y)), (0, 1))(x, y)
  ref_int = jax.grad(
    lambda x: jnp.sum(ct * optax.softmax_cross_entropy_with_integer_labels(x, labels, where=where))
  )(x)
  np.testing.assert_allclose(dsoft[0], ref_soft[0], **TOL[jnp.float64])
  np.testing.assert_allclose(dsoft[1], ref_soft[1], **TOL[jnp.float64])
  np.testing.assert_allclose(dint, ref_int, **TOL[jnp.float64])


def test_gradient_taken_inside_shard_map_without_typing_matches_a_psum_loss():
  # Differentiated inside shard_map(check_vma=False), each device takes the
  # gradient of its own copy of the loss: the same convention as a loss written
  # with pmax / psum, which is the reference here (n times the unsharded one).
  mesh = make_mesh((8,), ("v",))
  x = 3.0 * jax.random.normal(jax.random.key(4), (B, N), jnp.float64)
  labels = jnp.asarray(np.abs(LABELS) % N)

  def psum_loss(x, labels):
    m = jax.lax.pmax(jax.lax.stop_gradient(x.max(-1)), "v")
    lse = m + jnp.log(jax.lax.psum(jnp.exp(x - m[:, None]).sum(-1), "v"))
    lo = jax.lax.axis_index("v") * x.shape[-1]
    own = (labels >= lo) & (labels < lo + x.shape[-1])
    idx = jnp.clip(labels - lo, 0, x.shape[-1] - 1)[:, None]
    x_y = jnp.where(own, jnp.take_along_axis(x, idx, -1)[:, 0], 0.0)
    return lse - jax.lax.psum(x_y, "v")

  def inside(loss):
    grad = jax.grad(lambda x, labels: jnp.sum(loss(x, labels)))
    return jax.jit(
      jax.shard_map(
        grad, mesh=mesh, in_specs=(P(None, "v"), P()), out_specs=P(None, "v"), check_vma=False
      )
    )

  ours = inside(lambda x, labels: int_ce(x, labels, axis_name="v"))(x, labels)
  np.testing.assert_allclose(ours, inside(psum_loss)(x, labels), **TOL[jnp.float64])
  unsharded = jax.grad(
    lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, labels))
  )
  np.testing.assert_allclose(ours, 8 * unsharded(x), **TOL[jnp.float64])


def test_inputs_the_same_on_every_device_get_the_sum_of_the_cotangents():
  # Inside a shard_map, an input that is the same on every device of a mesh axis
  # (typed invariant along it) beside one that varies: its cotangent is the sum
  # of the devices' parts, and the rule must return it typed as the input was.
  # Against optax in float64 on the gathered arrays, the shared input broadcast.
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  x = 2.0 * jax.random.normal(k1, (B, N), jnp.float64)
  mesh = make_mesh((8,), ("b",))

  def check(f, in_specs, args, ref):
    got = jax.jit(jax.grad(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=P()), (0, 1)))
    for g, r in zip(got(*args), jax.grad(ref, (0, 1))(*args), strict=True):
      np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-13)

  # Data parallel: each device's examples against one target distribution, the
  # same on every device (soft labels of shape [1, N], broadcast over the rows).
  t = jax.nn.softmax(jax.random.normal(k2, (1, N), jnp.float64))
  check(
    lambda x, t: jax.lax.psum(soft_ce(x, jnp.broadcast_to(t, x.shape)).sum(), "b"),
    (P("b"), P()),
    (x, t),
    lambda x, t: optax.softmax_cross_entropy(x, jnp.broadcast_to(t, x.shape)).sum(),
  )
  # The logits of one example the same on every device, each device its own label.
  labels = jnp.arange(B) * 3 % N
  check(
    lambda x1, labels: jax.lax.psum(int_ce(x1, labels[:, 0].astype(jnp.int32)).sum(), "b"),
    (P(), P("b")),
    (x[:1], labels[:, None].astype(jnp.float64)),
    lambda x1, labels: optax.softmax_cross_entropy_with_integer_labels(
      jnp.broadcast_to(x1, x.shape), labels[:, 0].astype(jnp.int32)
    ).sum(),
  )
  # The logits of one example the same on every device, each device its own soft
  # labels; and both the same on every device beside a mask that varies.
  ys = jax.nn.softmax(jax.random.normal(k3, (B, N), jnp.float64))
  check(
    lambda x1, ys: jax.lax.psum(soft_ce(jnp.broadcast_to(x1, ys.shape), ys).sum(), "b"),
    (P(), P("b")),
    (x[:1], ys),
    lambda x1, ys: optax.softmax_cross_entropy(jnp.broadcast_to(x1, x.shape), ys).sum(),
  )
  w = jnp.arange(B * N).reshape(B, N) % 3 != 1
  check(
    lambda x1, t, w: jax.lax.psum(
      soft_ce(jnp.broadcast_to(x1, w.shape), jnp.broadcast_to(t, w.shape), where=w).sum(), "b"
    ),
    (P(), P(), P("b")),
    (x[:1], t, w),
    # (optax's gradient with `where` is NaN for the labels: -inf log-probabilities
    # at masked classes; here the kept classes' closed form, in float64.)
    lambda x1, t, w: -jnp.where(w, t * (x1 - logsumexp(x1, -1, keepdims=True, where=w)), 0).sum(),
  )
  # Classes split over "v" (axis_name) and examples over "b", the soft labels the
  # same on both halves of the batch: split over "v" only.
  mesh = make_mesh((2, 4), ("b", "v"))
  y = jax.nn.softmax(jax.random.normal(k3, (B // 2, N), jnp.float64))
  check(
    lambda x, y: jax.lax.psum(soft_ce(x, y, axis_name="v").sum(), "b"),
    (P("b", "v"), P(None, "v")),
    (x, y),
    lambda x, y: optax.softmax_cross_entropy(x, jnp.concatenate([y, y])).sum(),
  )


def test_logits_the_same_on_every_device_of_the_class_axis():
  # Logits typed invariant along axis_name (the same block on every device of
  # "v") are each device's own block: the global logits are the block repeated.
  # Their cotangent is summed once (audit11: it was n times too large beside
  # split soft labels or a split class mask; other calls raised JAX's type
  # errors). Against optax and jax.nn in float64 on the tiled logits.
  mesh = make_mesh((4,), ("v",))
  k1, k2 = jax.random.split(jax.random.key(5))
  x = jax.random.normal(k1, (2, 3), jnp.float64)
  y = jax.nn.softmax(jax.random.normal(k2, (2, 12), jnp.float64))
  labels, w = jnp.array([1, 10]), jnp.ones((2, 12), bool).at[:, 5].set(False)

  def tiled(x):
    return jnp.tile(x, (1, 4))

  cases = [
    (
      lambda x, y, w: soft_ce(x, y, axis_name="v").sum(),
      lambda x: optax.softmax_cross_entropy(tiled(x), y).sum(),
    ),
    (
      lambda x, y, w: int_ce(x, labels, where=w, axis_name="v").sum(),
      lambda x: optax.softmax_cross_entropy_with_integer_labels(tiled(x), labels, where=w).sum(),
    ),
    (
      lambda x, y, w: int_ce(x, labels, axis_name="v").sum(),
      lambda x: optax.softmax_cross_entropy_with_integer_labels(tiled(x), labels).sum(),
    ),
  ]
  for ours, ref in cases:
    f = jax.shard_map(ours, mesh=mesh, in_specs=(P(), P(None, "v"), P(None, "v")), out_specs=P())
    value, grad = jax.jit(jax.value_and_grad(f))(x, y, w)
    np.testing.assert_allclose(value, ref(x), rtol=1e-12)
    np.testing.assert_allclose(grad, jax.grad(ref)(x), rtol=1e-12, atol=1e-13)
  c = jnp.arange(12.0)
  for name, op, ref_op in [
    ("softmax", jaxsoftmax.softmax, jax.nn.softmax),
    ("log_softmax", jaxsoftmax.log_softmax, jax.nn.log_softmax),
  ]:
    f = jax.shard_map(
      lambda x, c, op=op: jax.lax.psum((op(x, axis_name="v") * c).sum(), "v"),
      mesh=mesh,
      in_specs=(P(), P("v")),
      out_specs=P(),
    )
    grad = jax.jit(jax.grad(f))(x, c)
    expected = jax.grad(lambda x, ref_op=ref_op: (ref_op(tiled(x)) * c).sum())(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-13, err_msg=name)
