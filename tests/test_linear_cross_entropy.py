"""jaxsoftmax.linear_softmax_cross_entropy against unfused references.

References (none of them calls the fused code): jax.grad of the naive
definition ``-sum(target * log_softmax(x @ w)) + z_loss * lse**2`` in float64,
optax on the materialised logits, PyTorch's ``F.cross_entropy`` in float64, the
unfused ``jaxsoftmax.softmax_cross_entropy_with_integer_labels`` where it
exists, and finite differences (``check_grads``).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxsoftmax
from jaxsoftmax import linear_softmax_cross_entropy as lce

import draws
from references import rel_err

REDUCTIONS = ["mean", "sum", "none"]
# (label_smoothing, z_loss)
TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def _reduce(per_token, where, reduction):
  """Masking and reduction, written out: the mean is over included tokens, 0 if none."""
  if where is not None:
    per_token = jnp.where(where, per_token, 0.0)
  if reduction == "none":
    return per_token
  total = jnp.sum(per_token)
  if reduction == "sum":
    return total
  count = per_token.size if where is None else jnp.sum(jnp.broadcast_to(where, per_token.shape))
  return total / jnp.maximum(count, 1)


def naive_per_token(x, w, labels, label_smoothing=0.0, z_loss=0.0, soft_cap=None):
  """``-sum(target * log_softmax(z)) + z_loss * lse**2``, literally, in float64, with
  ``z = x @ w`` or, with ``soft_cap``, ``soft_cap * tanh(x @ w / soft_cap)`` (Gemma 2)."""
  z = jnp.asarray(x, jnp.float64) @ jnp.asarray(w, jnp.float64)
  if soft_cap is not None:
    z = soft_cap * jnp.tanh(z / soft_cap)
  v = z.shape[-1]
  lse = jnp.log(jnp.sum(jnp.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
  logp = z - lse[..., None]
  target = (1.0 - label_smoothing) * jax.nn.one_hot(labels, v, dtype=z.dtype) + label_smoothing / v
  return -jnp.sum(target * logp, -1) + z_loss * lse**2


def optax_per_token(x, w, labels, label_smoothing=0.0, z_loss=0.0):
  """optax on the materialised logits (smoothing via optax.smooth_labels)."""
  z = x @ w
  if label_smoothing:
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    loss = optax.softmax_cross_entropy(z, optax.smooth_labels(onehot, label_smoothing))
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(z, labels)
  if z_loss:
    loss = loss + z_loss * jax.nn.logsumexp(z, -1) ** 2
  return loss


def unfused_per_token(x, w, labels, label_smoothing=0.0, z_loss=0.0):
  """The library's own unfused cross-entropy (issue 4) on the materialised logits."""
  return jaxsoftmax.softmax_cross_entropy_with_integer_labels(
    x @ w, labels, label_smoothing=label_smoothing, z_loss=z_loss
  )


def _inputs(batch, h, v, dtype, seed=0, where_p=None):
  seed = 5 * seed  # five draws a seed, none shared with another seed's
  x = draws.normal(seed, (*batch, h), dtype)
  w = draws.normal(seed + 1, (h, v), dtype, scale=2 / np.sqrt(h))
  labels = draws.randint(seed + 2, batch, 0, v)
  where = None if where_p is None else draws.bernoulli(seed + 3, where_p, batch)
  # A cotangent for "none", so that every token's gradient is weighted differently.
  ct = draws.normal(seed + 4, batch, jnp.float64)
  return x, w, labels, where, ct


