"""Every op on arrays placed on an explicit mesh (``AxisType.Explicit``, the
default of ``jax.make_mesh``): split over the examples, over the classes, or both.

The values and gradients must equal float64 references written with ``jax.nn``
and optax on the gathered arrays, and the results keep the inputs' layout. Under
an explicit mesh JAX refuses ops whose operands' shardings do not match, so each
op runs on each device's block (``jaxsoftmax/_explicit.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from mesh_utils import TOL, B, N, make_mesh

import jaxsoftmax

H = 16  # features of the fused loss's hidden states
SPECS = [P("b", None), P("b", "v"), P(None, "v"), P(None, ("b", "v"))]
DTYPES = [jnp.float32, jnp.bfloat16]


def _explicit_mesh():
  return jax.make_mesh((2, 4), ("b", "v"), axis_types=(AxisType.Explicit,) * 2)


def _data():
  rng = np.random.default_rng(0)
  x = 2.0 * rng.normal(size=(B, N))
  x[2, ::5] = -np.inf  # scattered -inf entries
  where = rng.random((B, N)) < 0.7
  where[0] = True
  where[5] = False  # a fully masked row: all 0, zero gradient
  labels = rng.integers(0, N, size=B).astype(np.int32)
  labels[2] = 1  # x[2, 1] is finite
  probs = np.asarray(jax.nn.softmax(rng.normal(size=(B, N))))
  pad = np.arange(B) % 3 != 0
  weights = rng.normal(size=(B, N))  # the cotangent of an elementwise output
  return x, where, labels, probs, pad, weights


def _masked_softmax(x, where, log):
  """The masking table in float64: masked entries 0 (log: -inf), a fully masked row all 0."""
  f = jax.nn.log_softmax if log else jax.nn.softmax
  empty = ~jnp.any(where, axis=-1, keepdims=True)
  # jax.nn on a stand-in row where ours must give an empty one (jax.nn: NaN).
  out = f(jnp.where(empty, 0.0, jnp.where(where, x, -jnp.inf)), where=where | empty)
  fill = -jnp.inf if log else 0.0
  return jnp.where(where & ~empty, out, fill)


def _cases():
  """name -> (ours(x, *ops), reference(x, *ops) in float64, ops, spec of each op given
  the logits' spec, whether the logits keep their -inf entries)."""
  x, where, labels, probs, pad, weights = _data()
  finite = np.isfinite(x)
  batch = lambda s: P(s[0])  # noqa: E731
  same = lambda s: s  # noqa: E731
  w = jnp.asarray(weights)

  def elementwise(out, keep):
    # A finite weighted sum of an elementwise output (log_softmax's -inf excluded).
    return jnp.sum(jnp.where(keep, out.astype(jnp.float64), 0.0) * w, axis=-1)

  return {
    "softmax": (
      lambda x, m: elementwise(jaxsoftmax.softmax(x, where=m), True),
      lambda x, m: elementwise(_masked_softmax(x, m, False), True),
      (where,),
      (same,),
      True,
    ),
    "log_softmax": (
      lambda x, m: elementwise(jaxsoftmax.log_softmax(x, where=m), m & finite),
      lambda x, m: elementwise(_masked_softmax(x, m, True), m & finite),
      (where,),
      (same,),
      True,
    ),
    "integer labels": (
      lambda x, y: jaxsoftmax.softmax_cross_entropy_with_integer_labels(x, y),
      optax.softmax_cross_entropy_with_integer_labels,
      (labels,),
      (batch,),
      True,  # no -inf at a label
    ),
    "integer labels, padding mask, smoothing, z-loss": (
      lambda x, y, m: jaxsoftmax.softmax_cross_entropy_with_integer_labels(
        x, y, where=m, label_smoothing=0.1, z_loss=1e-3
      ),
      lambda x, y, m: jnp.where(
        m,
        optax.softmax_cross_entropy(
          x, optax.smooth_labels(jax.nn.one_hot(y, N, dtype=jnp.float64), 0.1)
        )
        + 1e-3 * jax.nn.logsumexp(x, axis=-1) ** 2,
        0.0,
      ),
      (labels, pad),
      (batch, batch),
      False,  # smoothing makes a -inf logit's loss +inf
    ),
    "soft labels, padding mask": (
      lambda x, y, m: jaxsoftmax.softmax_cross_entropy(x, y, where=m),
      lambda x, y, m: jnp.where(m, optax.softmax_cross_entropy(x, y), 0.0),
      (probs, pad),
      (same, batch),
      False,  # probabilities > 0 everywhere: a -inf logit's loss is +inf
    ),
  }


def _put(a, spec, dtype=None):
  a = jnp.asarray(a, dtype) if dtype is not None and np.issubdtype(a.dtype, np.floating) else a
  return jax.device_put(jnp.asarray(a), spec)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("name", list(_cases()))
def test_ops_on_an_explicit_mesh(name, spec, dtype):
  ours, ref, ops, op_specs, with_inf = _cases()[name]
  x = _data()[0]
  if not with_inf:
    x = np.where(np.isfinite(x), x, -30.0)
  loss, dx = jax.value_and_grad(lambda x, *ops: jnp.sum(ref(x, *ops)))(jnp.asarray(x), *ops)
  with jax.set_mesh(_explicit_mesh()):
    xs = _put(x, spec, dtype)
    args = [_put(a, f(spec), dtype) for a, f in zip(ops, op_specs, strict=True)]
    # Also with the small operands replicated: they are resharded to the logits' layout.
    for small in (args, [jax.device_put(a, P()) for a in args]):
      out = jax.jit(ours)(xs, *small)
      assert jax.typeof(out).sharding.spec[:1] == spec[:1]  # examples stay where they were
      got, g = jax.jit(jax.value_and_grad(lambda x, *o: jnp.sum(ours(x, *o))))(xs, *small)
      assert jax.typeof(g).sharding.spec == spec
      tol = TOL[dtype] if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
      np.testing.assert_allclose(np.float64(got), np.float64(loss), **tol)
      np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(dx), **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_without_a_mesh_in_context(dtype):
  # Arrays placed with a NamedSharding on an explicit mesh carry it in their type
  # even without jax.set_mesh.
  mesh = _explicit_mesh()
  x, _, labels, *_ = _data()
  x = np.where(np.isfinite(x), x, -30.0)
  expected = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels).sum())(x)
  xs = jax.device_put(jnp.asarray(x, dtype), NamedSharding(mesh, P("b", "v")))
  ys = jax.device_put(jnp.asarray(labels), NamedSharding(mesh, P("b")))
  f = lambda x, y: jaxsoftmax.softmax_cross_entropy_with_integer_labels(x, y).sum()  # noqa: E731
  g = jax.jit(jax.grad(f))(xs, ys)
  tol = TOL[dtype] if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(np.asarray(g, np.float64), expected, **tol)


