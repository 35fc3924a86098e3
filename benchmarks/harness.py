"""Measuring: correctness first, then interleaved timings, memory and the roofline.

Every JAX contender is compiled ahead of time (``jit(f).lower(...).compile()``)
for the forward (``f(x)``) and for forward+backward (``jax.vjp`` then apply,
returning the output and the input cotangent). The compiled programs of one
(size, dtype) cell, together with the two roofline passes, are then called in
turn, A B C A B C ..., on input buffers that rotate, and the median wall time of
each is kept.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .registry import Contender, Size, Suite

# Rotate among enough buffers to hold at least this many bytes of inputs, so
# that small sizes are not timed from a warm cache.
ROTATE_BYTES = 96 << 20
MIN_BUFFERS, MAX_BUFFERS = 3, 16


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


@contextlib.contextmanager
def jax_flags(flags) -> Iterator[None]:
  """Sets JAX config options for the duration of a trace and compile."""
  old = {k: getattr(jax.config, k) for k in flags}
  try:
    for k, v in flags.items():
      jax.config.update(k, v)
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)


def _cast_indices(suite: Suite) -> tuple[int, ...]:
  return suite.diff_argnums if suite.cast is None else suite.cast


def _with_diff(fn, args, argnums):
  """``fn`` as a function of the differentiated inputs only."""

  def f(*diff):
    full = list(args)
    for i, a in zip(argnums, diff, strict=True):
      full[i] = a
    return fn(*full)

  return f


def _fwd_bwd(fn: Callable, argnums: tuple[int, ...]) -> Callable:
  def run(*args_and_g):
    *args, g = args_and_g
    y, vjp = jax.vjp(_with_diff(fn, args, argnums), *(args[i] for i in argnums))
    return y, vjp(g)

  return run


# ----------------------------------------------------------------------------
# Inputs


def make_cases(suite: Suite, size: Size, dtype: str, count: int, seed: int):
  """``count`` input sets as numpy arrays (float ones rounded to ``dtype``)."""
  rng = np.random.default_rng(seed)
  cast = _cast_indices(suite)
  cases = []
  for _ in range(count):
    args = list(suite.make_inputs(rng, size, dtype))
    for i in cast:
      args[i] = np.asarray(jnp.asarray(args[i], dtype))
    cases.append(tuple(args))
  return cases


def cotangent(suite: Suite, args, rng: np.random.Generator) -> np.ndarray:
  """A random normal cotangent for the baseline's output."""
  base = next(c for c in suite.contenders if c.name == suite.baseline)
  out = jax.eval_shape(base.fn, *args)
  return np.asarray(jnp.asarray(rng.standard_normal(out.shape, dtype=np.float32), out.dtype))


def buffer_count(args) -> int:
  nbytes = sum(np.asarray(a).nbytes for a in args)
  return int(min(MAX_BUFFERS, max(MIN_BUFFERS, math.ceil(ROTATE_BYTES / max(nbytes, 1)))))


# ----------------------------------------------------------------------------
# Correctness


def _rel_err(y, ref) -> float:
  y = np.asarray(y, np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(y)):
    return math.inf
  den = np.linalg.norm(ref)
  return float(np.linalg.norm(y - ref) / (den if den > 0 else 1.0))


def _reference(suite: Suite, args, g):
  """Value and VJP of the naive definition in float64 on the CPU."""
  cpu = jax.devices("cpu")[0]
  with jax.enable_x64(True), jax.default_device(cpu):
    a64 = [
      jnp.asarray(a, jnp.float64) if i in _cast_indices(suite) else jnp.asarray(a)
      for i, a in enumerate(args)
    ]
    y, dx = _fwd_bwd(suite.reference, suite.diff_argnums)(*a64, jnp.asarray(g, jnp.float64))
    return np.asarray(y), [np.asarray(d) for d in dx]


