"""Fused linear + softmax cross-entropy against ``x @ w`` then optax, and tokamax's ``xla`` path.

As a harness suite (``python -m benchmarks --suite linear_cross_entropy``) every
contender is checked against float64 autodiff and timed like the other ops.

As a program of its own, it measures what the issue asks for at large shapes,
where a harness run (30 repetitions of programs taking tens of seconds) is too
slow for a CPU: the compiled forward+backward program's temporary memory
(``memory_analysis().temp_size_in_bytes``, compile only) and its wall time, and
draws the memory plot of the README::

  python -m benchmarks.suites.linear_cross_entropy --help
  python -m benchmarks.suites.linear_cross_entropy --plot docs/linear_cross_entropy_memory.png
  python -m benchmarks.suites.linear_cross_entropy --time --reps 2
  python -m benchmarks.suites.linear_cross_entropy --tied --time  # a [V, H] table

A program is only run when the machine has the memory for it (``MemAvailable``
in ``/proc/meminfo``); otherwise its time is reported as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsoftmax

from ..registry import Contender, Suite, register

SIZES = [(8192, 512, 32768), (4096, 1024, 131072)]  # (N, H, V)
QUICK_SIZES = [(1024, 256, 8192)]


def _inputs(rng: np.random.Generator, size, dtype: str):
  n, h, v = size
  x = rng.standard_normal((n, h), dtype=np.float32)
  w = rng.standard_normal((h, v), dtype=np.float32) / np.float32(math.sqrt(h))
  return x, w, rng.integers(0, v, n, dtype=np.int32)


def _bytes_moved(size, itemsize: int, mode: str) -> int:
  # Forward: read x and w. Backward: read them again and write dx and dw.
  n, h, v = size
  io = (n * h + h * v) * itemsize
  return io if mode == "fwd" else 3 * io


def fused(x, w, labels):
  return jaxsoftmax.linear_softmax_cross_entropy(x, w, labels)


def unfused_optax(x, w, labels):
  """The plain recipe: the logits in the input dtype, then optax."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, labels))


def unfused_optax_f32(x, w, labels):
  """The accurate bf16 recipe: logits accumulated and kept in float32, then optax."""
  logits = jnp.matmul(x, w, preferred_element_type=jnp.float32)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return loss.astype(x.dtype)


def unfused_jaxsoftmax(x, w, labels):
  """The logits, then this library's unfused cross-entropy."""
  return jnp.mean(jaxsoftmax.softmax_cross_entropy_with_integer_labels(x @ w, labels))


def tokamax_xla(x, w, labels):
  import tokamax
  from absl import flags

  # tokamax reads its absl flags from sys.argv on first use; give it none of ours.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])

  loss = tokamax.linear_softmax_cross_entropy_loss(
    x, labels, w, reduction="mean", implementation="xla"
  )
  return loss.astype(x.dtype)


# A tied [V, H] table (``--tied``): the contenders take it in place of w.


def tied_fused(x, e, labels):
  """The table as it is, with ``transpose_w=True``: chunks are rows of it."""
  return jaxsoftmax.linear_softmax_cross_entropy(x, e, labels, transpose_w=True)


def tied_fused_transposed(x, e, labels):
  """The table transposed by the caller, ``e.T`` as an ``[H, V]`` w."""
  return jaxsoftmax.linear_softmax_cross_entropy(x, e.T, labels)


def tied_unfused_optax(x, e, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ e.T, labels))


TIED = [
  Contender("fused, transpose_w=True", tied_fused, strict=True),
  Contender("fused, w=e.T", tied_fused_transposed),
  Contender("x@e.T + optax", tied_unfused_optax),
]


def naive(x, w, labels):
  logits = x @ w
  log_p = logits - jnp.log(jnp.sum(jnp.exp(logits), -1, keepdims=True))
  return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], -1))


def _contenders() -> list[Contender]:
  out = [
    Contender("jaxsoftmax fused", fused, strict=True),
    Contender("x@w + optax", unfused_optax),
    Contender("x@w f32 + optax", unfused_optax_f32),
    Contender("x@w + jaxsoftmax", unfused_jaxsoftmax),
  ]
  if importlib.util.find_spec("tokamax") is not None:
    out.append(Contender("tokamax xla", tokamax_xla))
  return out


register(
  Suite(
    name="linear_cross_entropy",
    description="jaxsoftmax.linear_softmax_cross_entropy vs x @ w then optax, and tokamax xla",
    make_inputs=_inputs,
    contenders=_contenders(),
    baseline="x@w + optax",
    sizes=SIZES,
    quick_sizes=QUICK_SIZES,
    bytes_moved=_bytes_moved,
    reference=naive,
    diff_argnums=(0, 1),
    cast=(0, 1),
    targets=[("jaxsoftmax fused", "x@w + optax")],
    target_ratio=1.3,  # issue 5: at most 1.3x the unfused path
    check_size=(64, 32, 1000),
    row_length=lambda size: size[2],
  )
)


# ----------------------------------------------------------------------------
# The program: temporary memory at scale, times, and the README's plot.


def _compile(fn, n, h, v, dtype, tied=False):
  args = (
    jax.ShapeDtypeStruct((n, h), dtype),
    jax.ShapeDtypeStruct((v, h) if tied else (h, v), dtype),
    jax.ShapeDtypeStruct((n,), jnp.int32),
  )
  return jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*args).compile()


def temp_bytes(fn, n, h, v, dtype, tied=False) -> int:
  """Temporary bytes of the compiled forward+backward program (compile only)."""
  return int(_compile(fn, n, h, v, dtype, tied).memory_analysis().temp_size_in_bytes)


