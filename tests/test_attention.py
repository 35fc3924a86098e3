"""dot_product_attention: against Flax's and jax.nn's attention, inside both Flax modules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxsoftmax

F64 = jnp.float64
F32 = jnp.float32


def _normal(seed, shape, dtype):
  # NumPy draws: eager jax.random would compile a kernel per shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _qkv(seed, batch=2, q_len=5, kv_len=6, heads=3, depth=4, kv_heads=None, dtype=F64):
  kv_heads = heads if kv_heads is None else kv_heads
  q = _normal(seed, (batch, q_len, heads, depth), dtype)
  k = _normal(seed + 100, (batch, kv_len, kv_heads, depth), dtype)
  v = _normal(seed + 200, (batch, kv_len, kv_heads, depth), dtype)
  return q, k, v


def _partial_mask(seed, shape):
  """Random mask in which every query row keeps at least one key."""
  m = np.random.default_rng(seed).random(shape) < 0.6
  m[..., seed % shape[-1]] = True
  return jnp.asarray(m)


def _call(f, *args, **kw):
  """``f(*args, **kw)`` under jit: one compilation instead of one per eager op."""
  arrays = {k: a for k, a in kw.items() if isinstance(a, jax.Array | np.ndarray)}
  static = {k: a for k, a in kw.items() if k not in arrays}
  return jax.jit(lambda args, arrays: f(*args, **arrays, **static))(args, arrays)


def _loss(attn, w, **kw):
  """A scalar with a random cotangent, so every output entry matters."""
  return lambda q, k, v: jnp.sum(attn(q, k, v, **kw) * w)


def _grads(attn, q, k, v, w, **kw):
  return jax.jit(jax.grad(_loss(attn, w, **kw), argnums=(0, 1, 2)))(q, k, v)


def _naive(q, k, v, bias=None, mask=None, scale=None):
  """Attention written out in float64, with -inf at masked scores (no fully masked rows)."""
  groups = q.shape[-2] // k.shape[-2]
  k, v = jnp.repeat(k, groups, axis=-2), jnp.repeat(v, groups, axis=-2)
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  s = s if bias is None else s + bias
  s = s if mask is None else jnp.where(mask, s, -jnp.inf)
  e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return jnp.einsum("bhqk,bkhd->bqhd", e / jnp.sum(e, axis=-1, keepdims=True), v)


def _assert_same(ours, theirs, rtol, atol):
  for a, b in zip(ours, theirs, strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# Flax nnx's default attention is jax.nn.dot_product_attention, which computes
# the scores and softmax in float32 whatever the input: compare it in float32.
# Flax linen's computes in the input dtype: compare it, and the naive
# definition, in float64.
@pytest.mark.parametrize(
  "reference,dtype,rtol,atol",
  [
    (nnx.dot_product_attention, F32, 1e-5, 1e-6),
    (nn.dot_product_attention, F64, 1e-10, 1e-12),
    (_naive, F64, 1e-10, 1e-12),
  ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_flax_default_attention(reference, dtype, rtol, atol, masked):
  q, k, v = _qkv(0, dtype=dtype)
  w = _normal(9, q.shape, dtype)
  kw = {"mask": _partial_mask(1, (2, 3, 5, 6))} if masked else {}
  out = _call(jaxsoftmax.dot_product_attention, q, k, v, **kw)
  assert out.dtype == dtype
  _assert_same([out], [_call(reference, q, k, v, **kw)], rtol, atol)
  ours = _grads(jaxsoftmax.dot_product_attention, q, k, v, w, **kw)
  _assert_same(ours, _grads(reference, q, k, v, w, **kw), rtol, atol)


def test_bias_and_scale_match_naive_and_jax_nn():
  q, k, v = _qkv(4)
  bias = _normal(5, (1, 3, 5, 6), F64)
  w = _normal(6, q.shape, F64)
  kw = {"bias": bias, "scale": 0.3}
  out = _call(jaxsoftmax.dot_product_attention, q, k, v, **kw)
  np.testing.assert_allclose(out, _call(_naive, q, k, v, **kw), rtol=1e-12)
  ref = _call(jax.nn.dot_product_attention, q, k, v, **kw)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  ours = _grads(jaxsoftmax.dot_product_attention, q, k, v, w, **kw)
  _assert_same(ours, _grads(_naive, q, k, v, w, **kw), 1e-10, 1e-12)
  # The gradient reaching the bias is the softmax VJP: compare it too.
  gb = jax.jit(jax.grad(lambda b: jnp.sum(jaxsoftmax.dot_product_attention(q, k, v, bias=b) * w)))(
    bias
  )
  gb_ref = jax.jit(jax.grad(lambda b: jnp.sum(_naive(q, k, v, bias=b) * w)))(bias)
  np.testing.assert_allclose(gb, gb_ref, rtol=1e-10, atol=1e-12)


def test_fully_masked_rows_give_zero_output_and_finite_gradients():
  q, k, v = _qkv(7)
  w = _normal(8, q.shape, F64)
  mask = _partial_mask(2, (2, 3, 5, 6))
  dead = (0, 1, 3)  # batch 0, head 1, query 3 sees no key
  mask = mask.at[dead].set(False)
  out = _call(jaxsoftmax.dot_product_attention, q, k, v, mask=mask)
  np.testing.assert_array_equal(out[0, 3, 1], np.zeros(4))
  # Flax's -1e30 trick gives the mean of the values over the masked keys there.
  flax_row = _call(nn.dot_product_attention, q, k, v, mask=mask)[0, 3, 1]
  np.testing.assert_allclose(flax_row, v[0, :, 1].mean(0), rtol=1e-12)

  dq, dk, dv = _grads(jaxsoftmax.dot_product_attention, q, k, v, w, mask=mask)
  for g in (dq, dk, dv):
    assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(dq[0, 3, 1], np.zeros(4))
  # Independent reference: the dead row's output is constant 0, so the
  # gradients equal Flax's with that row's cotangent set to 0.
  ref = _grads(nn.dot_product_attention, q, k, v, w.at[0, 3, 1].set(0.0), mask=mask)
  for a, b in zip((dq, dk, dv), ref, strict=True):
    b = b.at[0, 3, 1].set(0.0) if b.shape == dq.shape else b
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_everything_masked_is_zero_with_zero_gradients():
  q, k, v = _qkv(10)
  mask = jnp.zeros((1, 1, 5, 6), jnp.bool_)
  w = jnp.ones(q.shape, F64)
  np.testing.assert_array_equal(_call(jaxsoftmax.dot_product_attention, q, k, v, mask=mask), 0.0)
  for g in _grads(jaxsoftmax.dot_product_attention, q, k, v, w, mask=mask):
    np.testing.assert_array_equal(g, 0.0)


def test_minus_inf_bias_row_is_zero_not_nan():
  q, k, v = _qkv(11)
  bias = jnp.zeros((2, 3, 5, 6), F64).at[1, 0, 2].set(-jnp.inf)
  out = _call(jaxsoftmax.dot_product_attention, q, k, v, bias=bias)
  np.testing.assert_array_equal(out[1, 2, 0], 0.0)
  assert np.all(np.isfinite(out))
  assert np.isnan(_call(jax.nn.dot_product_attention, q, k, v, bias=bias)[1, 2, 0]).all()


@pytest.mark.parametrize("q_len,kv_len", [(5, 5), (4, 6)])
def test_causal_equals_lower_triangular_mask(q_len, kv_len):
  q, k, v = _qkv(12, q_len=q_len, kv_len=kv_len)
  w = _normal(13, q.shape, F64)
  tril = jnp.tril(jnp.ones((q_len, kv_len), jnp.bool_))
  causal = _call(jaxsoftmax.dot_product_attention, q, k, v, is_causal=True)
  explicit = _call(jaxsoftmax.dot_product_attention, q, k, v, mask=tril)
  np.testing.assert_array_equal(causal, explicit)
  np.testing.assert_allclose(
    causal, _call(jax.nn.dot_product_attention, q, k, v, is_causal=True), rtol=1e-5, atol=1e-6
  )
  g1 = _grads(jaxsoftmax.dot_product_attention, q, k, v, w, is_causal=True)
  g2 = _grads(jaxsoftmax.dot_product_attention, q, k, v, w, mask=tril)
  for a, b in zip(g1, g2, strict=True):
    np.testing.assert_array_equal(a, b)


def test_causal_combines_with_mask():
  q, k, v = _qkv(14, q_len=5, kv_len=5)
  mask = _partial_mask(0, (2, 3, 5, 5))  # keeps key 0, which causal keeps too
  tril = jnp.tril(jnp.ones((5, 5), jnp.bool_))
  np.testing.assert_array_equal(
    _call(jaxsoftmax.dot_product_attention, q, k, v, mask=mask, is_causal=True),
    _call(jaxsoftmax.dot_product_attention, q, k, v, mask=mask & tril),
  )


@pytest.mark.parametrize(
  "kw",
  [
    dict(mask=_partial_mask(5, (2, 1, 5, 5)), is_causal=True),  # a mask of full rank + causal
    dict(bias=_normal(18, (5, 5), F64)),  # a bias of lower rank than the scores
    dict(bias=_normal(19, (3, 5, 5), F64), is_causal=True),
  ],
  ids=["mask+causal", "bias [T, S]", "bias [H, T, S]+causal"],
)
def test_broadcasts_without_rank_promotion(kw):
  # jax_numpy_rank_promotion="raise" refuses implicit broadcasts across ranks;
  # jax.nn's attention accepts these calls under it, and so must ours.
  q, k, v = _qkv(20, q_len=5, kv_len=5)
  with jax.numpy_rank_promotion("raise"):
    out = _call(jaxsoftmax.dot_product_attention, q, k, v, **kw)
    ref = _call(jax.nn.dot_product_attention, q, k, v, **kw)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_grouped_query_attention_matches_jax_nn():
  q, k, v = _qkv(15, heads=4, kv_heads=2)
  mask = _partial_mask(4, (2, 4, 5, 6))
  w = _normal(16, q.shape, F64)
  out = _call(jaxsoftmax.dot_product_attention, q, k, v, mask=mask)
  np.testing.assert_allclose(out, _call(_naive, q, k, v, mask=mask), rtol=1e-12)
  ref = _call(jax.nn.dot_product_attention, q, k, v, mask=mask)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  ours = _grads(jaxsoftmax.dot_product_attention, q, k, v, w, mask=mask)
  _assert_same(ours, _grads(_naive, q, k, v, w, mask=mask), 1e-10, 1e-12)


def test_seq_lengths_match_jax_nn():
  q, k, v = _qkv(17, q_len=6, kv_len=6)
  kw = {
    "query_seq_lengths": jnp.array([6, 4], jnp.int32),
    "key_value_seq_lengths": jnp.array([3, 6], jnp.int32),
  }
  out = _call(jaxsoftmax.dot_product_attention, q, k, v, **kw)
  ref = _call(jax.nn.dot_product_attention, q, k, v, **kw)
  # jax.nn leaves the padded query rows' values unspecified; compare the real rows.
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[1, :4], ref[1, :4], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[1, 4:], 0.0)


def test_dropout_is_flax_dropout_bit_for_bit():
  q, k, v = _qkv(18, dtype=F32)
  rng = jax.random.key(19)
  for broadcast in (True, False):
    kw = {"dropout_rng": rng, "dropout_rate": 0.4, "broadcast_dropout": broadcast}
    out = _call(jaxsoftmax.dot_product_attention, q, k, v, **kw)
    np.testing.assert_allclose(
      out, _call(nnx.dot_product_attention, q, k, v, **kw), rtol=2e-6, atol=1e-6
    )
    # deterministic=True switches it off.
    off = _call(jaxsoftmax.dot_product_attention, q, k, v, deterministic=True, **kw)
    np.testing.assert_array_equal(off, _call(jaxsoftmax.dot_product_attention, q, k, v))
  assert not np.allclose(out, _call(jaxsoftmax.dot_product_attention, q, k, v))


def test_inside_nnx_multihead_attention():
  x = _normal(20, (2, 7, 12), F32)
  valid = jnp.array([[1] * 7, [1] * 4 + [0] * 3], F32)
  mask = nnx.make_attention_mask(valid, valid)  # float32 0/1, as Flax builds it

  def make(attention_fn, **kw):
    return nnx.MultiHeadAttention(
      num_heads=3,
      in_features=12,
      decode=False,
      rngs=nnx.Rngs(0, dropout=1),
      attention_fn=attention_fn,
      **kw,
    )

  ours, ref = make(jaxsoftmax.dot_product_attention), make(nnx.dot_product_attention)

  # The padded queries of row 1 see no key: Flax averages the values there, we
  # give 0. Compare the real positions, and train on them only.
  real = valid[:, :, None] > 0

  # Everything under nnx.jit: eager Flax would compile every op on its own.
  @nnx.jit(static_argnames="deterministic")
  def run(model, x, deterministic=None):
    return model(x, mask=mask, deterministic=deterministic)

  @nnx.jit
  @nnx.grad
  def grad(model, x):
    return jnp.sum(jnp.where(real, model(x, mask=mask), 0.0) ** 2)

  @nnx.jit
  def sown(model, x):
    return nnx.capture(model, nnx.Intermediate)(x, mask=mask, sow_weights=True)[1]

  out = run(ours, x)
  np.testing.assert_allclose(
    jnp.where(real, out, 0.0), jnp.where(real, run(ref, x), 0.0), rtol=1e-5, atol=1e-6
  )
  # A dead query's attention output is 0, so the layer returns its output bias.
  np.testing.assert_allclose(out[1, 4:], jnp.broadcast_to(ours.out.bias[...], (3, 12)))
  g_ours, g_ref = grad(ours, x), grad(ref, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_ours, g_ref)

  # Dropout on: the same rng stream gives the same dropped weights as Flax.
  ours, ref = (
    make(f, dropout_rate=0.3) for f in (jaxsoftmax.dot_product_attention, nnx.dot_product_attention)
  )
  a, b = run(ours, x, deterministic=False), run(ref, x, deterministic=False)
  np.testing.assert_allclose(jnp.where(real, a, 0.0), jnp.where(real, b, 0.0), rtol=1e-5, atol=1e-6)
  assert not np.allclose(a, run(ours, x, deterministic=True), atol=1e-3)

  # sow_weights=True stores the weights where Flax does.
  ours, ref = make(jaxsoftmax.dot_product_attention), make(nnx.dot_product_attention)
  st_ours, st_ref = sown(ours, x), sown(ref, x)
  w_ours = st_ours["attention_weights"].get_value()[0]
  w_ref = st_ref["attention_weights"].get_value()[0]
  np.testing.assert_allclose(w_ours[0], w_ref[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(w_ours[1, :, :4], w_ref[1, :, :4], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(w_ours[1, :, 4:], 0.0)


def test_inside_linen_multihead_attention():
  x = _normal(21, (2, 7, 12), F32)
  mask = nn.make_causal_mask(jnp.ones((2, 7)))

  def make(attention_fn, **kw):
    return nn.MultiHeadDotProductAttention(num_heads=3, attention_fn=attention_fn, **kw)

  ref = make(nn.dot_product_attention)
  params = jax.jit(lambda key: ref.init(key, x, mask=mask))(jax.random.key(0))
  ours = make(jaxsoftmax.dot_product_attention)

  def run(module, **kw):
    return jax.jit(lambda p, r: module.apply(p, x, mask=mask, rngs=r, **kw))

  def grad(module):
    return jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x, mask=mask) ** 2)))(params)

  np.testing.assert_allclose(run(ours)(params, {}), run(ref)(params, {}), rtol=1e-5, atol=1e-6)
  g_ours, g_ref = grad(ours), grad(ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_ours, g_ref)

  # Dropout: linen passes dropout_rng, dropout_rate and deterministic by name.
  drop = {"dropout_rate": 0.3, "deterministic": False}
  rngs = {"dropout": jax.random.key(3)}
  a = run(make(jaxsoftmax.dot_product_attention, **drop))(params, rngs)
  b = run(make(nn.dot_product_attention, **drop))(params, rngs)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(a, run(ours)(params, {}), atol=1e-3)

  # sow_weights=True.
  sow = {"sow_weights": True, "mutable": ["intermediates"]}
  _, st_ours = run(ours, **sow)(params, {})
  _, st_ref = run(ref, **sow)(params, {})
  np.testing.assert_allclose(
    st_ours["intermediates"]["attention_weights"][0],
    st_ref["intermediates"]["attention_weights"][0],
    rtol=1e-5,
    atol=1e-7,
  )


def test_bfloat16_computes_in_float32_and_returns_bfloat16():
  q, k, v = _qkv(22, dtype=jnp.bfloat16)
  out = _call(jaxsoftmax.dot_product_attention, q, k, v)
  assert out.dtype == jnp.bfloat16
  ref = _call(_naive, *(a.astype(F64) for a in (q, k, v)))
  np.testing.assert_allclose(out.astype(F64), ref, rtol=1e-2, atol=1e-2)
  assert _call(jaxsoftmax.dot_product_attention, q, k, v, dtype=F32).dtype == F32


def test_second_order_gradients():
  q, k, v = _qkv(23, batch=1, q_len=3, kv_len=4, heads=2, depth=2)
  mask = _partial_mask(5, (1, 2, 3, 4))
  check_grads(
    jax.jit(lambda q, k, v: jaxsoftmax.dot_product_attention(q, k, v, mask=mask)),
    (q, k, v),
    order=2,
    modes=["rev"],
  )


def test_errors_name_the_argument():
  q, k, v = _qkv(24)
  with pytest.raises(ValueError, match="same depth"):
    jaxsoftmax.dot_product_attention(q, k[..., :3], v)
  with pytest.raises(ValueError, match="same rank"):
    jaxsoftmax.dot_product_attention(q[0], k, v)
  with pytest.raises(ValueError, match=r"`mask` with shape \(4, 6\).*the scores' shape"):
    jaxsoftmax.dot_product_attention(q, k, v, mask=jnp.ones((4, 6), jnp.bool_))
  with pytest.raises(ValueError, match="`bias` with shape"):
    jaxsoftmax.dot_product_attention(q, k, v, bias=jnp.ones((7,), F64))
  with pytest.raises(ValueError, match="`bias` with shape"):
    jaxsoftmax.dot_product_attention(q, k, v, bias=jnp.ones((4, 2, 3, 5, 6), F64))
  with pytest.raises(ValueError, match="dropout_rng"):
    jaxsoftmax.dot_product_attention(q, k, v, dropout_rate=0.1)
  with pytest.raises(ValueError, match="multiple of the key/value"):
    jaxsoftmax.dot_product_attention(q, k[..., :2, :], v[..., :2, :])
  with pytest.raises(TypeError, match="unexpected keyword"):
    jaxsoftmax.dot_product_attention(q, k, v, local_window_size=3)
  with pytest.raises(TypeError, match="`query` must be a real floating"):
    jaxsoftmax.dot_product_attention(q.astype(jnp.int32), k, v)
  with pytest.raises(ValueError, match="dot_product_attention: `precision`='foo'"):
    jaxsoftmax.dot_product_attention(q, k, v, precision="foo")
