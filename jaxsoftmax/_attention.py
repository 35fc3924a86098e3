"""Scaled dot-product attention whose softmax is jaxsoftmax's, for Flax and plain JAX.

The attention weights go through :func:`jaxsoftmax.softmax` with the mask as
``where``; no large negative number is ever written into the scores. So a
query row whose keys are all masked gives a zero output and zero gradients,
where the usual ``-1e30`` trick gives a uniform average over the padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._checks import check_precision, check_where, compute_dtype
from ._softmax import softmax

_FN = "dot_product_attention"


def _check_qkv(query: jax.Array, key: jax.Array, value: jax.Array) -> None:
  shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
  if not query.ndim == key.ndim == value.ndim or query.ndim < 3:
    raise ValueError(
      f"{_FN}: query, key and value must have the same rank, at least 3 "
      f"([batch..., length, heads, depth]); got {shapes}."
    )
  if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
    raise ValueError(f"{_FN}: the batch dimensions of query, key and value differ: {shapes}.")
  if key.shape[-3:-1] != value.shape[-3:-1]:
    raise ValueError(
      f"{_FN}: key and value must have the same length and heads "
      f"([..., kv_len, heads, depth]); got {shapes}."
    )
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"{_FN}: query and key must have the same depth (last axis); got {shapes}.")
  if query.shape[-2] % key.shape[-2]:
    raise ValueError(
      f"{_FN}: the query heads ({query.shape[-2]}) must be a multiple of the key/value "
      f"heads ({key.shape[-2]}); got {shapes}."
    )


def _float_array(name: str, x: ArrayLike) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{_FN}: `{name}` must be a real floating array, got dtype {x.dtype}.")
  return x


def _sow(module, weights: jax.Array) -> None:
  """Stores the weights where Flax's own attention stores them."""
  from flax import nnx  # only reachable when Flax handed us a module

  if isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, "attention_weights", weights)
  else:
    module.sow("intermediates", "attention_weights", weights)