def _available_bytes() -> int | None:
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def time_cell(fns, n, h, v, dtype, reps: int, warmup: int, tied=False) -> list[float | None]:
  """Median wall time of each compiled forward+backward, called in turn (A B A B ...).

  A program that would not fit in the memory available now is left out (None).
  """
  compiled = [_compile(fn, n, h, v, dtype, tied) for fn in fns]
  avail = _available_bytes()
  runnable = []
  for c in compiled:
    ma = c.memory_analysis()
    need = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
    runnable.append(avail is None or 1.5 * need < avail)
  rng = np.random.default_rng(0)
  x, w, labels = (jnp.asarray(a) for a in _inputs(rng, (n, h, v), "float32"))
  x, w = x.astype(dtype), (w.T if tied else w).astype(dtype)
  times: list[list[float]] = [[] for _ in fns]
  for i in range(warmup + reps):
    for j, c in enumerate(compiled):
      if not runnable[j]:
        continue
      t0 = time.perf_counter()
      jax.block_until_ready(c(x, w, labels))
      if i >= warmup:
        times[j].append(time.perf_counter() - t0)
  return [float(np.median(t)) if t else None for t in times]


def table(sizes, dtypes, contenders, time_names, reps: int, warmup: int, tied=False) -> list[dict]:
  """Temporary bytes of every contender, and times of those in ``time_names``."""
  from tqdm import tqdm

  rows = []
  cells = [(s, d) for s in sizes for d in dtypes]
  for size, dtype in tqdm(cells, desc="linear_cross_entropy", leave=False):
    n, h, v = size
    # In float32 the f32-logits recipe is the plain one.
    cs = [c for c in contenders if not (dtype == "float32" and c.fn is unfused_optax_f32)]
    timed = [c for c in cs if c.name in time_names]
    secs = dict(zip([c.name for c in timed], [None] * len(timed), strict=True))
    if timed:
      got = time_cell([c.fn for c in timed], n, h, v, jnp.dtype(dtype), reps, warmup, tied)
      secs = dict(zip([c.name for c in timed], got, strict=True))
    for c in cs:
      row = dict(size=size, dtype=dtype, contender=c.name)
      row["temp_bytes"] = temp_bytes(c.fn, n, h, v, jnp.dtype(dtype), tied)
      if c.name in secs:
        row["seconds"] = secs[c.name]
      rows.append(row)
      tqdm.write(json.dumps(row))
  return rows


def markdown(rows, baseline: str) -> str:
  base = {(tuple(r["size"]), r["dtype"]): r for r in rows if r["contender"] == baseline}
  out = [
    "| N x H x V | dtype | contender | temp MiB | temp / unfused | fwd+bwd s | time / unfused |",
    "|---|---|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    b = base.get((tuple(r["size"]), r["dtype"]))
    mem = r["temp_bytes"] / 2**20
    mem_ratio = f"{r['temp_bytes'] / b['temp_bytes']:.3f}" if b else ""
    t = r.get("seconds")
    t_str = "not timed" if "seconds" not in r else ("skipped" if t is None else f"{t:.2f}")
    bt = b.get("seconds") if b else None
    t_ratio = f"{t / bt:.2f}" if t is not None and bt else ""
    size = "x".join(map(str, r["size"]))
    cells = [size, r["dtype"], r["contender"], f"{mem:.1f}", mem_ratio, t_str, t_ratio]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def plot(path: Path, contenders, n: int, h: int, vs, dtype: str = "float32", tied=False) -> None:
  """Temporary memory of forward+backward against the vocabulary size, log-log."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from tqdm import tqdm

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for c in tqdm(contenders, desc="memory plot", leave=False):
    mib = [temp_bytes(c.fn, n, h, v, jnp.dtype(dtype), tied) / 2**20 for v in vs]
    ax.plot(vs, mib, marker="o", label=c.name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("vocabulary size V")
  ax.set_ylabel("temporary memory of fwd+bwd (MiB)")
  ax.set_title(f"Compiled forward+backward, N={n}, H={h}, {dtype}, XLA CPU")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.suites.linear_cross_entropy",
    description="Temporary memory (compile only) and fwd+bwd time of the fused linear "
    "cross-entropy against the unfused paths, and the README's memory plot.",
  )
  p.add_argument("--size", action="append", help="NxHxV (repeatable; default: the issue's two)")
  p.add_argument("--dtype", action="append", help="float32 / bfloat16 (repeatable)")
  p.add_argument("--time", action="store_true", help="also run and time the programs")
  p.add_argument(
    "--time-only", action="append", help="time only this contender (repeatable; default: all)"
  )
  p.add_argument("--reps", type=int, default=2, help="timed calls per program")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls per program first")
  p.add_argument("--contender", action="append", help="only this contender (repeatable)")
  p.add_argument("--plot", type=Path, help="draw the memory plot to this PNG")
  p.add_argument("--json", type=Path, help="write the rows to this JSON file")
  p.add_argument(
    "--tied",
    action="store_true",
    help="a tied [V, H] table: transpose_w=True against passing e.T, and x @ e.T + optax",
  )
  args = p.parse_args(argv)

  every = TIED if args.tied else _contenders()
  contenders = [c for c in every if not args.contender or c.name in args.contender]
  if args.plot:
    vs = [2**k for k in range(12, 18)]
    plot(args.plot, contenders, 4096, 1024, vs, tied=args.tied)
    print(f"wrote {args.plot}")
  sizes = [tuple(int(s) for s in size.split("x")) for size in args.size] if args.size else SIZES
  dtypes = args.dtype or ["float32", "bfloat16"]
  names = [c.name for c in contenders]
  time_names = (args.time_only or names) if args.time else []
  rows = table(sizes, dtypes, contenders, time_names, args.reps, args.warmup, args.tied)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(markdown(rows, "x@e.T + optax" if args.tied else "x@w + optax"))
  if args.json:
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
