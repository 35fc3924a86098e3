"""softmax and log_softmax over a softmax axis split across 8 CPU devices.

Inside ``jax.shard_map`` with ``axis_name``, each device's block of the result and
of the gradient must equal the same block of the unsharded function applied to
the gathered array, special values included; ordinary rows are also checked
against ``jax.nn`` in float64. Under plain ``jit`` with sharded inputs, the
compiled HLO must reduce with all-reduce and never gather the class axis.
"""

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mesh_utils import LAYOUTS, TOL, B, N, collectives, dims, inputs, make_mesh

import jaxsoftmax

OPS = {"softmax": jaxsoftmax.softmax, "log_softmax": jaxsoftmax.log_softmax}
REFS = {"softmax": jax.nn.softmax, "log_softmax": jax.nn.log_softmax}


def _value_and_vjp(op, x, where, g, **kw):
  y, vjp = jax.vjp(lambda x: op(x, where=where, **kw), x)
  return y, vjp(g)[0]


def _all_ops(x, where, g, **kw):
  """Values and input cotangents of both ops, with and without ``where`` (one compile)."""
  return [
    out for op in OPS.values() for w in (None, where) for out in _value_and_vjp(op, x, w, g, **kw)
  ]


def _sharded(fun, layout, x, where, g, axis=-1):
  layout = LAYOUTS[layout] if isinstance(layout, str) else layout
  wndim = None if where is None else where.ndim
  return _compiled(fun, layout, x.ndim, wndim, axis)(x, where, g)


@functools.cache
def _compiled(fun, layout, ndim, wndim, axis):
  """``fun`` under jit(shard_map), cached so that tests sharing a layout compile once."""
  shape, names, spec, axis_name = layout
  wspec = spec if wndim in (None, ndim) else P(*spec[-wndim:])

  def local(x, where, g):
    return fun(x, where, g, axis=axis, axis_name=axis_name)

  f = jax.shard_map(
    local, mesh=make_mesh(shape, names), in_specs=(spec, wspec, spec), out_specs=spec
  )
  return jax.jit(f)


def _assert_same(actual, expected, dtype):
  # assert_allclose also requires NaN and +-inf at exactly the same places.
  for a, e in zip(actual, expected, strict=True):
    assert a.dtype == e.dtype == dtype
    np.testing.assert_allclose(np.float64(a), np.float64(e), **TOL[dtype])


@pytest.mark.parametrize(
  "layout,dtype",
  [(layout, dtype) for layout in LAYOUTS for dtype in (jnp.float64, jnp.float32)]
  + [("2x4:batch+classes", jnp.bfloat16)],
)
def test_sharded_equals_unsharded(layout, dtype):
  # softmax and log_softmax, values and gradients, with and without `where`.
  x, where, g = inputs(dtype)
  expected = jax.jit(_all_ops)(x, where, g)
  actual = _sharded(_all_ops, layout, x, where, g)
  _assert_same(actual, expected, dtype)