def _value_and_grads(per_token, x, w, labels, where, ct, reduction, fused_kw=None):
  """Jitted loss (per token for "none") and (dx, dw) of ``sum(ct * loss)``
  ("none") or of the reduced loss.

  With ``fused_kw`` the fused op runs; otherwise ``per_token`` (a reference) is
  masked and reduced as written out in ``_reduce``. (The per-token losses, not
  ``sum(ct * loss)``: with random-sign ``ct`` that sum cancels to a small part of
  its terms, and its relative error says more about the cancellation than the op.)
  """

  def f(x, w, labels, where, ct):
    if fused_kw is not None:
      out = lce(x, w, labels, where=where, reduction=reduction, **fused_kw)
    else:
      out = _reduce(per_token(x, w, labels), where, reduction)
    return (jnp.sum(out * ct.astype(out.dtype)) if reduction == "none" else out), out

  (_, out), (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(x, w, labels, where, ct)
  return out, dx, dw


def _assert_close(actual, expected, tol, what):
  for a, e, name in zip(actual, expected, ["loss", "dx", "dw"], strict=True):
    err = rel_err(a, e)
    assert err <= tol, f"{what}: {name} relative error {err:.3g} > {tol:g}"


CASES = [(r, m, (0.0, 0.0)) for r in REDUCTIONS for m in (False, True)]
CASES += [(r, m, (0.25, 3e-3)) for r in REDUCTIONS for m in (False, True)]
CASES += [("mean", True, (0.1, 0.0)), ("none", True, (0.0, 1e-2))]


@pytest.mark.parametrize(("reduction", "masked", "extras"), CASES)
def test_float64_matches_naive(reduction, masked, extras):
  eps, zl = extras
  # Ragged: V = 37 is not a multiple of the chunk size 8, and there are leading batch dims.
  x, w, labels, where, ct = _inputs((3, 5), 16, 37, jnp.float64, where_p=0.6 if masked else None)
  kw = dict(chunk_size=8, label_smoothing=eps, z_loss=zl)
  got = _value_and_grads(None, x, w, labels, where, ct, reduction, fused_kw=kw)
  ref = _value_and_grads(
    lambda x, w, y: naive_per_token(x, w, y, eps, zl), x, w, labels, where, ct, reduction
  )
  _assert_close(got, ref, TOL[jnp.float64], "naive float64")
  assert got[1].dtype == jnp.float64 and got[2].dtype == jnp.float64
  if reduction == "none":
    # the per-token values themselves, not only their weighted sum
    out = lce(x, w, labels, where=where, reduction="none", **kw)
    assert out.shape == (3, 5)
    ref_tok = _reduce(naive_per_token(x, w, labels, eps, zl), where, "none")
    assert rel_err(out, ref_tok) <= TOL[jnp.float64]


@pytest.mark.parametrize(
  ("dtype", "reduction", "extras"),
  [(jnp.float32, r, (0.25, 3e-3)) for r in REDUCTIONS] + [(jnp.float64, "mean", (0.0, 0.0))],
)
def test_matches_optax(dtype, reduction, extras):
  masked = reduction != "sum"
  eps, zl = extras
  x, w, labels, where, ct = _inputs((4, 6), 24, 53, dtype, seed=1, where_p=0.5 if masked else None)
  kw = dict(chunk_size=16, label_smoothing=eps, z_loss=zl)
  got = _value_and_grads(None, x, w, labels, where, ct, reduction, fused_kw=kw)
  ref = _value_and_grads(
    lambda x, w, y: optax_per_token(x, w, y, eps, zl), x, w, labels, where, ct, reduction
  )
  _assert_close(got, ref, TOL[dtype], f"optax {jnp.dtype(dtype).name}")
  assert got[1].dtype == dtype and got[2].dtype == dtype


@pytest.mark.parametrize(("reduction", "masked"), [("mean", True), ("sum", False), ("none", True)])
def test_float32_matches_float64_truth(reduction, masked):
  extras = (0.2, 1e-2)
  eps, zl = extras
  x, w, labels, where, ct = _inputs(
    (2, 3, 4), 32, 100, jnp.float32, seed=2, where_p=0.7 if masked else None
  )
  kw = dict(chunk_size=24, label_smoothing=eps, z_loss=zl)
  got = _value_and_grads(None, x, w, labels, where, ct, reduction, fused_kw=kw)
  x64, w64 = x.astype(jnp.float64), w.astype(jnp.float64)
  ref = _value_and_grads(
    lambda x, w, y: naive_per_token(x, w, y, eps, zl), x64, w64, labels, where, ct, reduction
  )
  _assert_close(got, ref, TOL[jnp.float32], "float32 vs float64 truth")


unfused = pytest.mark.skipif(
  not hasattr(jaxsoftmax, "softmax_cross_entropy_with_integer_labels"),
  reason="the unfused cross-entropy (issue 4) is not in this build yet",
)


UNFUSED_CASES = [(jnp.float64, r, m, (0.25, 3e-3)) for r in REDUCTIONS for m in (False, True)]
UNFUSED_CASES += [(jnp.float64, "mean", True, (0.0, 0.0)), (jnp.float64, "none", False, (0.1, 0.0))]
UNFUSED_CASES += [(jnp.float32, r, r != "sum", (0.25, 3e-3)) for r in REDUCTIONS]


@unfused
@pytest.mark.parametrize(("dtype", "reduction", "masked", "extras"), UNFUSED_CASES)
def test_matches_unfused_cross_entropy(dtype, reduction, masked, extras):
  eps, zl = extras
  x, w, labels, where, ct = _inputs((2, 5), 16, 45, dtype, seed=3, where_p=0.6 if masked else None)
  kw = dict(chunk_size=7, label_smoothing=eps, z_loss=zl)
  got = _value_and_grads(None, x, w, labels, where, ct, reduction, fused_kw=kw)
  ref = _value_and_grads(
    lambda x, w, y: unfused_per_token(x, w, y, eps, zl), x, w, labels, where, ct, reduction
  )
  _assert_close(got, ref, TOL[dtype], f"unfused {jnp.dtype(dtype).name}")


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_matches_torch(eps):
  torch = pytest.importorskip("torch")
  x, w, labels, where, _ = _inputs((12,), 8, 19, jnp.float64, seed=4, where_p=0.6)
  labels = jnp.where(where, labels, -100)  # PyTorch's ignore_index marks the excluded tokens
  tx = torch.tensor(np.asarray(x), requires_grad=True)
  tw = torch.tensor(np.asarray(w), requires_grad=True)
  tl = torch.nn.functional.cross_entropy(
    tx @ tw, torch.tensor(np.asarray(labels)), label_smoothing=eps, ignore_index=-100
  )
  tl.backward()

  def f(x, w):
    return lce(x, w, labels, where=where, chunk_size=5, label_smoothing=eps)

  val, (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
  _assert_close(
    (val, dx, dw),
    (tl.detach().numpy(), tx.grad.numpy(), tw.grad.numpy()),
    1e-10,
    "torch float64",
  )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_finite_differences(reduction):
  x, w, labels, where, _ = _inputs((6,), 5, 11, jnp.float64, seed=5, where_p=0.7)

  def f(x, w):
    return lce(
      x, w, labels, where=where, reduction=reduction, chunk_size=4, label_smoothing=0.1, z_loss=0.05
    )

  check_grads(jax.jit(f), (x, w), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000, None])
def test_every_chunk_size_gives_the_same_result(chunk_size):
  # V = 11: one column per chunk, ragged tails, exactly one chunk, a chunk larger than V.
  x, w, labels, where, ct = _inputs((7,), 6, 11, jnp.float64, seed=6, where_p=0.8)
  kw = dict(chunk_size=chunk_size, label_smoothing=0.05, z_loss=1e-3)
  got = _value_and_grads(None, x, w, labels, where, ct, "mean", fused_kw=kw)
  ref = _value_and_grads(
    lambda x, w, y: naive_per_token(x, w, y, 0.05, 1e-3), x, w, labels, where, ct, "mean"
  )
  _assert_close(got, ref, 1e-10, f"chunk_size={chunk_size}")


# (reduction, masked, label_smoothing, z_loss, logits_soft_cap)
TIED_CASES = [("mean", True, 0.0, 0.0, None), ("sum", False, 0.25, 3e-3, None)]
TIED_CASES += [("none", True, 0.1, 1e-2, 2.0), ("mean", False, 0.0, 0.0, 0.5)]


@pytest.mark.parametrize(("reduction", "masked", "eps", "zl", "cap"), TIED_CASES)
def test_transposed_w_matches_naive_on_its_transpose(reduction, masked, eps, zl, cap):
  # A tied embedding table e of shape [V, H]: the loss of x @ e.T, and de in e's own layout.
  x, w, labels, where, ct = _inputs(
    (3, 4), 16, 37, jnp.float64, seed=7, where_p=0.6 if masked else None
  )
  e = w.T
  kw = dict(chunk_size=8, label_smoothing=eps, z_loss=zl, transpose_w=True, logits_soft_cap=cap)
  got = _value_and_grads(None, x, e, labels, where, ct, reduction, fused_kw=kw)
  ref = _value_and_grads(
    lambda x, e, y: naive_per_token(x, e.T, y, eps, zl, cap), x, e, labels, where, ct, reduction
  )
  _assert_close(got, ref, TOL[jnp.float64], "transpose_w float64")
  assert got[2].shape == e.shape


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("cap", [0.3, 4.0, 30.0])
def test_logits_soft_cap_matches_naive(cap, transpose_w):
  # cap = 0.3 saturates most logits (|x @ w| is a few units), cap = 30 hardly any.
  x, w, labels, where, ct = _inputs((5, 3), 12, 29, jnp.float64, seed=8, where_p=0.7)
  w = w * 3
  w_in = w.T if transpose_w else w
  kw = dict(chunk_size=6, logits_soft_cap=cap, z_loss=1e-3, transpose_w=transpose_w)
  got = _value_and_grads(None, x, w_in, labels, where, ct, "mean", fused_kw=kw)
  wt = (lambda w: w.T) if transpose_w else (lambda w: w)
  ref = _value_and_grads(
    lambda x, w, y: naive_per_token(x, wt(w), y, 0.0, 1e-3, cap), x, w_in, labels, where, ct, "mean"
  )
  _assert_close(got, ref, TOL[jnp.float64], f"soft cap {cap}")
  # The cap changes the loss: the same call without it differs.
  plain = lce(x, w_in, labels, where=where, chunk_size=6, z_loss=1e-3, transpose_w=transpose_w)
  assert rel_err(plain, got[0]) > 1e-3


# bfloat16 outputs: 2**-8 relative rounding, and the products' bfloat16 inputs.
@pytest.mark.parametrize(("dtype", "tol"), [(jnp.float32, TOL[jnp.float32]), (jnp.bfloat16, 2e-2)])
def test_soft_cap_and_transposed_w_in_narrow_dtypes_match_float64_truth(dtype, tol):
  x, w, labels, where, ct = _inputs((64,), 32, 300, dtype, seed=9, where_p=0.8)
  e = w.T * 4
  kw = dict(chunk_size=128, label_smoothing=0.1, transpose_w=True, logits_soft_cap=5.0)
  got = _value_and_grads(None, x, e, labels, where, ct, "mean", fused_kw=kw)
  assert got[0].dtype == got[1].dtype == got[2].dtype == dtype
  x64, e64 = x.astype(jnp.float64), e.astype(jnp.float64)  # the rounded inputs, exactly
  ref = _value_and_grads(
    lambda x, e, y: naive_per_token(x, e.T, y, 0.1, 0.0, 5.0), x64, e64, labels, where, ct, "mean"
  )
  _assert_close(got, ref, tol, f"{jnp.dtype(dtype).name} soft cap, transpose_w")


def test_where_broadcasts_over_leading_dims():
  x, w, labels, _, ct = _inputs((2, 3, 4), 8, 13, jnp.float64, seed=7)
  where = jnp.array([True, False, True, True])  # shape [4] broadcasts to [2, 3, 4]
  got = _value_and_grads(None, x, w, labels, where, ct, "mean", fused_kw=dict(chunk_size=5))
  ref = _value_and_grads(naive_per_token, x, w, labels, where, ct, "mean")
  _assert_close(got, ref, 1e-10, "broadcast where")
  assert jnp.all(got[1][:, :, 1] == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nothing_included_gives_zero_not_nan(reduction):
  x, w, labels, _, _ = _inputs((5,), 4, 9, jnp.float32)
  where = jnp.zeros((5,), bool)
  labels = labels.at[0].set(-100)  # excluded tokens may carry any label

  def f(x, w):
    return jnp.sum(lce(x, w, labels, where=where, reduction=reduction, chunk_size=4, z_loss=0.1))

  val, (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
  assert val == 0.0
  assert jnp.all(dx == 0) and jnp.all(dw == 0)


def test_excluded_tokens_get_exactly_zero_gradient_even_with_huge_inputs():
  x, w, labels, _, _ = _inputs((4,), 3, 7, jnp.float32, seed=8)
  x = x.at[1].set(jnp.array([1e30, -1e30, jnp.inf], jnp.float32))
  where = jnp.array([True, False, True, True])
  labels = labels.at[1].set(99)

  def f(x, w):
    return lce(x, w, labels, where=where, reduction="sum", chunk_size=3)

  val, (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
  assert jnp.isfinite(val) and jnp.all(jnp.isfinite(dw))
  assert jnp.all(dx[1] == 0) and jnp.all(jnp.isfinite(dx))


def test_out_of_range_labels_give_nan_for_that_token():
  x, w, labels, _, _ = _inputs((6,), 4, 9, jnp.float32, seed=9)
  bad = labels.at[1].set(9).at[4].set(-1)
  per_token = lce(x, w, bad, reduction="none", chunk_size=4)
  assert jnp.isnan(per_token[1]) and jnp.isnan(per_token[4])
  good = jnp.array([0, 2, 3, 5])
  ref = naive_per_token(x, w, labels)
  assert rel_err(per_token[good], ref[good]) <= 1e-5
  # Another class is never picked: the wrapped-around label (9 - V = 0) would give this.
  assert not jnp.isclose(per_token[1], naive_per_token(x, w, labels.at[1].set(0))[1])
  assert jnp.isnan(lce(x, w, bad, reduction="mean"))
  assert jnp.isnan(lce(x, w, bad, reduction="sum"))
  # The gradient row of a bad token is NaN too (as in the unfused cross-entropy);
  # the other rows of dx stay finite, dw sums over all tokens and is NaN.
  dx, dw = jax.jit(jax.grad(lambda x, w: lce(x, w, bad, reduction="sum", chunk_size=4), (0, 1)))(
    x, w
  )
  assert jnp.all(jnp.isnan(dx[jnp.array([1, 4])])) and jnp.all(jnp.isfinite(dx[good]))
  assert jnp.all(jnp.isnan(dw))
  # Masking the bad tokens out removes every NaN.
  where = (bad >= 0) & (bad < 9)
  val, (dx, dw) = jax.jit(jax.value_and_grad(lambda x, w: lce(x, w, bad, where=where), (0, 1)))(
    x, w
  )
  assert jnp.isfinite(val) and jnp.all(jnp.isfinite(dx)) and jnp.all(jnp.isfinite(dw))
  # So does masking their losses after the call (`reduction="none"`): their
  # cotangent is 0, and so is their gradient row, though their loss is NaN.
  keep = where.astype(jnp.float32)
  dx, dw = jax.grad(
    lambda x, w: jnp.sum(jnp.where(where, lce(x, w, bad, reduction="none", chunk_size=4), 0.0)),
    (0, 1),
  )(x, w)
  ref = jax.grad(lambda x, w: jnp.sum(keep * naive_per_token(x, w, labels)), (0, 1))(x, w)
  assert rel_err(dx, ref[0]) <= 1e-5 and rel_err(dw, ref[1]) <= 1e-5
  assert jnp.all(dx[jnp.array([1, 4])] == 0)


@pytest.mark.parametrize(
  ("label_dtype", "v", "chunk_size"),
  [
    (jnp.int8, 200, 64),
    (jnp.int8, 300, 300),
    (jnp.uint8, 300, 128),
    (jnp.int16, 40000, 8192),
    (jnp.int16, 1000, 256),
  ],
)
def test_narrow_label_dtypes(label_dtype, v, chunk_size):
  # Labels stored in a narrow integer type (uint8, int16 token ids) are class ids
  # like any other: V may not fit in their dtype (int8, V = 200) and a chunk's
  # columns may run past it (column 259 is not label 3). Every label here is valid.
  top = min(v, int(jnp.iinfo(label_dtype).max) + 1)
  x, w, _, _, _ = _inputs((12,), 8, v, jnp.float32, seed=5)
  labels = draws.randint(6, (12,), 0, top).at[0].set(3).at[1].set(top - 1)
  narrow = labels.astype(label_dtype)
  assert jnp.array_equal(narrow.astype(jnp.int32), labels)
  f = lambda x, w, y: lce(x, w, y, reduction="none", chunk_size=chunk_size)  # noqa: E731
  got = f(x, w, narrow)
  ref = optax_per_token(x, w, labels)
  assert jnp.all(jnp.isfinite(got))
  assert rel_err(got, ref) <= 1e-5
  ct = jnp.linspace(0.5, 1.5, 12)
  grads = jax.grad(lambda x, w: jnp.sum(ct * f(x, w, narrow)), (0, 1))(x, w)
  refs = jax.grad(lambda x, w: jnp.sum(ct * optax_per_token(x, w, labels)), (0, 1))(x, w)
  for a, e in zip(grads, refs, strict=True):
    assert rel_err(a, e) <= 1e-5
  # Out of range in the narrow dtype is still out of range: -1, and V where it fits.
  if jnp.issubdtype(label_dtype, jnp.signedinteger):
    out = f(x, w, narrow.at[2].set(-1))
    assert jnp.isnan(out[2]) and jnp.isfinite(out[3])
  if v <= jnp.iinfo(label_dtype).max:
    out = f(x, w, narrow.at[3].set(v))
    assert jnp.isnan(out[3]) and jnp.isfinite(out[2])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_dtypes_and_accuracy(dtype):
  x, w, labels, where, _ = _inputs((3, 8), 32, 70, dtype, seed=10, where_p=0.8)

  def f(x, w):
    return lce(x, w, labels, where=where, chunk_size=32, label_smoothing=0.1, z_loss=1e-3)

  val, (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
  assert val.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype

  # The truth in float64, on the same (exactly representable) low-precision inputs.
  def ref(x, w):
    return _reduce(naive_per_token(x, w, labels, 0.1, 1e-3), where, "mean")

  rval, (rdx, rdw) = jax.jit(jax.value_and_grad(ref, (0, 1)))(
    x.astype(jnp.float64), w.astype(jnp.float64)
  )
  tol = 4 * float(jnp.finfo(dtype).eps)  # dz is rounded to the input dtype before the matmuls
  _assert_close((val, dx, dw), (rval, rdx, rdw), tol, jnp.dtype(dtype).name)


def test_mixed_dtypes_return_grads_in_each_input_dtype():
  x, w, labels, _, _ = _inputs((5,), 4, 9, jnp.float32, seed=11)
  xb = x.astype(jnp.bfloat16)
  val, (dx, dw) = jax.jit(jax.value_and_grad(lambda x, w: lce(x, w, labels), (0, 1)))(xb, w)
  assert val.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32


def test_precision_is_passed_to_the_matmuls():
  x, w, labels, _, _ = _inputs((5,), 4, 9, jnp.float32, seed=12)
  f = jax.jit(lambda x, w: lce(x, w, labels, precision=jax.lax.Precision.HIGHEST))
  assert "HIGHEST" in f.lower(x, w).as_text().upper()
  assert rel_err(f(x, w), jnp.mean(naive_per_token(x, w, labels))) <= 1e-5


def test_jit_and_traced_labels_and_where():
  x, w, labels, where, _ = _inputs((6,), 5, 12, jnp.float64, seed=13, where_p=0.5)
  f = jax.jit(jax.value_and_grad(lambda x, w, y, m: lce(x, w, y, where=m, chunk_size=5), (0, 1)))
  got = f(x, w, labels, where)
  ref = jax.value_and_grad(
    lambda x, w: _reduce(naive_per_token(x, w, labels), where, "mean"), (0, 1)
  )(x, w)
  _assert_close((got[0], *got[1]), (ref[0], *ref[1]), 1e-10, "jit")


def test_only_per_token_statistics_are_saved():
  from jax._src.ad_checkpoint import saved_residuals

  n, h, v = 16, 8, 64
  x, w, labels, where, _ = _inputs((n,), h, v, jnp.float32, where_p=0.5)
  res = saved_residuals(lambda x, w: lce(x, w, labels, where=where, chunk_size=16), x, w)
  shapes = sorted(tuple(aval.shape) for aval, _ in res)
  # x and w themselves, labels, mask, and per token the shift and log-normaliser;
  # no [n, v] array.
  assert all(s in {(n, h), (h, v), (n,), ()} for s in shapes), shapes
  assert sum(s == (n,) for s in shapes) <= 4


# A slow draw on a shared, loaded box is not a failure.
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  batch=st.lists(st.integers(1, 4), min_size=0, max_size=2),
  h=st.integers(1, 9),
  v=st.integers(1, 30),
  chunk=st.integers(1, 32),
  reduction=st.sampled_from(REDUCTIONS),
  seed=st.integers(0, 2**16),
)
def test_random_shapes_against_naive(batch, h, v, chunk, reduction, seed):
  x, w, labels, where, ct = _inputs(tuple(batch), h, v, jnp.float64, seed=seed, where_p=0.7)
  kw = dict(chunk_size=chunk, label_smoothing=0.1, z_loss=1e-2)
  got = _value_and_grads(None, x, w, labels, where, ct, reduction, fused_kw=kw)
  ref = _value_and_grads(
    lambda x, w, y: naive_per_token(x, w, y, 0.1, 1e-2), x, w, labels, where, ct, reduction
  )
  for a, e in zip(got, ref, strict=True):
    np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12)


def test_input_errors():
  x = jnp.ones((4, 3), jnp.float32)
  w = jnp.ones((3, 7), jnp.float32)
  y = jnp.zeros((4,), jnp.int32)
  with pytest.raises(ValueError, match=r"x.shape\[-1\] == w.shape\[0\].*3 != 5"):
    lce(x, jnp.ones((5, 7)), y)
  with pytest.raises(ValueError, match=r"`w` must have shape \[H, V\]"):
    lce(x, jnp.ones((3,)), y)
  with pytest.raises(TypeError, match=r"`labels` must hold integer class ids.*float32"):
    lce(x, w, y.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"`labels` has shape \(5,\); expected x.shape\[:-1\]"):
    lce(x, w, jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match=r"`reduction` must be one of .*'avg'"):
    lce(x, w, y, reduction="avg")
  with pytest.raises(ValueError, match=r"`chunk_size` must be a positive int"):
    lce(x, w, y, chunk_size=0)
  with pytest.raises(TypeError, match=r"`chunk_size` must be a positive int"):
    lce(x, w, y, chunk_size=2.5)
  with pytest.raises(ValueError, match=r"`label_smoothing`=1.5 is out of range.*\[0.0, 1.0\]"):
    lce(x, w, y, label_smoothing=1.5)
  with pytest.raises(ValueError, match=r"`z_loss`=-1.0 is out of range"):
    lce(x, w, y, z_loss=-1.0)
  with pytest.raises(ValueError, match=r"`z_loss`=nan is out of range"):
    lce(x, w, y, z_loss=float("nan"))
  # A string is not a float, though float() would parse it (as the unfused losses refuse it).
  with pytest.raises(TypeError, match=r"`label_smoothing` must be a Python float.*'0.1'"):
    lce(x, w, y, label_smoothing="0.1")
  with pytest.raises(TypeError, match=r"`where` must be a boolean array"):
    lce(x, w, y, where=jnp.ones((4,), jnp.int32))
  with pytest.raises(ValueError, match=r"`where` with shape \(3,\) does not broadcast.*batch"):
    lce(x, w, y, where=jnp.ones((3,), bool))
  with pytest.raises(TypeError, match=r"`x` has complex dtype"):
    lce(x.astype(jnp.complex64), w, y)
  # transpose_w: w is [V, H].
  with pytest.raises(ValueError, match=r"x.shape\[-1\] == w.shape\[1\].*\[V, H\].*3 != 7"):
    lce(x, w, y, transpose_w=True)
  with pytest.raises(ValueError, match=r"`w` must have shape \[V, H\]"):
    lce(x, jnp.ones((3,)), y, transpose_w=True)
  with pytest.raises(TypeError, match=r"`transpose_w` must be a Python bool, got 'yes'"):
    lce(x, w, y, transpose_w="yes")
  for cap in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match=r"`logits_soft_cap`=.* expected None or a positive"):
      lce(x, w, y, logits_soft_cap=cap)
  with pytest.raises(TypeError, match=r"`logits_soft_cap` must be a Python float.*'30'"):
    lce(x, w, y, logits_soft_cap="30")
  # Bools are not numbers here (label_smoothing=True would be a uniform target).
  for name in ("label_smoothing", "z_loss", "logits_soft_cap"):
    with pytest.raises(TypeError, match=rf"`{name}` must be a Python float.*True"):
      lce(x, w, y, **{name: True})
  with pytest.raises(TypeError, match=r"`chunk_size` must be a positive int or None, got True"):
    lce(x, w, y, chunk_size=True)
  with pytest.raises(ValueError, match=r"linear_softmax_cross_entropy: `precision`='foo'"):
    lce(x, w, y, precision="foo")


def _compiled_temp_bytes_and_hlo(f, *args):
  compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()


def test_memory_no_logits_array_and_at_most_ten_percent_of_unfused():
  # Compile only: the programs are never run.
  n, h, v = 4096, 256, 32768
  x = jax.ShapeDtypeStruct((n, h), jnp.float32)
  w = jax.ShapeDtypeStruct((h, v), jnp.float32)
  y = jax.ShapeDtypeStruct((n,), jnp.int32)

  def unfused(x, w, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, y))

  fused_temp, fused_hlo = _compiled_temp_bytes_and_hlo(lce, x, w, y)
  unfused_temp, unfused_hlo = _compiled_temp_bytes_and_hlo(unfused, x, w, y)
  logits = f"[{n},{v}]"
  assert logits in unfused_hlo  # the check below can see a logits array when there is one
  assert logits not in fused_hlo and f"[{v},{n}]" not in fused_hlo
  assert unfused_temp >= n * v * 4
  assert fused_temp <= 0.10 * unfused_temp, (fused_temp, unfused_temp)
  # A tied [V, H] table with transpose_w=True: the same program size, and no
  # copy of w.T (x @ e.T passed as w made one, 4.6x the temporaries, at N=2048).
  e = jax.ShapeDtypeStruct((v, h), jnp.float32)
  tied_temp, tied_hlo = _compiled_temp_bytes_and_hlo(partial(lce, transpose_w=True), x, e, y)
  assert logits not in tied_hlo and f"[{v},{n}]" not in tied_hlo
  assert tied_temp <= 1.05 * fused_temp + 2**20, (tied_temp, fused_temp)
