"""Meshes and HLO inspection shared by the multi-device tests."""

import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


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