def _torch_fwd_bwd(contender: Contender, suite: Suite, args, g):
  import torch

  targs = [torch_tensor(a, requires_grad=i in suite.diff_argnums) for i, a in enumerate(args)]
  y = contender.fn(*targs)
  dx = torch.autograd.grad(y, [targs[i] for i in suite.diff_argnums], torch_tensor(g))
  return to_numpy(y), [to_numpy(d) for d in dx]


def check(suite: Suite, dtype: str, contenders: Sequence[Contender], seed: int = 0) -> list[dict]:
  """Relative L2 errors of each contender against the float64 naive definition."""
  (args,) = make_cases(suite, suite.check_size, dtype, 1, seed)
  rng = np.random.default_rng(seed + 1)
  g = cotangent(suite, args, rng)
  y_ref, dx_ref = _reference(suite, args, g)
  eps = float(jnp.finfo(dtype).eps)
  tol_f, tol_b = suite.tolerance
  rows = []
  for c in contenders:
    if c.framework == "torch":
      y, dx = _torch_fwd_bwd(c, suite, args, g)
    else:
      # float32 matmuls (linear_cross_entropy) at full precision: a GPU's default
      # is TF32, 28 eps off in the forward on the first GPU run, for every
      # contender alike. The timings run at the default precision.
      with jax_flags(c.flags), jax.default_matmul_precision("float32"):
        y, dx = jax.jit(_fwd_bwd(c.fn, suite.diff_argnums))(*args, g)
    fwd_err = _rel_err(y, y_ref)
    bwd_err = max(_rel_err(d, r) for d, r in zip(dx, dx_ref, strict=True))
    # Our own ops must meet the suite's tolerance; the others only need to be
    # roughly right, so that a broken contender does not get timed.
    scale = 1.0 if c.strict else 16.0
    ok = fwd_err <= scale * tol_f * eps and bwd_err <= scale * tol_b * eps
    rows.append(
      dict(
        suite=suite.name,
        dtype=dtype,
        contender=c.name,
        size=list(suite.check_size),
        fwd_err=fwd_err,
        bwd_err=bwd_err,
        fwd_err_eps=fwd_err / eps,
        bwd_err_eps=bwd_err / eps,
        tolerance_eps=[scale * tol_f, scale * tol_b],
        ok=bool(ok),
      )
    )
  return rows


# ----------------------------------------------------------------------------
# Torch helpers


def torch_tensor(a: np.ndarray, requires_grad: bool = False):
  import torch

  a = np.asarray(a)
  if a.dtype == jnp.bfloat16:
    t = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
  else:
    t = torch.from_numpy(np.array(a))  # a writable copy
  return t.requires_grad_(requires_grad) if requires_grad else t


def to_numpy(t) -> np.ndarray:
  import torch

  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.float().numpy()
  return t.numpy()


# ----------------------------------------------------------------------------
# Programs


@dataclass
class Program:
  """One timed callable and the argument tuples it rotates through."""

  contender: str
  mode: str  # "fwd", "fwd+bwd", "copy" or "exp"
  call: Callable[[Any], Any]  # starts one call (may return before it is done)
  argsets: list[tuple]
  temp_bytes: int | None = None
  per_call: int = 1  # op executions per call (a batched program runs several)
  residual_bytes: int | None = None
  residuals: list[str] | None = None
  times: list[float] | None = None


def _compile(fn, args, flags):
  with jax_flags(flags):
    return jax.jit(fn).lower(*args).compile()


def _temp_bytes(compiled) -> int | None:
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports memory
    return None


def saved_residual_bytes(fn, args, argnums, flags) -> tuple[int, list[str]]:
  """Bytes that ``jax.vjp`` keeps for the backward pass, and what they are."""
  from jax._src.ad_checkpoint import saved_residuals

  with jax_flags(flags):
    res = saved_residuals(_with_diff(fn, args, argnums), *(args[i] for i in argnums))
  total, names = 0, []
  for aval, why in res:
    nbytes = int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
    total += nbytes
    names.append(f"{aval.str_short()}: {why}")
  return total, names