def _fused_inputs():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(B, H))
  w = rng.normal(size=(H, N)) / 4
  labels = rng.integers(0, N, size=B).astype(np.int32)
  pad = np.arange(B) % 3 != 0
  return x, w, labels, pad


def _fused_reference(x, w, labels, pad, reduction):
  loss = jnp.where(pad, optax.softmax_cross_entropy_with_integer_labels(x @ w, labels), 0.0)
  if reduction == "none":
    return loss
  return loss.sum() / (pad.sum() if reduction == "mean" else 1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
  "x_spec, w_spec",
  [(P("b", None), P()), (P(("b", "v"), None), P()), (P("b", None), P(None, "v")), (P(), P("v"))],
  ids=str,
)
def test_fused_loss_on_an_explicit_mesh(x_spec, w_spec, reduction):
  x, w, labels, pad = _fused_inputs()
  ref = lambda x, w: jnp.sum(_fused_reference(x, w, labels, pad, reduction))  # noqa: E731
  loss, (dx, dw) = jax.value_and_grad(ref, (0, 1))(x, w)

  def ours(x, w, y, m):
    out = jaxsoftmax.linear_softmax_cross_entropy(x, w, y, where=m, reduction=reduction)
    return jnp.sum(out)

  with jax.set_mesh(_explicit_mesh()):
    rows = P(x_spec[0]) if len(x_spec) else P()
    args = (
      _put(x, x_spec, jnp.float32),
      _put(w, w_spec, jnp.float32),
      _put(labels, rows),
      _put(pad, rows),
    )
    got, (gx, gw) = jax.jit(jax.value_and_grad(ours, (0, 1)))(*args)
  np.testing.assert_allclose(np.float64(got), np.float64(loss), **TOL[jnp.float32])
  np.testing.assert_allclose(np.asarray(gx, np.float64), np.asarray(dx), **TOL[jnp.float32])
  np.testing.assert_allclose(np.asarray(gw, np.float64), np.asarray(dw), **TOL[jnp.float32])