def dot_product_attention(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  dtype=None,
  precision=None,
  broadcast_dropout: bool = True,
  dropout_rng: jax.Array | None = None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  module=None,
  **kwargs,
) -> jax.Array:
  r"""Scaled dot-product attention with jaxsoftmax's masked softmax.

  .. math::
    \mathrm{out} = \mathrm{softmax}\big(\mathrm{scale}\cdot q k^\top + \mathrm{bias},
    \ \mathrm{where}=\mathrm{mask}\big)\, v

  Shapes follow :func:`jax.nn.dot_product_attention` and Flax. It can be passed
  as the ``attention_fn`` of ``flax.nnx.MultiHeadAttention`` and of
  ``flax.linen.MultiHeadDotProductAttention``: it takes the keywords they pass
  and applies attention dropout exactly as Flax does (same random bits for the
  same ``dropout_rng``), and sows the weights when given a ``module``.

  Differences from Flax's default attention, on purpose:

  * the mask goes to :func:`jaxsoftmax.softmax` as ``where``; no ``-1e30`` is
    added to the scores. A query row whose keys are all masked gives an output
    of exactly 0 and zero gradients (Flax and :mod:`jax.nn` give the mean of
    the values over the masked keys);
  * the scores, the softmax and the weighted sum are computed in float32 for
    16-bit inputs (in the inputs' own precision for float32/float64), then the
    output is cast to ``dtype``.

  Args:
    query: ``[batch..., q_len, heads, depth]``.
    key: ``[batch..., kv_len, kv_heads, depth]``; ``heads`` must be a multiple
      of ``kv_heads`` (grouped-query attention).
    value: ``[batch..., kv_len, kv_heads, v_depth]``.
    bias: optional, broadcastable to ``[batch..., heads, q_len, kv_len]``;
      added to the scaled scores. -inf entries act as a mask.
    mask: optional, broadcastable to ``[batch..., heads, q_len, kv_len]``; a key
      is attended where the mask is True (or non-zero, as Flax's float masks).
    scale: the factor on ``q k^T``; default ``1 / sqrt(depth)``.
    is_causal: if True, query ``i`` attends keys ``j <= i`` only (combined with
      ``mask``).
    dtype: the output dtype; default: the promoted dtype of query, key, value.
    precision: :class:`jax.lax.Precision` for both contractions.
    broadcast_dropout: as in Flax: one dropout pattern shared by the batch and
      head dimensions.
    dropout_rng: a PRNG key; required when dropout is active.
    dropout_rate: probability of dropping an attention weight.
    deterministic: if True, no dropout.
    module: a Flax module (linen or nnx) to sow the weights into, as Flax's
      ``sow_weights=True`` does; None sows nothing.
    **kwargs: keywords that other attention functions take: ``promote_dtype``
      (Flax nnx; called on ``(query, key, value)``), ``force_fp32_for_softmax``
      (Flax linen; always so here), ``query_seq_lengths`` and
      ``key_value_seq_lengths`` (:mod:`jax.nn`; ``[batch]`` integer arrays that
      mask positions at or past the length). Anything else raises ``TypeError``.

  Returns:
    ``[batch..., q_len, heads, v_depth]`` in ``dtype``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxsoftmax
    >>> q = k = v = jnp.ones((1, 2, 1, 4))  # [batch, len, heads, depth]
    >>> mask = jnp.array([[True, True], [False, False]])  # row 1 sees nothing
    >>> jaxsoftmax.dot_product_attention(q, k, v, mask=mask)[0, :, 0, 0]
    Array([1., 0.], dtype=float32)
  """
  promote = kwargs.pop("promote_dtype", None)
  kwargs.pop("force_fp32_for_softmax", None)
  q_lengths = kwargs.pop("query_seq_lengths", None)
  kv_lengths = kwargs.pop("key_value_seq_lengths", None)
  if kwargs:
    raise TypeError(f"{_FN}: unexpected keyword argument(s) {sorted(kwargs)}.")

  query, key, value = (
    _float_array(n, a) for n, a in zip("query key value".split(), (query, key, value), strict=True)
  )
  if promote is not None:
    query, key, value = promote((query, key, value), dtype=dtype)
  out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query, key, value)
  if not jnp.issubdtype(out_dtype, jnp.floating):
    raise TypeError(f"{_FN}: `dtype` must be a floating dtype, got {out_dtype}.")
  _check_qkv(query, key, value)
  precision = check_precision(_FN, precision)
  cdt = compute_dtype(jnp.result_type(query, key, value))
  if dropout_rate and not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"{_FN}: `dropout_rate` must lie in [0, 1), got {dropout_rate}.")
  dropout = not deterministic and dropout_rate > 0.0
  if dropout and dropout_rng is None:
    raise ValueError(f"{_FN}: dropout_rate={dropout_rate} needs a `dropout_rng` key.")

  *batch, q_len, heads, depth = query.shape
  kv_len, kv_heads = key.shape[-3], key.shape[-2]
  groups = heads // kv_heads
  scores_shape = (*batch, heads, q_len, kv_len)
  scale = 1.0 / math.sqrt(depth) if scale is None else scale

  # Scores in [batch..., kv_heads, groups, q_len, kv_len]: grouped heads share
  # their key without copying it; groups == 1 is ordinary multi-head attention.
  qg = query.reshape(*batch, q_len, kv_heads, groups, depth).astype(cdt)
  scores = jnp.einsum("...qhgd,...khd->...hgqk", qg, key.astype(cdt), precision=precision)
  scores = scores.reshape(scores_shape) * jnp.asarray(scale, cdt)
  if bias is not None:
    bias = _float_array("bias", bias)
    try:
      fits = jnp.broadcast_shapes(bias.shape, scores_shape) == scores_shape
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(
        f"{_FN}: `bias` with shape {bias.shape} does not broadcast to the scores' shape "
        f"[batch..., heads, q_len, kv_len] = {scores_shape}."
      )
    # At the scores' rank first: jax_numpy_rank_promotion="raise" refuses an
    # implicit broadcast across ranks.
    bias = bias.reshape((1,) * (len(scores_shape) - bias.ndim) + bias.shape)
    scores = scores + bias.astype(cdt)

  where = _combined_mask(mask, is_causal, q_lengths, kv_lengths, scores_shape)
  weights = softmax(scores, axis=-1, where=where)
  if module is not None:
    _sow(module, weights.astype(out_dtype))
  if dropout:
    # Flax's rule, bit for bit: the same Bernoulli draw, shape and rescaling.
    keep_prob = 1.0 - dropout_rate
    shape = (1,) * (query.ndim - 2) + scores_shape[-2:] if broadcast_dropout else scores_shape
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (keep.astype(cdt) / jnp.asarray(keep_prob, cdt))

  wg = weights.reshape(*batch, kv_heads, groups, q_len, kv_len)
  out = jnp.einsum("...hgqk,...khd->...qhgd", wg, value.astype(cdt), precision=precision)
  return out.reshape(*batch, q_len, heads, value.shape[-1]).astype(out_dtype)


def _combined_mask(mask, is_causal, q_lengths, kv_lengths, shape) -> jax.Array | None:
  """One boolean mask broadcastable to ``shape``, or None if nothing is masked."""
  parts = []
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      mask = mask != 0  # Flax's make_attention_mask returns float32 0/1.
    parts.append(check_where(_FN, mask, shape, name="mask", target="the scores' shape"))
  q_len, kv_len = shape[-2:]
  if is_causal:
    causal = jnp.tril(jnp.ones((q_len, kv_len), jnp.bool_))
    parts.append(causal.reshape((1,) * (len(shape) - 2) + causal.shape))
  for name, lengths, n, expand in (
    ("query_seq_lengths", q_lengths, q_len, lambda m: m[:, None, :, None]),
    ("key_value_seq_lengths", kv_lengths, kv_len, lambda m: m[:, None, None, :]),
  ):
    if lengths is None:
      continue
    lengths = jnp.asarray(lengths)
    if (
      len(shape) != 4
      or lengths.shape != (shape[0],)
      or not jnp.issubdtype(lengths.dtype, jnp.integer)
    ):
      raise ValueError(
        f"{_FN}: `{name}` must be an integer array of shape [batch] = ({shape[0]},) with a "
        f"single batch axis; got shape {lengths.shape}, dtype {lengths.dtype}."
      )
    parts.append(expand(lax.broadcasted_iota(lengths.dtype, (1, n), 1) < lengths[:, None]))
  if not parts:
    return None
  combined = parts[0]
  for p in parts[1:]:
    combined = jnp.logical_and(combined, p)
  return combined
