"""jax.export with symbolic sizes (shape polymorphism), as a served model uses it.

The ops' size rules (XLA:CPU fusion thresholds, long-row pieces, label index
dtypes, the fused loss's chunk size, the backend choice) compare sizes in
Python; with a symbolic size they must take a branch that is right for any size.
Each exported function is called at two sizes and checked against jax.nn or
optax on those concrete arrays.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export

import jaxsoftmax

import draws
from references import rel_err

TOL = 1e-12  # float64 (tests/conftest.py enables x64)


def _grad_of_first_column(op):
  return jax.grad(lambda x: jnp.sum(op(x)[..., 0] * jnp.arange(x.shape[0])))


CASES = {
  "softmax": (jaxsoftmax.softmax, jax.nn.softmax),
  "log_softmax": (jaxsoftmax.log_softmax, jax.nn.log_softmax),
  "softmax grad": (
    _grad_of_first_column(jaxsoftmax.softmax),
    _grad_of_first_column(jax.nn.softmax),
  ),
  "log_softmax grad": (
    _grad_of_first_column(jaxsoftmax.log_softmax),
    _grad_of_first_column(jax.nn.log_softmax),
  ),
  "soft cross-entropy grad": (
    jax.grad(lambda x: jnp.sum(jaxsoftmax.softmax_cross_entropy(x, jax.nn.softmax(2 * x)))),
    jax.grad(lambda x: jnp.sum(optax.softmax_cross_entropy(x, jax.nn.softmax(2 * x)))),
  ),
  "integer cross-entropy grad": (
    jax.grad(
      lambda x: jnp.sum(
        jaxsoftmax.softmax_cross_entropy_with_integer_labels(x, jnp.arange(x.shape[0]) % 3)
      )
    ),
    jax.grad(
      lambda x: jnp.sum(
        optax.softmax_cross_entropy_with_integer_labels(x, jnp.arange(x.shape[0]) % 3)
      )
    ),
  ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("spec", ["b, 70000", "5, n", "b, n"])
def test_symbolic_sizes(name, spec):
  # 70000 columns: rows the CPU sums in pieces when the size is known.
  ours, ref = CASES[name]
  shape = export.symbolic_shape(spec)
  exported = export.export(jax.jit(ours), platforms=["cpu"])(
    jax.ShapeDtypeStruct(shape, jnp.float64)
  )
  for b, n in [(5, 70000), (3, 70000)] if "70000" in spec else [(5, 9), (5, 70000)]:
    if spec == "5, n" and b != 5:
      continue
    x = draws.normal(b * n, (b, n), jnp.float64, scale=3.0)
    assert rel_err(exported.call(x), ref(x)) <= TOL, (b, n)


@pytest.mark.parametrize("label_dtype", [jnp.int8, jnp.uint8, jnp.int32])
def test_integer_labels_with_a_symbolic_class_count(label_dtype):
  # 300 classes do not fit in 8 bits: the symbolic count must not wrap in the
  # labels' dtype (which would make valid labels out of range, and NaN).
  def ours(x, labels):
    return jaxsoftmax.softmax_cross_entropy_with_integer_labels(x, labels)

  b, n = export.symbolic_shape("b, n")
  exported = export.export(jax.jit(ours), platforms=["cpu"])(
    jax.ShapeDtypeStruct((b, n), jnp.float64), jax.ShapeDtypeStruct((b,), label_dtype)
  )
  x = draws.normal(2, (4, 300), jnp.float64)
  labels = jnp.array([5, 100, 127, 3], label_dtype)
  want = optax.softmax_cross_entropy_with_integer_labels(x, labels.astype(jnp.int32))
  assert rel_err(exported.call(x, labels), want) <= TOL
  if jnp.issubdtype(label_dtype, jnp.signedinteger):
    got = exported.call(x, labels.at[1].set(-1))
    assert jnp.isnan(got[1]) and jnp.isfinite(got[0])


def test_fused_loss_with_a_symbolic_token_count():
  h, v = 16, 300
  w = draws.normal(1, (h, v), jnp.float64, scale=0.25)

  def ours(x, labels):
    return jax.value_and_grad(jaxsoftmax.linear_softmax_cross_entropy, (0, 1))(x, w, labels)

  def ref(x, labels):
    f = lambda x, w: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, labels))  # noqa: E731
    return jax.value_and_grad(f, (0, 1))(x, w)

  b, t = export.symbolic_shape("b, t")
  exported = export.export(jax.jit(ours), platforms=["cpu"])(
    jax.ShapeDtypeStruct((b, t, h), jnp.float64), jax.ShapeDtypeStruct((b, t), jnp.int32)
  )
  for bb, tt in [(2, 3), (4, 7)]:
    x = draws.normal(bb, (bb, tt, h), jnp.float64)
    labels = draws.randint(tt, (bb, tt), 0, v, jnp.int32)
    got, want = exported.call(x, labels), ref(x, labels)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert rel_err(a, e) <= TOL


def test_symbolic_sizes_the_kernels_or_the_fused_loss_cannot_take_are_clear_errors():
  (n,) = export.symbolic_shape("n")
  with pytest.raises(ValueError, match="symbolic sizes"):
    export.export(jax.jit(lambda x: jaxsoftmax.softmax(x, implementation="pallas")))(
      jax.ShapeDtypeStruct((4, n), jnp.float32)
    )
  with pytest.raises(ValueError, match="`w` has shape .*known sizes"):
    export.export(
      jax.jit(
        lambda w: jaxsoftmax.linear_softmax_cross_entropy(jnp.ones((3, 8)), w, jnp.zeros(3, int))
      )
    )(jax.ShapeDtypeStruct((8, n), jnp.float32))