def _program(name, mode, fn, argsets, flags, batch: bool) -> Program:
  """``fn`` compiled for one argument set (its memory use is reported from this
  program). With ``batch``, the timed program calls ``fn`` on every argument set
  in turn, so that one dispatch from Python covers ``len(argsets)`` runs: on the
  GPU machine a single call costs about 50 us of host time, more than the op
  itself at small sizes."""
  one = _compile(fn, argsets[0], flags)
  temp = _temp_bytes(one)
  if not batch:
    return Program(name, mode, lambda a, f=one: f(*a), argsets, temp)
  inner = jax.jit(fn)
  many = _compile(lambda sets: [inner(*a) for a in sets], (argsets,), flags)
  return Program(name, mode, lambda a, f=many: f(a), [argsets], temp, per_call=len(argsets))


def jax_programs(
  suite: Suite, c: Contender, device_cases, device_gs, batch: bool = False
) -> list[Program]:
  """``c``'s forward and forward+backward on the cell's device buffers, which
  every contender and the roofline share (``measure_cell`` puts them on the
  device once: a copy each held 20.5 GB at 1024 x 131072 soft labels, float32,
  on this 24 GB machine)."""
  fb_args = [(*args, g) for args, g in zip(device_cases, device_gs, strict=True)]
  fwd = _program(c.name, "fwd", c.fn, device_cases, c.flags, batch)
  fb_fn = _fwd_bwd(c.fn, suite.diff_argnums)
  fb = _program(c.name, "fwd+bwd", fb_fn, fb_args, c.flags, batch)
  fb.residual_bytes, fb.residuals = saved_residual_bytes(
    c.fn, device_cases[0], suite.diff_argnums, c.flags
  )
  return [fwd, fb]


def torch_programs(suite: Suite, c: Contender, cases, gs) -> list[Program]:
  import torch

  fwd_args = [tuple(torch_tensor(a) for a in args) for args in cases]
  fb_args = [
    (tuple(torch_tensor(a) for a in args), torch_tensor(g))
    for args, g in zip(cases, gs, strict=True)
  ]
  argnums = suite.diff_argnums

  def fwd(a):
    with torch.no_grad():
      return c.fn(*a)

  def fwd_bwd(a):
    args, g = a
    args = [x.detach().requires_grad_(i in argnums) for i, x in enumerate(args)]
    y = c.fn(*args)
    return y, torch.autograd.grad(y, [args[i] for i in argnums], g)

  return [
    Program(c.name, "fwd", fwd, fwd_args),
    Program(c.name, "fwd+bwd", fwd_bwd, fb_args),
  ]


def roofline_programs(device_cases, batch: bool = False) -> list[Program]:
  """A plain copy and an exp pass over the first input's bytes."""
  xs = [(args[0],) for args in device_cases]
  return [
    _program("roofline", "copy", jnp.copy, xs, {}, batch),
    _program("roofline", "exp", jnp.exp, xs, {}, batch),
  ]


def time_interleaved(programs: Sequence[Program], reps: int, warmup: int, calls: int = 1) -> None:
  """Runs the programs in turn, A B C C B A A B C ..., and records each one's time
  per call.

  A sample is ``calls`` back-to-back calls (on rotating buffers) and one wait for
  the last result: on an accelerator this hides the host's sync latency, and
  batched programs (``per_call`` runs of the op each) its dispatch latency,
  which would otherwise dominate small sizes. On the CPU, ``calls=1``.

  Every call takes the next buffer, whichever program makes it, so that no
  program reads what the one before it has just read. When each program of a
  round read the same buffer, a program timed against an identical copy of
  itself took 0.86-0.92x its time when it ran second at 4096 x 512 (arrays of
  4-8 MB, in the CPU's cache), and 0.99-1.03x with every call on its own
  buffer (``benchmarks/README.md``). Every other round runs in reverse order.
  """
  for p in programs:
    p.times = []
    for i in range(warmup):
      jax.block_until_ready(p.call(p.argsets[i % len(p.argsets)]))
  turn = 0  # calls made so far: the next buffer of every program
  for r in range(reps):
    for p in programs if r % 2 == 0 else programs[::-1]:
      t0 = time.perf_counter()
      for _ in range(calls):
        out = p.call(p.argsets[turn % len(p.argsets)])
        turn += 1
      jax.block_until_ready(out)
      p.times.append((time.perf_counter() - t0) / (calls * p.per_call))


