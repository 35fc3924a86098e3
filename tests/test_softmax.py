"""softmax and log_softmax: values, VJPs, masking, non-finite input, dtypes, errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxsoftmax

import draws
from references import eps, naive_log_softmax, naive_softmax, rel_err

OPS = {
  "softmax": (jaxsoftmax.softmax, naive_softmax),
  "log_softmax": (jaxsoftmax.log_softmax, naive_log_softmax),
}

SHAPES_AXES = [
  ((1,), -1),
  ((7,), 0),
  ((5, 9), -1),
  ((5, 9), 0),
  ((3, 4, 6), 1),
  ((3, 4, 6), (0, 2)),
  ((3, 4, 6), (-1, -3)),
  ((2, 3, 4, 5), (1, 2, 3)),
  ((3, 4, 5), None),
]


def _normal(seed, shape, dtype=jnp.float64, scale=3.0):
  return draws.normal(seed, shape, dtype, scale)


def _maybe_jit(f, use_jit):
  return jax.jit(f) if use_jit else f


# --- Against jax.grad of the naive definition, float64 -----------------------------


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
@pytest.mark.parametrize("op", OPS)
def test_matches_naive_definition_float64(op, shape, axis, use_jit):
  ours, naive = OPS[op]
  x, g = _normal(0, shape), _normal(1, shape, scale=1.0)
  y, vjp = jax.vjp(_maybe_jit(partial(ours, axis=axis), use_jit), x)
  y_ref, vjp_ref = jax.vjp(partial(naive, axis=axis), x)
  assert y.dtype == jnp.float64
  np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("op", OPS)
def test_matches_torch_analytic_backward(op):
  torch = pytest.importorskip("torch")
  ours, _ = OPS[op]
  x, g = _normal(2, (6, 33)), _normal(3, (6, 33), scale=1.0)
  for axis in (0, 1):
    tx = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
    ty = getattr(torch, op)(tx, dim=axis)
    (tdx,) = torch.autograd.grad(ty, tx, torch.tensor(np.asarray(g)))
    y, vjp = jax.vjp(partial(ours, axis=axis), x)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(vjp(g)[0], tdx.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("axis", [-1, 0, (0, 1)])
def test_check_grads_second_order_reverse(op, axis):
  ours, _ = OPS[op]
  x = _normal(4, (3, 5), scale=1.0)
  check_grads(partial(ours, axis=axis), (x,), order=2, modes=["rev"])


def test_jacobian_is_diag_minus_outer():
  x = _normal(5, (6,))
  s = naive_softmax(x)
  expected = jnp.diag(s) - jnp.outer(s, s)
  np.testing.assert_allclose(jax.jacrev(jaxsoftmax.softmax)(x), expected, rtol=1e-13, atol=1e-16)


def test_log_softmax_jacobian_is_identity_minus_softmax_rows():
  x = _normal(6, (6,))
  s = naive_softmax(x)
  expected = jnp.eye(6) - s[None, :]
  np.testing.assert_allclose(
    jax.jacrev(jaxsoftmax.log_softmax)(x), expected, rtol=1e-13, atol=1e-15
  )


@pytest.mark.parametrize("axis", [-1, 0, (0, 2)])
def test_softmax_gradient_sums_to_zero_along_axis(axis):
  x, g = _normal(7, (4, 5, 6)), _normal(8, (4, 5, 6), scale=1.0)
  _, vjp = jax.vjp(partial(jaxsoftmax.softmax, axis=axis), x)
  dx = vjp(g)[0]
  assert float(jnp.max(jnp.abs(dx))) > 1e-3  # the check below is not vacuous
  np.testing.assert_allclose(jnp.sum(dx, axis), 0.0, atol=1e-14)


def test_reverse_over_reverse_hessian_and_hvp():
  x, w, v = _normal(9, (7,)), _normal(10, (7,)), _normal(11, (7,))

  def f(fn):
    return lambda x: jnp.sum(fn(x) * w)

  hess = jax.jacrev(jax.jacrev(f(jaxsoftmax.softmax)))(x)
  hess_ref = jax.hessian(f(naive_softmax))(x)  # forward-over-reverse on the naive definition
  np.testing.assert_allclose(hess, hess_ref, rtol=1e-11, atol=1e-14)
  hvp = jax.grad(lambda x: jnp.vdot(jax.grad(f(jaxsoftmax.log_softmax))(x), v))(x)
  hvp_ref = jax.hessian(f(naive_log_softmax))(x) @ v
  np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-11, atol=1e-14)


def test_forward_mode_is_unavailable():
  x = _normal(12, (4,))
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(jaxsoftmax.softmax, (x,), (x,))


# --- Residuals ---------------------------------------------------------------------


def _residuals(f, x):
  from jax._src.ad_checkpoint import saved_residuals

  return [aval for aval, _ in saved_residuals(f, x)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_keeps_only_its_output(dtype):
  x = _normal(13, (64, 128), dtype)
  ours = _residuals(jaxsoftmax.softmax, x)
  assert [(r.shape, r.dtype) for r in ours] == [(x.shape, jnp.dtype(dtype))]
  nn = _residuals(jax.nn.softmax, x)
  nbytes = lambda rs: sum(r.size * r.dtype.itemsize for r in rs)  # noqa: E731
  assert nbytes(ours) < nbytes(nn)


def test_log_softmax_keeps_output_and_a_flag_per_slice():
  x = _normal(14, (64, 128), jnp.bfloat16)
  full = [r for r in _residuals(jaxsoftmax.log_softmax, x) if r.size == x.size]
  small = [r for r in _residuals(jaxsoftmax.log_softmax, x) if r.size != x.size]
  assert [(r.shape, r.dtype) for r in full] == [(x.shape, jnp.dtype(jnp.bfloat16))]
  assert all(r.size <= 64 for r in small)


def test_mask_is_kept_in_its_own_shape():
  x = _normal(15, (8, 16, 32), jnp.float32)
  where = jnp.arange(32) < 20
  res = _residuals(lambda x: jaxsoftmax.softmax(x, where=where), x)
  shapes = sorted(r.shape for r in res)
  assert shapes == [(1, 1, 32), (8, 16, 32)]


# --- Masking ------------------------------------------------------------------------


def _mask(seed, shape, p=0.6):
  return draws.bernoulli(seed, p, shape)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("op", OPS)
def test_where_matches_naive_on_the_kept_entries(op, use_jit):
  ours, naive = OPS[op]
  x, g = _normal(16, (6, 10)), _normal(17, (6, 10), scale=1.0)
  where = _mask(18, (6, 10)).at[:, 0].set(True)
  f = _maybe_jit(lambda x, w: ours(x, where=w), use_jit)  # where traced under jit
  y, vjp = jax.vjp(lambda x: f(x, where), x)
  dx = vjp(g)[0]
  fill = 0.0 if op == "softmax" else -jnp.inf
  for r in range(6):
    keep = np.asarray(where[r])
    y_ref, vjp_ref = jax.vjp(naive, x[r, keep])
    np.testing.assert_allclose(y[r, keep], y_ref, rtol=1e-13)
    np.testing.assert_array_equal(y[r, ~keep], fill)
    np.testing.assert_allclose(dx[r, keep], vjp_ref(g[r, keep])[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(dx[r, ~keep], 0.0)


@pytest.mark.parametrize("big", [1e30, -1e30])
@pytest.mark.parametrize("op", OPS)
def test_gradient_at_masked_huge_logit_is_exactly_zero(op, big):
  ours, naive = OPS[op]
  x = jnp.array([1.0, 2.0, big, 0.5], jnp.float32)
  where = jnp.array([True, True, False, True])
  g = jnp.array([0.3, -1.0, 2.0, 0.7], jnp.float32)
  y, vjp = jax.vjp(lambda x: ours(x, where=where), x)
  dx = vjp(g)[0]
  assert dx[2] == 0.0
  keep = np.asarray(where)
  x64 = x[keep].astype(jnp.float64)
  _, vjp_ref = jax.vjp(naive, x64)
  np.testing.assert_allclose(dx[keep], vjp_ref(g[keep].astype(jnp.float64))[0], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
@pytest.mark.parametrize("op", OPS)
def test_fully_masked_slice(op, dtype):
  ours, _ = OPS[op]
  x = _normal(19, (3, 5), dtype).at[1, 2].set(1e30)
  where = jnp.ones((3, 5), bool).at[1].set(False)
  y, vjp = jax.vjp(lambda x: ours(x, where=where), x)
  dx = vjp(jnp.ones_like(x))[0]
  fill = 0.0 if op == "softmax" else -np.inf
  np.testing.assert_array_equal(np.asarray(y[1], np.float64), fill)
  np.testing.assert_array_equal(np.asarray(dx[1], np.float64), 0.0)
  assert np.isfinite(np.asarray(dx, np.float64)).all()
  assert np.isfinite(np.asarray(y[0], np.float64)).all()
  # Second order through the fully masked slice is finite and zero too.
  hess = jax.jacrev(jax.grad(lambda x: jnp.sum(ours(x, where=where)[0])))(x.astype(jnp.float64))
  assert np.isfinite(hess).all()


def test_mask_that_does_not_broadcast_names_both_shapes():
  with pytest.raises(ValueError, match=r"\(3,\).*\(4, 5\)"):
    jaxsoftmax.softmax(jnp.zeros((4, 5)), where=jnp.ones(3, bool))


def test_non_boolean_mask_is_a_type_error():
  with pytest.raises(TypeError, match="where.*bool"):
    jaxsoftmax.log_softmax(jnp.zeros((4, 5)), where=jnp.ones((4, 5), jnp.int32))


# --- Non-finite input ---------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_all_neg_inf_slice_without_where(op):
  ours, _ = OPS[op]
  x = jnp.array([[-jnp.inf] * 4, [0.0, 1.0, 2.0, 3.0]], jnp.float32)
  y, vjp = jax.vjp(ours, x)
  dx = vjp(jnp.ones_like(x) * 3.0)[0]
  fill = 0.0 if op == "softmax" else -np.inf
  np.testing.assert_array_equal(y[0], fill)
  np.testing.assert_array_equal(dx[0], 0.0)
  assert np.isfinite(y[1]).all() and np.isfinite(dx).all()
  # jax.nn gives NaN here; we differ on purpose.
  assert np.isnan(jax.nn.softmax(x[0])).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("op", OPS)
def test_all_neg_inf_slice_of_one_entry(op, dtype):
  # A slice of one entry: XLA drops a reduction's initial value there (it takes it
  # for the identity), so the max's finite start must not come from it alone.
  ours, _ = OPS[op]
  fill = 0.0 if op == "softmax" else -np.inf
  for x, axis in [
    (jnp.full((3, 1), -jnp.inf, dtype), -1),
    (jnp.full((2, 1, 3), -jnp.inf, dtype), 1),
  ]:
    x = x.at[0].set(0.5)  # a live slice beside the empty ones
    y, vjp = jax.vjp(lambda x, axis=axis: ours(x, axis=axis), x)
    dx = vjp(jnp.full_like(x, 3.0))[0]
    np.testing.assert_array_equal(y[1:], fill)
    np.testing.assert_array_equal(dx, 0.0)  # one entry: s = 1, so dx = s (g - g s) = 0
    np.testing.assert_array_equal(y[0], 1.0 if op == "softmax" else 0.0)
  # The integer-label loss on one class at -inf: +inf, as on two classes at -inf.
  ce = jaxsoftmax.softmax_cross_entropy_with_integer_labels
  assert ce(jnp.array([[-jnp.inf]], dtype), jnp.array([0]))[0] == jnp.inf


@pytest.mark.parametrize("op", OPS)
def test_neg_inf_entries_get_zero_probability(op):
  ours, naive = OPS[op]
  x = jnp.array([1.0, -jnp.inf, 0.5, -jnp.inf, 2.0], jnp.float64)
  finite = np.isfinite(x)
  y, vjp = jax.vjp(ours, x)
  g = jnp.array([0.5, 1.0, -1.0, 2.0, 0.25], jnp.float64)
  dx = vjp(g)[0]
  y_ref, vjp_ref = jax.vjp(naive, x[finite])
  np.testing.assert_allclose(y[finite], y_ref, rtol=1e-14)
  if op == "softmax":
    np.testing.assert_allclose(dx[finite], vjp_ref(g[finite])[0], rtol=1e-13)
    np.testing.assert_array_equal(y[~finite], 0.0)
    np.testing.assert_array_equal(dx[~finite], 0.0)
  else:
    # l_i = x_i - lse(x): every l_i, -inf ones included, depends on lse, so all of g
    # enters sum(g), and dl_i/dx_i = 1 - s_i = 1 passes g through at -inf entries.
    # jax.nn.log_softmax and PyTorch agree (the naive log(0) has no derivative there).
    np.testing.assert_array_equal(y[~finite], -np.inf)
    s = jnp.exp(y_ref)
    expected = g.at[finite].add(-s * jnp.sum(g))
    np.testing.assert_allclose(dx, expected, rtol=1e-13)
    np.testing.assert_allclose(dx, jax.vjp(jax.nn.log_softmax, x)[1](g)[0], rtol=1e-13)


@pytest.mark.parametrize("bad", [jnp.inf, jnp.nan])
@pytest.mark.parametrize("op", OPS)
def test_pos_inf_or_nan_poisons_only_its_slice(op, bad):
  ours, _ = OPS[op]
  x = _normal(20, (3, 4), jnp.float32).at[1, 2].set(bad)
  y, vjp = jax.vjp(ours, x)
  dx = vjp(jnp.ones_like(x))[0]
  assert np.isnan(y[1]).all() and np.isnan(dx[1]).all()
  y, dx = np.asarray(y), np.asarray(dx)
  assert np.isfinite(y[[0, 2]]).all() and np.isfinite(dx[[0, 2]]).all()


# --- Dtypes and accuracy ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
@pytest.mark.parametrize("op", OPS)
def test_accuracy_against_float64_on_rounded_inputs(op, dtype):
  ours, naive = OPS[op]
  shape = (16, 257)
  x = _normal(21, shape, dtype, scale=2.0)
  g = _normal(22, shape, dtype, scale=1.0)
  y, vjp = jax.vjp(ours, x)
  dx = vjp(g)[0]
  assert y.dtype == dtype and dx.dtype == dtype
  y_ref, vjp_ref = jax.vjp(naive, x.astype(jnp.float64))
  dx_ref = vjp_ref(g.astype(jnp.float64))[0]
  assert rel_err(y, y_ref) <= 4 * eps(dtype)
  assert rel_err(dx, dx_ref) <= 8 * eps(dtype)


@pytest.mark.parametrize("op", OPS)
def test_zero_length_axis_gives_empty_output_and_gradient(op):
  # As jax.nn: a softmax over an axis of length 0 is an empty array, not an error.
  ours, naive = OPS[op]
  x = jnp.zeros((3, 0))
  y, dx = _fwd_bwd(ours, x, x)
  y_ref, dx_ref = _fwd_bwd(naive, x, x)
  assert y.shape == y_ref.shape == (3, 0) and dx.shape == dx_ref.shape == (3, 0)


@pytest.mark.parametrize("op", OPS)
def test_long_rows_summed_in_pieces_match_float64(op):
  # On the CPU a row of 65536 or more entries is summed in pieces of 2048 (here
  # 48 of them); a NaN row and an all -inf row keep their meaning.
  ours, naive = OPS[op]
  x = _normal(23, (4, 98304), jnp.float32, scale=2.0)
  x = x.at[2, 7].set(jnp.nan).at[3].set(-jnp.inf)
  g = _normal(24, x.shape, jnp.float32, scale=1.0)
  y, dx = _fwd_bwd(ours, x, g)
  y_ref, dx_ref = _fwd_bwd(naive, x[:2].astype(jnp.float64), g[:2].astype(jnp.float64))
  assert rel_err(y[:2], y_ref) <= 4 * eps(jnp.float32)
  assert rel_err(dx[:2], dx_ref) <= 8 * eps(jnp.float32)
  assert np.isnan(y[2]).all() and np.isnan(dx[2]).all()
  np.testing.assert_array_equal(y[3], 0.0 if op == "softmax" else -np.inf)
  np.testing.assert_array_equal(dx[3], 0.0)
  assert "4x48x2048xf32" in jax.jit(ours).lower(x).as_text()
  # Other platforms take the plain sum; the program still exports for all of them.
  spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
  exported = jax.export.export(jax.jit(ours), platforms=["cpu", "cuda", "tpu"])(spec)
  assert exported.platforms == ("cpu", "cuda", "tpu")


def _fwd_bwd(f, x, g):
  def run(x, g):
    y, vjp = jax.vjp(f, x)
    return y, vjp(g)[0]

  return jax.jit(run)(x, g)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_computes_in_float32(dtype):
  # A row whose normaliser overflows float16 and loses bits in bfloat16 arithmetic.
  x = jnp.full((1000,), 11.0, dtype).at[0].set(12.0)
  y = jaxsoftmax.softmax(x)
  x64 = x.astype(jnp.float64)
  y_ref = naive_softmax(x64 - jnp.max(x64))
  assert y.dtype == dtype
  assert rel_err(y, y_ref) <= 4 * eps(dtype)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8])
def test_integer_input_is_promoted_to_default_float(dtype):
  x = jnp.arange(6).reshape(2, 3).astype(dtype)
  y = jaxsoftmax.softmax(x)
  assert y.dtype == jnp.result_type(float)
  np.testing.assert_allclose(y, naive_softmax(x.astype(jnp.float64)), rtol=1e-13)


@pytest.mark.parametrize("op", [jaxsoftmax.softmax, jaxsoftmax.log_softmax])
def test_boolean_or_abstract_input_is_a_type_error(op):
  # jax.nn refuses booleans too; a boolean x is most likely a mask meant for `where`.
  with pytest.raises(TypeError, match="`x` has boolean dtype.*`where`"):
    op(jnp.array([True, False]))
  with pytest.raises(TypeError, match="`x` has boolean dtype"):
    op(True)
  with pytest.raises(TypeError, match="`x` must be an array, got ShapeDtypeStruct"):
    op(jax.ShapeDtypeStruct((2, 3), jnp.float32))


def test_complex_input_is_a_type_error():
  with pytest.raises(TypeError, match="complex"):
    jaxsoftmax.softmax(jnp.ones(3, jnp.complex64))
  # A numpy complex128 array is named as it is, though JAX without x64 makes it complex64.
  with jax.enable_x64(False), pytest.raises(TypeError, match="complex dtype complex128"):
    jaxsoftmax.softmax(np.ones(3, np.complex128))


def test_python_scalars_and_numpy_arrays_are_accepted():
  np.testing.assert_allclose(jaxsoftmax.softmax(np.array([0.0, np.log(3.0)])), [0.25, 0.75])
  with pytest.raises(TypeError, match="`x`"):
    jaxsoftmax.softmax([1.0, 2.0])


# --- Axis errors --------------------------------------------------------------------


@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_axis_out_of_range(axis):
  with pytest.raises(ValueError, match=r"axis.*ndim=2"):
    jaxsoftmax.softmax(jnp.zeros((3, 4)), axis=axis)


@pytest.mark.parametrize("axis", [(0, 0), (1, -1)])
def test_duplicate_axes(axis):
  with pytest.raises(ValueError, match="repeats an axis"):
    jaxsoftmax.log_softmax(jnp.zeros((3, 4)), axis=axis)


def test_bad_implementation():
  with pytest.raises(ValueError, match="implementation"):
    jaxsoftmax.softmax(jnp.zeros(3), implementation="cuda")


# --- Composition --------------------------------------------------------------------


@pytest.mark.parametrize("in_axis", [0, 1, 2])
@pytest.mark.parametrize("op", OPS)
def test_vmap_with_the_mapped_axis_anywhere(op, in_axis):
  ours, naive = OPS[op]
  x, g = _normal(23, (3, 4, 5)), _normal(24, (3, 4, 5), scale=1.0)
  # Softmax over the last axis of each mapped slice.
  f = jax.vmap(lambda v: ours(v, axis=-1), in_axes=in_axis, out_axes=in_axis)
  y, vjp = jax.vjp(f, x)
  y_ref, vjp_ref = jax.vjp(lambda x: naive(x, axis=2 if in_axis != 2 else 1), x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-14)
  np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-12, atol=1e-14)


def test_vmap_over_mask():
  x = _normal(25, (4, 6))
  where = _mask(26, (4, 6)).at[:, 0].set(True)
  y = jax.vmap(lambda x, w: jaxsoftmax.softmax(x, where=w))(x, where)
  np.testing.assert_array_equal(y, jaxsoftmax.softmax(x, where=where) * 1.0)
  for r in range(4):
    keep = np.asarray(where[r])
    np.testing.assert_allclose(y[r, keep], naive_softmax(x[r, keep]), rtol=1e-13)


@pytest.mark.parametrize("op", OPS)
def test_checkpoint_and_scan(op):
  ours, naive = OPS[op]
  xs = _normal(27, (5, 3, 4))

  def body(fn):
    def step(c, x):
      return c + jnp.sum(jnp.sin(fn(x + c))), None

    return lambda xs: jax.lax.scan(jax.checkpoint(step), 0.0, xs)[0]

  val, dx = jax.value_and_grad(body(ours))(xs)
  val_ref, dx_ref = jax.value_and_grad(body(naive))(xs)
  np.testing.assert_allclose(val, val_ref, rtol=1e-13)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-14)


def test_pmap():
  n = jax.local_device_count()
  x, g = _normal(28, (n, 3, 5)), _normal(29, (n, 3, 5), scale=1.0)
  f = jax.pmap(lambda x, g: jax.vjp(jaxsoftmax.softmax, x)[1](g)[0])
  _, vjp_ref = jax.vjp(naive_softmax, x)
  np.testing.assert_allclose(f(x, g), vjp_ref(g)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
@pytest.mark.parametrize("op", OPS)
def test_exports_for_every_xla_platform(op, dtype):
  ours, _ = OPS[op]

  @jax.jit
  def fwd_bwd(x, g, where):
    y, vjp = jax.vjp(lambda x: ours(x, where=where), x)
    return y, vjp(g)[0]

  spec = jax.ShapeDtypeStruct((8, 128), dtype)
  mask = jax.ShapeDtypeStruct((8, 128), jnp.bool_)
  platforms = ["cpu", "cuda", "rocm", "tpu"]
  exported = jax.export.export(fwd_bwd, platforms=platforms)(spec, spec, mask)
  assert exported.platforms == tuple(platforms)
  assert [a.dtype for a in exported.out_avals] == [jnp.dtype(dtype)] * 2
