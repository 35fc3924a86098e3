"""Meshes, layouts, inputs and HLO inspection shared by the multi-device tests."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

B, N = 8, 32  # batch (divisible by 4) and classes (divisible by 8)
TOL = {
  jnp.float64: dict(rtol=1e-12, atol=1e-13),
  jnp.float32: dict(rtol=2e-5, atol=2e-6),
  # Both sides compute in float32 and round to bfloat16: at most an ulp or so apart.
  jnp.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# name -> (mesh shape, mesh axis names, spec of x, axis_name given to the op)
LAYOUTS = {
  "8:classes": ((8,), ("v",), P(None, "v"), "v"),
  "2x4:classes": ((2, 4), ("b", "v"), P(None, "v"), "v"),
  "4x2:classes": ((4, 2), ("b", "v"), P(None, "v"), "v"),
  "2x4:batch+classes": ((2, 4), ("b", "v"), P("b", "v"), "v"),
  "4x2:batch+classes": ((4, 2), ("b", "v"), P("b", "v"), "v"),
  "2x4:classes over both axes": ((2, 4), ("b", "v"), P(None, ("b", "v")), ("b", "v")),
}


def inputs(dtype):
  """Logits whose rows cover every case of the masking table, a mask and a cotangent."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = 3.0 * jax.random.normal(k1, (B, N), jnp.float64)
  x = x.at[1].set(1e4 + 50.0 * x[1])  # large logits: the shift must be global
  x = x.at[2, ::5].set(-jnp.inf)  # scattered -inf entries
  x = x.at[3, :8].set(-jnp.inf)  # whole device blocks with no finite entry
  x = x.at[4].set(-jnp.inf)  # all -inf: an empty slice
  x = x.at[5, 17].set(jnp.inf)  # +inf: this row only is NaN
  x = x.at[6, 30].set(jnp.nan)  # NaN: this row only is NaN
  where = jax.random.bernoulli(k2, 0.7, (B, N))
  where = where.at[0].set(True).at[3, 8:].set(True)
  where = where.at[7].set(False)  # a fully masked row
  where = where.at[1, :16].set(False)  # some blocks fully masked, others not
  g = jax.random.normal(k3, (B, N), jnp.float64)
  return x.astype(dtype), where, g.astype(dtype)


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
  """A mesh over the first prod(shape) devices, with Auto axes (as under plain jit)."""
  devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def collectives(hlo: str) -> dict[str, list[str]]:
  """Each collective op of a compiled HLO module: name -> the result shapes of its instructions.

  Async pairs (``all-reduce-start``/``-done``) count once, at their start.
  """
  found = {name: [] for name in COLLECTIVES}
  for line in hlo.splitlines():
    for name in COLLECTIVES:
      match = re.search(rf"=\s*(.*?)\s+{name}(?:-start)?\(", line)
      if match:
        found[name].append(match.group(1))
  return found


def dims(shape_text: str) -> list[int]:
  """All dimension sizes in an HLO result shape such as ``(f32[8,64]{1,0}, s32[])``."""
  return [
    int(d) for group in re.findall(r"\[([\d,]*)\]", shape_text) for d in group.split(",") if d
  ]