def measure_cell(
  suite: Suite,
  size: Size,
  dtype: str,
  contenders: Sequence[Contender],
  reps: int,
  warmup: int,
  seed: int = 0,
  calls: int = 1,
  batch: bool = False,
) -> dict:
  """Times every contender and the roofline at one (size, dtype); ``batch``: each
  timed JAX program runs the op once per rotating buffer (accelerators)."""
  (probe,) = make_cases(suite, size, dtype, 1, seed)
  count = buffer_count(probe)
  cases = make_cases(suite, size, dtype, count, seed)
  rng = np.random.default_rng(seed + 1)
  gs = [cotangent(suite, args, rng) for args in cases]

  # One device copy of the buffers for all JAX programs (torch reads the NumPy ones).
  device_cases = [tuple(jnp.asarray(a) for a in args) for args in cases]
  device_gs = [jnp.asarray(g) for g in gs]
  programs = roofline_programs(device_cases, batch)
  for c in contenders:
    if c.framework == "torch":
      programs += torch_programs(suite, c, cases, gs)
    else:
      programs += jax_programs(suite, c, device_cases, device_gs, batch)
  time_interleaved(programs, reps, warmup, calls)

  itemsize = np.dtype(cases[0][0].dtype).itemsize
  x_bytes = int(np.asarray(cases[0][0]).nbytes)
  median = {(p.contender, p.mode): float(np.median(p.times)) for p in programs}
  copy_gbs = 2 * x_bytes / median["roofline", "copy"] / 1e9
  exp_gbs = 2 * x_bytes / median["roofline", "exp"] / 1e9
  rows = []
  for p in programs:
    if p.contender == "roofline":
      continue
    t = median[p.contender, p.mode]
    base = median.get((suite.baseline, p.mode))
    moved = suite.bytes_moved(size, itemsize, p.mode)
    gbs = moved / t / 1e9
    rows.append(
      dict(
        contender=p.contender,
        mode=p.mode,
        median_s=t,
        p10_s=float(np.percentile(p.times, 10)),
        p90_s=float(np.percentile(p.times, 90)),
        ratio=t / base if base else None,
        bytes_moved=moved,
        gb_s=gbs,
        pct_copy=100 * gbs / copy_gbs,
        pct_exp=100 * gbs / exp_gbs,
        temp_bytes=p.temp_bytes,
        residual_bytes=p.residual_bytes,
        residuals=p.residuals,
      )
    )
  return dict(
    size=list(size),
    label=suite.size_label(size),
    row_length=suite.row_length(size),
    dtype=dtype,
    buffers=count,
    reps=reps,
    calls_per_sample=calls,
    batched=batch,
    roofline=dict(
      copy_s=median["roofline", "copy"],
      exp_s=median["roofline", "exp"],
      copy_gb_s=copy_gbs,
      exp_gb_s=exp_gbs,
    ),
    rows=rows,
    targets=_targets(suite, rows),
  )


def _targets(suite: Suite, rows: list[dict]) -> list[dict]:
  t = {(r["contender"], r["mode"]): r["median_s"] for r in rows}
  out = []
  for ours, ref in suite.targets:
    if (ours, "fwd+bwd") in t and (ref, "fwd+bwd") in t:
      ratio = t[ours, "fwd+bwd"] / t[ref, "fwd+bwd"]
      out.append(
        dict(
          contender=ours,
          reference=ref,
          ratio=ratio,
          limit=suite.target_ratio,
          ok=ratio <= suite.target_ratio,
        )
      )
  return out
