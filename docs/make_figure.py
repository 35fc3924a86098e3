"""Draws docs/jacobian.png: a 5-element softmax Jacobian next to its VJP computed without it.

    python docs/make_figure.py [--out docs/jacobian.png]

Left: ``J = diag(s) - s s^T`` as a heat map. Right: the vector-Jacobian
product ``g^T J`` two ways: through the 5x5 matrix, and as
``s * (g - <g, s>)``, which is what ``jaxsoftmax.softmax``'s backward rule
computes (here obtained from ``jax.vjp`` of ``jaxsoftmax.softmax``). The two
agree to rounding; only the second is O(n).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxsoftmax

# The logits and the incoming gradient shown in the figure.
Z = np.array([1.0, 2.0, 0.5, -1.0, 3.0], np.float32)
G = np.array([1.0, -0.5, 0.0, 2.0, -1.0], np.float32)


def compute(z=Z, g=G) -> dict[str, np.ndarray]:
  """The numbers in the figure: s, J, g^T J through J, and the VJP without J."""
  z, g = jnp.asarray(z), jnp.asarray(g)
  s = jaxsoftmax.softmax(z)
  jac = jnp.diag(s) - jnp.outer(s, s)  # ds_i/dz_k = s_i (delta_ik - s_k)
  _, vjp = jax.vjp(jaxsoftmax.softmax, z)
  return {
    "s": np.asarray(s),
    "jacobian": np.asarray(jac),
    "vjp_through_jacobian": np.asarray(g @ jac),
    "vjp_without_jacobian": np.asarray(vjp(g)[0]),
  }


def draw(out: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  r = compute()
  n = len(Z)
  fig, (ax_j, ax_v) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1, 1.15]})

  jac = r["jacobian"]
  lim = np.abs(jac).max()
  im = ax_j.imshow(jac, cmap="RdBu_r", vmin=-lim, vmax=lim)
  for i in range(n):
    for k in range(n):
      ax_j.text(k, i, f"{jac[i, k]:+.3f}", ha="center", va="center", fontsize=8)
  ticks = [f"{k}\n(z={Z[k]:g})" for k in range(n)]
  ax_j.set_xticks(range(n), ticks, fontsize=8)
  ax_j.set_yticks(range(n), [f"i={i}  ($s_{i}$={r['s'][i]:.3f})" for i in range(n)], fontsize=8)
  ax_j.set_xlabel("k")
  ax_j.set_title(
    "Jacobian  $\\partial s_i / \\partial z_k = s_i(\\delta_{ik} - s_k)$\n"
    "diagonal $s_i(1-s_i) > 0$, off-diagonal $-s_i s_k < 0$, rows sum to 0",
    fontsize=9,
  )
  fig.colorbar(im, ax=ax_j, fraction=0.046, pad=0.04)

  x = np.arange(n)
  ax_v.bar(x - 0.2, r["vjp_through_jacobian"], 0.4, label="$g^T J$ (builds the n x n matrix)")
  ax_v.bar(
    x + 0.2, r["vjp_without_jacobian"], 0.4, label="$s * (g - \\langle g, s\\rangle)$ (jaxsoftmax)"
  )
  ax_v.axhline(0.0, color="black", lw=0.6)
  ax_v.set_xticks(x, [f"{k}\n(g={G[k]:g})" for k in range(n)], fontsize=8)
  ax_v.set_xlabel("k")
  gap = np.abs(r["vjp_through_jacobian"] - r["vjp_without_jacobian"]).max()
  ax_v.set_title(
    f"VJP for g = {G.tolist()}: O(n^2) vs O(n)\nlargest difference {gap:.1e} (float32 rounding)",
    fontsize=9,
  )
  ax_v.legend(fontsize=8, loc="lower left")
  fig.suptitle("softmax of z = " + str(Z.tolist()), fontsize=10)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("jacobian.png"))
  args = p.parse_args(argv)
  draw(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