@pytest.mark.parametrize("e_spec", [P("v", None), P(None, "v")], ids=str)
def test_fused_loss_with_a_tied_table_and_soft_cap_on_an_explicit_mesh(e_spec):
  # A [V, H] embedding table split over V (or H), as transpose_w takes it, with
  # Gemma 2's soft cap: the reference caps the materialised logits x @ e.T.
  x, w, labels, pad = _fused_inputs()
  e, cap = w.T, 1.5

  def ref(x, e):
    z = cap * jnp.tanh((x @ e.T) / cap)
    return jnp.sum(jnp.where(pad, optax.softmax_cross_entropy_with_integer_labels(z, labels), 0))

  loss, (dx, de) = jax.value_and_grad(ref, (0, 1))(x, e)

  def ours(x, e, y, m):
    return jaxsoftmax.linear_softmax_cross_entropy(
      x, e, y, where=m, reduction="sum", transpose_w=True, logits_soft_cap=cap
    )

  with jax.set_mesh(_explicit_mesh()):
    args = (
      _put(x, P("b", None), jnp.float32),
      _put(e, e_spec, jnp.float32),
      _put(labels, P("b")),
      _put(pad, P("b")),
    )
    got, (gx, ge) = jax.jit(jax.value_and_grad(ours, (0, 1)))(*args)
  assert ge.shape == e.shape
  np.testing.assert_allclose(np.float64(got), np.float64(loss), **TOL[jnp.float32])
  np.testing.assert_allclose(np.asarray(gx, np.float64), np.asarray(dx), **TOL[jnp.float32])
  np.testing.assert_allclose(np.asarray(ge, np.float64), np.asarray(de), **TOL[jnp.float32])


def test_fused_loss_inside_shard_map_over_the_tokens():
  # A user's own data-parallel shard_map (varying-axes typing on): the loss's
  # loops start from carries typed like the tokens, and dw is summed over them.
  x, w, labels, pad = _fused_inputs()
  ref = lambda x, w: _fused_reference(x, w, labels, pad, "sum")  # noqa: E731
  loss, (dx, dw) = jax.value_and_grad(ref, (0, 1))(x, w)

  def local(x, w, y, m):
    out = jaxsoftmax.linear_softmax_cross_entropy(x, w, y, where=m, reduction="sum")
    return jax.lax.psum(out, "b")

  f = jax.shard_map(
    local, mesh=make_mesh((8,), ("b",)), in_specs=(P("b"), P(), P("b"), P("b")), out_specs=P()
  )
  got, (gx, gw) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w, labels, pad)
  np.testing.assert_allclose(got, loss, **TOL[jnp.float64])
  np.testing.assert_allclose(gx, dx, **TOL[jnp.float64])
  np.testing.assert_allclose(gw, dw, **TOL[jnp.float64])


def test_classes_split_are_never_gathered():
  # Classes split 4 ways: the forward's collectives carry row statistics and the
  # backward's a row sum, never the class axis (N columns, or N / 4 per device).
  from mesh_utils import collectives, dims

  x, where, *_ = _data()
  with jax.set_mesh(_explicit_mesh()):
    xs = _put(x, P("b", "v"), jnp.float32)
    ws = _put(where, P("b", "v"))
    f = lambda x, m: jnp.sum(jaxsoftmax.softmax(x, where=m) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(f)).lower(xs, ws).compile().as_text()
  found = collectives(hlo)
  assert found["all-gather"] or found["all-reduce"]
  for name, shapes in found.items():
    for shape in shapes:
      assert N not in dims(shape) and N // 4 not in dims(shape), (name, shape)


@pytest.mark.parametrize("spec", [P("b", None, "v"), P("b", "v", None), P(None, "b", "v")], ids=str)
def test_under_vmap(spec):
  # vmap over a dim that an explicit axis splits: the op sees one slice, whose
  # type no longer names that axis.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 8, N))
  w = rng.normal(size=(4, 8, N))
  f = lambda x: jnp.sum(jax.vmap(jaxsoftmax.softmax)(x) * w)  # noqa: E731
  ref = lambda x: jnp.sum(jax.nn.softmax(x) * w)  # noqa: E731
  with jax.set_mesh(_explicit_mesh()):
    got, g = jax.jit(jax.value_and_grad(f))(_put(x, spec, jnp.float32))
  np.testing.assert_allclose(got, ref(x), **TOL[jnp.float32])
  np.testing.assert_allclose(np.asarray(g, np.float64), jax.grad(ref)(x), **TOL[jnp.float32])


def test_vmap_of_grad_over_an_axis_an_explicit_mesh_splits():
  # The backward's label scatter stacks its counters with the labels: under vmap
  # over a split axis an unbatched counter came out unsplit (ShardingTypeError).
  x, _, labels, *_ = _data()
  x, labels = np.where(np.isfinite(x), x, 0.0).reshape(2, B // 2, N), labels.reshape(2, B // 2)

  def ref(x, y):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, y))

  want = jax.vmap(jax.grad(ref))(x, labels)

  def ours(x, y):
    return jnp.sum(jaxsoftmax.softmax_cross_entropy_with_integer_labels(x, y))

  with jax.set_mesh(_explicit_mesh()):
    xs, ys = _put(x, P("b", None, None), jnp.float32), _put(labels, P("b", None))
    got = jax.vmap(jax.grad(ours))(xs, ys)
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want), **TOL[jnp.float32])