@pytest.mark.parametrize("name", list(OPS))
def test_sharded_matches_jax_nn_on_ordinary_rows(name):
  # An independent reference: jax.nn and its autodiff, in float64, rows 0 and 1.
  x, _, g = inputs(jnp.float64)
  y, dx = _sharded(partial(_value_and_vjp, OPS[name]), "2x4:batch+classes", x, None, g)
  ref = jax.jit(partial(_value_and_vjp, lambda x, where: REFS[name](x)))
  y_ref, dx_ref = ref(x[:2], None, g[:2])
  np.testing.assert_allclose(y[:2], y_ref, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(dx[:2], dx_ref, rtol=1e-10, atol=1e-13)


def test_masking_table_rows_when_sharded():
  # The special rows, against the masking table itself rather than the unsharded op.
  x, where, g = inputs(jnp.float64)
  _, _, s, ds, _, _, l, dl = _sharded(_all_ops, "8:classes", x, where, g)
  for row in (4, 7):  # all -inf; fully masked
    np.testing.assert_array_equal(s[row], np.zeros(N))
    np.testing.assert_array_equal(l[row], np.full(N, -np.inf))
    np.testing.assert_array_equal(ds[row], np.zeros(N))
    np.testing.assert_array_equal(dl[row], np.zeros(N))
  for row in (5, 6):  # +inf, NaN: this row is NaN at every kept entry, and no other row
    kept = np.asarray(where[row])
    for out in (s, l, ds):
      assert np.isnan(np.asarray(out[row])[kept]).all()
  others = [r for r in range(B) if r not in (5, 6)]
  assert not np.isnan(np.asarray(s)[others]).any()
  assert not np.isnan(np.asarray(ds)[others]).any()
  np.testing.assert_allclose(s[:4].sum(-1), np.ones(4), rtol=1e-14)
  np.testing.assert_array_equal(np.asarray(s)[~np.asarray(where)], 0.0)
  np.testing.assert_array_equal(np.asarray(ds)[~np.asarray(where)], 0.0)
  np.testing.assert_array_equal(np.asarray(l)[~np.asarray(where)], -np.inf)


def test_broadcast_mask_split_with_the_classes():
  # A mask of shape (N,) is split over the devices along with the class axis.
  x, where, g = inputs(jnp.float64)
  cls_mask = where[2]
  expected = jax.jit(_all_ops)(x, cls_mask, g)
  _assert_same(_sharded(_all_ops, "2x4:batch+classes", x, cls_mask, g), expected, jnp.float64)


def test_leading_softmax_axis_and_tuple_axes():
  # axis=0 split over devices, and a tuple of axes of which only one is split.
  x, where, g = inputs(jnp.float64)
  layout = ((4, 2), ("v", "b"), P("v", "b"), "v")
  expected = jax.jit(partial(_all_ops, axis=0))(x.T, where.T, g.T)
  _assert_same(_sharded(_all_ops, layout, x.T, where.T, g.T, axis=0), expected, jnp.float64)
  x3, w3, g3 = (a.reshape(B, 4, N // 4) for a in (x, where, g))
  layout = ((2, 4), ("b", "v"), P("b", None, "v"), "v")
  expected = jax.jit(partial(_all_ops, axis=(1, 2)))(x3, w3, g3)
  _assert_same(_sharded(_all_ops, layout, x3, w3, g3, axis=(1, 2)), expected, jnp.float64)


def test_axis_name_bound_by_vmap():
  # vmap binds an axis name too: blocks of a row, mapped, give the row's softmax.
  x, _, _ = inputs(jnp.float64)
  blocks = x[:4].reshape(4, 4, N // 4)  # row, block, entry
  f = jax.vmap(lambda b: jaxsoftmax.softmax(b, axis_name="k"), in_axes=1, axis_name="k")
  out = jax.jit(f)(blocks)
  expected = jax.jit(jaxsoftmax.softmax)(x[:4])
  np.testing.assert_allclose(
    jnp.moveaxis(out, 0, 1).reshape(4, N), expected, rtol=1e-13, atol=1e-15
  )


@pytest.mark.parametrize("name", list(OPS))
def test_tuple_axis_name_bound_by_nested_vmaps(name):
  # A row split over two nested vmaps, axis_name=("i", "j"): lax.all_gather
  # over a tuple of vmap axes fails inside JAX, so the statistics are gathered
  # one name at a time. Reference: jax.nn on the whole rows, in float64.
  x, _, g = inputs(jnp.float64)
  x, g = x[:3], g[:3]

  def split(a):  # row, i, j, entry
    return a.reshape(3, 2, 4, N // 8)

  def whole(a):  # (i, j, row, entry) back to (row, N)
    return jnp.transpose(a, (2, 0, 1, 3)).reshape(3, N)

  op = partial(OPS[name], axis_name=("i", "j"))
  f = jax.vmap(jax.vmap(op, in_axes=1, axis_name="j"), in_axes=1, axis_name="i")
  out, vjp = jax.vjp(lambda x: whole(f(split(x))), x)
  want, want_vjp = jax.vjp(REFS[name], x)
  np.testing.assert_allclose(out, want, **TOL[jnp.float64])
  np.testing.assert_allclose(vjp(g)[0], want_vjp(g)[0], **TOL[jnp.float64])


@pytest.mark.parametrize("name", list(OPS))
def test_unbound_axis_name_is_a_clear_error(name):
  op = OPS[name]
  x = jnp.zeros((2, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"`axis_name`='v' is not bound.*shard_map"):
    op(x, axis_name="v")
  with pytest.raises(ValueError, match=r"`axis_name`='v' is not bound"):
    jax.jit(lambda x: op(x, axis_name="v"))(x)
  mesh = make_mesh((8,), ("v",))
  f = jax.shard_map(
    lambda x: op(x, axis_name=("v", "w")), mesh=mesh, in_specs=P(None, "v"), out_specs=P()
  )
  with pytest.raises(ValueError, match=r"`axis_name`=\('v', 'w'\) is not bound"):
    f(x)
  with pytest.raises(TypeError, match="`axis_name` must be a mesh axis name"):
    op(x, axis_name=3)


def test_shard_map_forward_has_one_collective_and_backward_one():
  # The forward joins (max, sum exp) in one all-gather; each backward one all-reduce.
  mesh = make_mesh((2, 4), ("b", "v"))
  x, _, g = inputs(jnp.float32)
  for op in OPS.values():
    f = jax.shard_map(
      lambda x, op=op: op(x, axis_name="v"), mesh=mesh, in_specs=P("b", "v"), out_specs=P("b", "v")
    )
    fwd = collectives(jax.jit(f).lower(x).compile().as_text())
    assert {k: len(v) for k, v in fwd.items() if v} == {"all-gather": 1}
    # The gathered pair is tiny: (devices, 2, local rows, 1), never the class axis.
    assert dims(fwd["all-gather"][0]) == [4, B // 2, 1, 2]
    _, vjp = jax.vjp(jax.jit(f), x)
    bwd = collectives(jax.jit(vjp).lower(g).compile().as_text())
    assert {k: len(v) for k, v in bwd.items() if v} == {"all-reduce": 1}


@pytest.mark.parametrize("spec", [P(None, "v"), P("b", "v")], ids=["classes", "batch+classes"])
@pytest.mark.parametrize("name", list(OPS))
def test_plain_jit_with_named_sharding_never_gathers_the_classes(name, spec):
  # No shard_map and no axis_name: XLA's partitioner must reduce across devices.
  n = 64  # distinct from every other dimension, so a gathered class axis shows
  mesh = make_mesh((2, 4), ("b", "v"))
  sharding = NamedSharding(mesh, spec)
  x = jax.device_put(jax.random.normal(jax.random.key(1), (B, n), jnp.float32), sharding)
  op = OPS[name]
  fwd_hlo = jax.jit(op).lower(x).compile().as_text()
  grad_hlo = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(op(x))))).lower(x).compile().as_text()
  for hlo in (fwd_hlo, grad_hlo):
    found = collectives(hlo)
    assert all(n not in dims(shape) for shape in found["all-gather"]), found["all-gather"]
    assert not found["all-to-all"]
    assert found["all-reduce"], "the reductions over the split axis should be all-reduces"
  # The unsharded function's values, from the sharded input.
  expected = jax.jit(op)(jnp.asarray(np.asarray(x)))  # on one device
  np.testing.assert_allclose(jax.jit(op)(x), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", OPS)
def test_input_the_same_on_every_device_beside_a_mask_that_varies(name):
  # Inside a shard_map, one row of logits the same on every device along "b"
  # (typed invariant there), broadcast over rows whose mask differs per device,
  # with and without a class axis split by axis_name: the cotangent of the shared
  # row is the sum of the devices' parts, returned typed as the row was. Against
  # jax.nn in float64 on the row broadcast over the batch.
  x, where, g = inputs(jnp.float64)
  x1, where = x[:1], where.at[:, 0].set(True).at[:, N // 2].set(True)
  op, ref = OPS[name], REFS[name]

  def expected(x1, g):
    y = ref(jnp.broadcast_to(x1, (B, N)), where=where)
    return (jnp.where(where, y, 0.0) * g).sum()

  for mesh, row, rows, kw in [
    (make_mesh((8,), ("b",)), P(), P("b"), {}),
    (make_mesh((2, 4), ("b", "v")), P(None, "v"), P("b", "v"), {"axis_name": "v"}),
  ]:

    def body(x1, w, g, kw=kw, names=mesh.axis_names):
      y = op(jnp.broadcast_to(x1, w.shape), where=w, **kw)
      return jax.lax.psum((jnp.where(w, y, 0.0) * g).sum(), names)

    f = jax.shard_map(body, mesh=mesh, in_specs=(row, rows, rows), out_specs=P())
    got = jax.jit(jax.grad(f, (0, 2)))(x1, where, g)
    for a, b in zip(got, jax.grad(expected, (0, 1))(x1, g), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
