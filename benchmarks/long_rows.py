"""Why ``sum_exp`` sums long rows in pieces on XLA:CPU: one measurement.

``python -m benchmarks.long_rows [--mib 512] [--reps 7]`` times, on float32
arrays of a fixed size and rows of growing length, the log-sum-exp of each row
computed two ways, interleaved in one process: ``plain`` (max, then
``sum(exp(x - m))`` along the row) and ``pieces`` (the row viewed as pieces of
2048, each summed, then the partial sums, as ``jaxsoftmax._stats.sum_exp`` does
on the CPU). It prints medians in ms and the ratio.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PIECE = 2048


def plain(x):
  m = jnp.max(x, -1, keepdims=True)
  return m + jnp.log(jnp.sum(jnp.exp(x - m), -1, keepdims=True))


def pieces(x):
  m = jnp.max(x, -1, keepdims=True)
  parts = jnp.sum(jnp.exp(x.reshape(x.shape[0], -1, PIECE) - m[..., None]), -1)
  parts = jnp.where(jnp.isnan(m), jnp.nan, parts)  # the select that keeps the two sums apart
  return m + jnp.log(jnp.sum(parts, -1, keepdims=True))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--mib", type=int, default=512, help="array size in MiB (float32)")
  ap.add_argument("--reps", type=int, default=7)
  args = ap.parse_args(argv)
  total = args.mib * 2**20 // 4
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, float32, {args.mib} MiB")
  print("| row length | rows | plain ms | pieces ms | plain / pieces |")
  print("|---:|---:|---:|---:|---:|")
  for n in [4096, 16384, 32768, 65536, 131072, 262144]:
    rows = total // n
    x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, n), dtype=np.float32))
    fns = {"plain": jax.jit(plain), "pieces": jax.jit(pieces)}
    ref = fns["plain"](x)
    np.testing.assert_allclose(fns["pieces"](x), ref, rtol=1e-5)
    times = {k: [] for k in fns}
    for _ in range(args.reps):
      for k, f in fns.items():
        t = time.perf_counter()
        lax.stop_gradient(f(x)).block_until_ready()
        times[k].append(time.perf_counter() - t)
    p, q = (np.median(times[k]) * 1e3 for k in ("plain", "pieces"))
    print(f"| {n} | {rows} | {p:.1f} | {q:.1f} | {p / q:.2f} |")


if __name__ == "__main__":
  main()
