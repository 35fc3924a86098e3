"""Pallas kernels on a GPU: correctness against float64, then timings and bandwidth.

Run on a GPU machine (6.5 minutes on an H200 on 2026-11-26, T0511Z: 2.5 for
steps 1-3, then the variants until their 240 s ran out, 34 of 50 cells; now 38
cells, about 10 s each, within 360 s; the masked softmax adds perhaps 30 s to
step 2, and the losses of step 4 perhaps 60 s on an H100 (an estimate: not
yet run on a GPU), both of which the variants give back within ``--budget``):

    python benchmarks/gpu_pallas.py --out "$OUT"

In this order:

1. correctness: softmax and log_softmax with ``implementation="pallas"``,
   values and VJPs, against float64 NumPy on the CPU (forward within 4 eps,
   backward within 8 eps of the input dtype, ``||err|| / ||ref||``; the
   forward both as a differentiated call and as one that is not, whose
   log_softmax writes no lse), on the
   first rows of every size, with a ``where`` mask and non-finite rows checked
   against the masking table. A failed check is reported, the timings still
   run (to say whether a kernel is worth mending), and the exit status is 1;
2. timings, forward and backward separately, of softmax and log_softmax with
   ``implementation="pallas"`` and ``"xla"``, and of ``jax.nn``'s, at 4096 x {1024, 4096,
   16384}, 1024 x 65536 and 128 x 262144 (and softmax with a causal ``where``
   mask at 4096 x {4096, 16384}), in bfloat16 and float32, as the
   median of several samples of back-to-back programs, each of which calls the
   op on 2 to 16 distinct buffers that move 256 MiB together (one Python
   dispatch per program, and no size served from the 50-60 MB L2); each
   program warms up for 0.1 s, and each sample times the contenders in turn,
   with an elementwise op that moves the same bytes (``-x`` forward, ``s * g``
   backward): the ceiling at that size, where launch and tail weigh more than
   in a 1 GiB copy;
3. the measured copy bandwidth (``-x`` over a 1 GiB buffer), against which the
   achieved bandwidth is reported: forward moves 2 arrays (read x, write s),
   backward 3 (read s and g, write dx); then the issue's two targets per cell
   (>= 85% of copy, faster than ``jax.nn.softmax`` except where jax.nn sits at
   the ceiling: 95% of copy, or of the elementwise op's speed), and what
   ``implementation=None`` runs in each cell (``defaults``: the backend it
   resolves to, and its time over the fastest pairing of the kernels' and our
   XLA path's forward and backward, which says whether ``_pallas.preferred``
   chose well);
4. the losses (``--no-losses`` skips them; perhaps 60 s on an H100, mostly
   compiling; cells that would start after 120 s or past ``--budget`` are
   skipped and listed):
   ``softmax_cross_entropy_with_integer_labels`` and ``softmax_cross_entropy``
   with ``implementation="pallas"`` (the forward's row statistics from a
   Pallas kernel) checked against float64 as in step 1 (the loss and the
   gradient w.r.t. the logits, a ``where``-masked and a fully masked row, and
   a NaN and a +inf row, among them), then timed, interleaved as in step 2
   but with 10 calls and 5 samples: the jitted mean loss, forward alone and
   ``value_and_grad``, against ``implementation="xla"`` and optax's (left
   out, with a note, if optax does not import), at 4096 x {32000, 50257,
   128256} (``--loss-sizes``) with integer labels, 4096 x 32000 with soft
   labels, and the first size in the first dtype with integer labels and a
   padding mask (one flag per example). GB/s count the logits (and soft
   labels) read once forward, and in forward + backward twice (the backward
   reads them again) plus the gradient written. A failure here is recorded
   and the variants still run; a failed check makes the exit status 1, as in
   step 1;
5. tuning data for the next change: the Mosaic GPU kernels called directly with
   a few ``gpu.Config`` variants (``VARIANTS``: row statistics in two passes on
   16-bit rows kept whole; the forward's streamed 16-bit rows in the old 8 KiB
   chunks, and all 16-bit rows in chunks of 8192 elements; ragged rows by bulk
   copies, or read twice with the second pass first to last; short rows held
   in registers; log_softmax's backward with its pairs of rows past 64 KiB
   split in two, or with its live flag in a pass of its own, the old default;
   streamed rows shared by clusters of 2 and of 8), in child processes, within
   ``--variants-timeout`` seconds (a cell that hangs is killed after 60 s and a
   new child goes on with the rest), each checked against float64 as in step 1
   (softmax and log_softmax, whose first row is then all -inf; on the whole
   array, compared with float64 at the rows ``variant_rows`` picks, and every
   row with XLA's float32 on the GPU within ``SCREEN_EPS``) before softmax
   (log_softmax, for a variant named ``LOG ...``) is timed, in turn with the
   default of its cell within every sample (``--no-variants`` skips this part;
   ``--variant-shapes`` takes some of the variants' shapes, in a given order;
   ``--variants-done FILE`` skips the cells listed there and adds those it
   runs, so that a second call goes on where the first stopped).

Writes ``gpu_pallas-<date>.json`` and ``.md`` under ``--out``, after every
step (the variants' rows as they come in). ``--budget`` (540 s) bounds the
whole script: the variants get what is left of it, at most
``--variants-timeout``. Steps 1-4 use the public API only; step 5 calls
``gpu.py``. ``--allow-cpu`` runs the script on the CPU with the XLA (and optax)
contenders only, the losses' check on the default implementation (a smoke test
of the script itself: no numbers to report). ``--lower-only`` lowers every
kernel the script would run for ``cuda`` and exits: a preflight on any machine
(the tests run it), which finds a kernel over the shared memory at its real
shape before a GPU run does.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxsoftmax
from benchmarks.report import _git_commit
from jaxsoftmax import _backend
from jaxsoftmax._pallas import gpu

SIZES = [(4096, 1024), (4096, 4096), (4096, 16384), (1024, 65536), (128, 262144)]
# Checked and timed after SIZES (the paths added last: were one to bring the
# process down, what SIZES measured is saved already): LLaMA-2's vocabulary,
# 32000 columns, 125 sub-rows of 256 in chunks of 16, the last overlapping the
# one before (gpu.Plan.ov; kept whole in 16 bits, split in float32);
# GPT-2's, 50257, a ragged row (no TMA: its interior bulk copied); and
# nanoGPT's, 50304 (GPT-2's padded to a multiple of 64): 393 sub-rows of 128 in
# 13 chunks, the last overlapping, the forward split in one part, the backward's
# pairs streamed (13 chunks split over no cluster), so that `None` runs XLA's
# backward for log_softmax there.
NEW_SIZES = [(4096, 32000), (4096, 50257), (4096, 50304)]
# Checked only, with NEW_SIZES: the other paths of overlapping chunks (125
# sub-rows of 8 and 513 of 8, split in one part; 4375 of 16, split forward in 2
# parts, streamed backward), and ragged rows of 129 and 4097.
NEW_CHECK_COLS = [1000, 4104, 70000, 129, 4097]
DTYPES = ["bfloat16", "float32"]
BATCH_BYTES = 256 << 20  # moved per timed program; > 4x the L2 of an H100 or H200
CHECK_ROWS = 8


def _failed(what, e) -> str:
  """Prints the whole traceback (the log is what comes back from the GPU machine) and
  returns a short form for the results."""
  print(f"gpu_pallas.py: {what} failed:", file=sys.stderr)
  traceback.print_exception(e, file=sys.stderr)
  sys.stderr.flush()
  return f"{type(e).__name__}: {e}"[:2000]


def _value_and_vjp(f, x, g):
  """``f(x)`` and its VJP at ``g``, as float32 NumPy arrays."""
  y, vjp = jax.vjp(f, x)
  (dx,) = vjp(g)
  return np.asarray(y, np.float32), np.asarray(dx, np.float32)


def _failed_check(row: dict, what: str, e) -> dict:
  """A correctness row for a call that failed to compile or run (``_failed``)."""
  return dict(row, fwd_rel_err=np.inf, bwd_rel_err=np.inf, ok=False, error=_failed(what, e))


def _progress(it, desc):
  try:
    from tqdm import tqdm

    return tqdm(it, desc=desc, file=sys.stderr)
  except ImportError:
    return it


OPS = ("softmax", "log_softmax")
# softmax with a `where` mask, as the attention hook calls it: the Pallas path
# masks around the kernel (two more XLA passes), so `implementation=None` keeps
# masked calls on XLA until this says otherwise. Timed at these sizes, with a
# causal mask stretched over the row (entry j of row i kept iff j <= i * cols /
# rows), for information: the mask's bytes are not counted, and the issue's
# targets are without it.
WHERE = "softmax, where"
WHERE_SIZES = [(4096, 4096), (4096, 16384)]


def _causal(shape):
  i = jnp.arange(shape[0])[:, None]
  return jnp.arange(shape[1])[None, :] <= i * shape[1] // shape[0]


def _contenders(pallas: bool, op: str = "softmax"):
  """Name: ``f(x, *extra)``; the ``WHERE`` op's functions take the mask too."""
  if op == WHERE:
    out = {}
    if pallas:
      out["pallas"] = lambda x, w: jaxsoftmax.softmax(x, where=w, implementation="pallas")
    out["jaxsoftmax-xla"] = lambda x, w: jaxsoftmax.softmax(x, where=w, implementation="xla")
    out["jax.nn.softmax"] = lambda x, w: jax.nn.softmax(x, axis=-1, where=w)
    return out
  ours, ref = getattr(jaxsoftmax, op), getattr(jax.nn, op)
  out = {}
  if pallas:
    out["pallas"] = lambda x: ours(x, implementation="pallas")
  out["jaxsoftmax-xla"] = lambda x: ours(x, implementation="xla")
  out[f"jax.nn.{op}"] = lambda x: ref(x, axis=-1)
  return out


# ------------------------------------------------------------------- correctness


def _ref64(x, w, g, log):
  """float64 NumPy softmax/log_softmax and VJP over the last axis, with the masking table."""
  x = np.where(w, x.astype(np.float64), -np.inf)
  g = np.where(w, g.astype(np.float64), 0.0)
  m = np.max(x, -1, keepdims=True)
  m = np.where(m == -np.inf, 0.0, m)
  e = np.exp(x - m)
  d = np.sum(e, -1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    if log:
      y = np.where(w, x - np.where(d == 0, 0.0, m + np.log(d)), -np.inf)
      dx = np.where(d == 0, 0.0, g - np.exp(y) * np.sum(g, -1, keepdims=True))
    else:
      y = np.where(w, e / np.where(d == 0, 1.0, d), 0.0)
      dx = np.where(w, y * (g - np.sum(g * y, -1, keepdims=True)), 0.0)
  return y, dx


def _rel(a, r):
  """``||a - r|| / ||r||`` over the finite entries of ``r``; inf if the non-finite
  entries (NaN, +-inf) of ``a`` and ``r`` differ anywhere."""
  a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
  fin = np.isfinite(r)
  inf = np.isinf(r)
  if not (np.array_equal(np.isnan(a), np.isnan(r)) and np.array_equal(a[inf], r[inf])):
    return float("inf")
  if not np.all(np.isfinite(a[fin])):
    return float("inf")
  den = np.linalg.norm(r[fin])
  num = np.linalg.norm(a[fin] - r[fin])
  return float(num / den) if den else float(num)


def check(sizes, dtypes, most_rows: int = CHECK_ROWS) -> list[dict]:
  """Each size's first ``most_rows`` rows (at most) against float64."""
  rows = []
  for (r, cols), dt in _progress([(s, d) for s in sizes for d in dtypes], "correctness"):
    dtype = jnp.dtype(dt)
    eps = float(jnp.finfo(dtype).eps)
    k = jax.random.split(jax.random.key(cols), 3)
    n = max(CHECK_ROWS, min(r, most_rows))
    x = np.array(3 * jax.random.normal(k[0], (n, cols), jnp.float32)).astype(dtype)
    w = np.array(jax.random.bernoulli(k[1], 0.8, (n, cols)))
    w[2] = False  # fully masked
    x[3] = -np.inf  # all -inf
    x[4, 5] = np.nan
    x[5, 7] = np.inf
    g = np.array(jax.random.normal(k[2], (n, cols), jnp.float32)).astype(dtype)
    for log in (False, True):
      fn = jaxsoftmax.log_softmax if log else jaxsoftmax.softmax
      row = dict(op="log_softmax" if log else "softmax", cols=cols, dtype=dt,
                 fwd_tol=4 * eps, bwd_tol=8 * eps, rows=n)  # fmt: skip
      try:
        ours = jax.jit(lambda x, w, fn=fn: fn(x, where=w, implementation="pallas"))
        y, dx = _value_and_vjp(lambda v, w=w, ours=ours: ours(v, w), x, g)
        # A call that is not differentiated: log_softmax's forward without the lse.
        y_alone = np.asarray(ours(x, w), np.float32)
      except Exception as e:  # a kernel that fails to compile or run: record it, go on
        rows.append(_failed_check(row, f"check {row['op']} {cols} {dt}", e))
        continue
      ry, rdx = _ref64(np.asarray(x, np.float32), w, np.asarray(g, np.float32), log)
      ef, eb = max(_rel(y, ry), _rel(y_alone, ry)), _rel(dx, rdx)
      rows.append(dict(row, fwd_rel_err=ef, bwd_rel_err=eb, ok=ef <= 4 * eps and eb <= 8 * eps))
  return rows


# ------------------------------------------------------------------------ timing


def _buffers(shape, dtype, n_arrays):
  """2 to 16 distinct random arrays: enough that one pass over all of them moves
  ``BATCH_BYTES`` (``n_arrays`` arrays of this shape per call), far more than the L2."""
  nbytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize * n_arrays
  count = int(min(16, max(2, -(-BATCH_BYTES // nbytes))))
  keys = jax.random.split(jax.random.key(0), count)
  return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys]


WARM_S = 0.1  # s: each program runs at least this long before it is timed


def _build(fn, argsets):
  """``fn`` on every argument set in one jitted program, compiled and run for at
  least WARM_S seconds: ``(program, argsets)``, or the exception it raised.

  One dispatch from Python then starts ``len(argsets)`` kernels: the first GPU
  run showed that single calls on small arrays time the host (about 50 us per
  call for every contender at 4096 x 1024), not the kernel."""
  one = jax.jit(fn)
  batch = jax.jit(lambda sets: [one(*a) for a in sets])
  try:
    jax.block_until_ready(batch(argsets))  # compile
    t = time.perf_counter()
    while time.perf_counter() - t < WARM_S:
      jax.block_until_ready(batch(argsets))
  except Exception as e:
    return e
  return batch, argsets


def _sample(built, calls, samples) -> list:
  """Median seconds per call of each ``_build`` result, or the exception that
  building or running it raised: after one untimed round through all of them
  (the later ones compiled while the GPU idled), each sample times ``calls``
  back-to-back runs of every program in turn, in reverse order every other
  sample, so that they share the GPU's clock and thermal state. (The second
  GPU run timed the contenders one after the other, and its very first timing,
  Pallas bfloat16 forward at 4096 x 1024, came out at 3x jax.nn's time with no
  cause in the kernel.)"""
  out = [b if isinstance(b, Exception) else [] for b in built]

  def run(k, n):
    batch, argsets = built[k]
    r = None
    for _ in range(n):
      r = batch(argsets)
    jax.block_until_ready(r)

  for i in range(-1, samples):  # -1: the untimed round
    order = range(len(built)) if i % 2 == 0 else reversed(range(len(built)))
    for k in order:
      if isinstance(out[k], Exception):
        continue
      t = time.perf_counter()
      try:
        run(k, 1 if i < 0 else calls)
      except Exception as e:  # recorded; the other programs are still timed
        out[k] = e
        continue
      if i >= 0:
        out[k].append((time.perf_counter() - t) / (calls * len(built[k][1])))
  return [o if isinstance(o, Exception) else statistics.median(o) for o in out]


def _interleaved(programs, calls, samples) -> list:
  """Median seconds per call of each ``(fn, argsets)``, timed in turn (``_sample``),
  or the exception that compiling or warming it up raised."""
  return _sample([_build(fn, argsets) for fn, argsets in programs], calls, samples)


def _time(fn, argsets, calls, samples) -> float:
  """Median seconds per call of ``fn(*args)`` (``_interleaved`` of one program)."""
  (t,) = _interleaved([(fn, argsets)], calls, samples)
  if isinstance(t, Exception):
    raise t
  return t


def copy_bandwidth(calls, samples, n=1 << 28) -> float:
  """Bytes per second of ``-x`` (one read, one write) over ``n`` float32 (1 GiB)."""
  xs = _buffers((n,), jnp.float32, 1)[:2]
  neg = jax.jit(lambda x: -x)
  return 2 * xs[0].nbytes / _time(neg, [(x,) for x in xs], calls, samples)


def variant_config(name: str, dtype: str):
  """VARIANTS[name]'s ``gpu.Config`` for ``dtype``, or None where it gives
  configs by dtype and none for this one (a config by dtype is not a variant of
  the others)."""
  cfg = VARIANTS[name][0]()
  return cfg.get(dtype) if isinstance(cfg, dict) else cfg


def _cells(pairs, desc):
  """Per (shape, dtype) of ``pairs``: rotating inputs ``xs``, cotangents ``gs`` and
  bytes per array."""
  for shape, dt in _progress(pairs, desc):
    xs = _buffers(shape, dt, 2)
    gs = _buffers(shape, dt, 1)[: len(xs)]
    yield shape, dt, xs, gs, int(np.prod(shape)) * jnp.dtype(dt).itemsize


def _timed(cell, t_fwd, t_bwd, nbytes):
  # forward moves 2 arrays (x, s), backward 3 (s, g, dx)
  return dict(cell, fwd_s=t_fwd, bwd_s=t_bwd, fwd_bytes_per_s=2 * nbytes / t_fwd,
              bwd_bytes_per_s=3 * nbytes / t_bwd)  # fmt: skip


# The ceiling of a cell: an elementwise op that moves the same bytes as the
# forward (``-x``: read x, write one array) and as the backward (``s * g``: read
# two, write one), timed with the contenders. What 4 GB of copy bandwidth says
# of a 1 GiB buffer need not hold of 8 MB at 4096 x 1024, where the launch and
# the last wave of CTAs weigh more.
ELEMENTWISE = "elementwise (same bytes)"


def timings(
  sizes, dtypes, pallas, calls, samples, on_cell=lambda rows: None, where_sizes=WHERE_SIZES
) -> list[dict]:
  """Every contender at every size (and ``WHERE`` at ``where_sizes``), and the
  cell's ``ELEMENTWISE``; ``on_cell(rows)`` after each (shape, dtype)."""
  rows = []
  for shape, dt, xs, gs, nbytes in _cells([(s, d) for s in sizes for d in dtypes], "timing"):
    ops = [*OPS, WHERE] if shape in where_sizes else OPS
    for op in ops:
      extra = (_causal(shape),) if op == WHERE else ()
      names, fwds, bwds, failed = [ELEMENTWISE], [], [], {}
      fwds.append((lambda x: -x, [(x,) for x in xs]))
      bwds.append((lambda s, g: s * g, list(zip(xs, gs, strict=True))))
      for name, f in _contenders(pallas, op).items():
        try:
          # Backward alone: the residuals are computed once, then only the VJP is timed.
          vjps = [jax.vjp(lambda x, f=f, e=extra: f(x, *e), x)[1] for x in xs]
        except Exception as e:
          failed[name] = e
          continue
        names.append(name)
        fwds.append((f, [(x, *extra) for x in xs]))
        bwds.append((lambda vjp, g: vjp(g)[0], list(zip(vjps, gs, strict=True))))
      # The contenders in turn within each sample (``_interleaved``).
      t_fwds = _interleaved(fwds, calls, samples)
      t_bwds = _interleaved(bwds, calls, samples)
      del fwds, bwds, vjps
      for name in [*_contenders(pallas, op), ELEMENTWISE]:
        cell = dict(op=op, contender=name, rows=shape[0], cols=shape[1], dtype=dt)
        if name in failed:
          e = failed[name]
        else:
          t_fwd, t_bwd = t_fwds[names.index(name)], t_bwds[names.index(name)]
          e = next((t for t in (t_fwd, t_bwd) if isinstance(t, Exception)), None)
        if e is not None:  # record a failing contender; the others are timed
          rows.append(dict(cell, error=_failed(f"timing {op} {name} {shape} {dt}", e)))
          continue
        if name == "pallas" and op != WHERE:  # what implementation=None picks here
          cell["default"] = _backend.resolve(op, None, xs[0], (1,), None)
        rows.append(_timed(cell, t_fwd, t_bwd, nbytes))
        print(
          f"{op} {name} {shape} {dt}: fwd {t_fwd * 1e6:.1f} us, bwd {t_bwd * 1e6:.1f} us",
          flush=True,
        )
    on_cell(rows)
  return rows


# ------------------------------------------------------------------------ losses

# The losses' forward with ``implementation="pallas"``: each row's max and
# normaliser from a stats-only kernel (the logits read once, 2 floats a row
# written); the rest of the loss and the whole backward in XLA.
# ``implementation=None`` takes it where it was timed faster here
# (``_pallas.preferred``; H200, T2049Z). Integer labels at LLaMA-2's
# vocabulary, GPT-2's (a ragged row) and LLaMA-3's (128256); soft labels at
# LLaMA-2's only.
LOSS_SIZES = [(4096, 32000), (4096, 50257), (4096, 128256)]
SOFT_LOSS_SIZES = [(4096, 32000)]
INTEGER, SOFT = "integer labels", "soft labels"
# Integer labels with a padding mask, one flag per example (1 in 32 False), as
# `where=labels != -100` gives: the Pallas path empties those examples'
# statistics after its kernel rather than masking the logits before it.
PADDED = "integer labels, padding mask"
# About 60 s on an H100, most of it compiling (6 programs a cell): fewer calls
# and samples than the other steps, and cells that would start after LOSSES_S
# seconds are skipped and listed.
LOSS_CALLS, LOSS_SAMPLES = 10, 5
LOSSES_S = 120


def _loss(kind, impl):
  """The per-example loss ``f(x, labels, where=None)`` of ``kind`` (``INTEGER`` or
  ``SOFT``) with ``implementation=impl``; None passes no ``implementation``."""
  fn = jaxsoftmax.softmax_cross_entropy
  if kind == INTEGER:
    fn = jaxsoftmax.softmax_cross_entropy_with_integer_labels
  kw = {} if impl is None else dict(implementation=impl)
  return lambda x, y, where=None: fn(x, y, where=where, **kw)


def _optax():
  """optax, or the reason it is not there (the optax contenders are then left out)."""
  try:
    import optax
  except Exception as e:  # ImportError, or a warning turned into an error
    return None, f"optax not timed: {type(e).__name__}: {e}"
  return optax, None


def _loss_contenders(kind, pallas):
  """Name: per-example loss ``f(x, labels)``; and a note if optax is missing."""
  out = {}
  if pallas:
    out["pallas"] = _loss(kind, "pallas")
  out["jaxsoftmax-xla"] = _loss(kind, "xla")
  optax, note = _optax()
  if optax is not None:
    ref = optax.softmax_cross_entropy_with_integer_labels
    out["optax"] = ref if kind == INTEGER else optax.softmax_cross_entropy
  return out, note


def _loss_ref64(x, labels, w, g, kind):
  """float64 NumPy loss per row and its gradient w.r.t. the logits under the
  per-row cotangent ``g``, from the naive definition: ``lse(x) - x[label]`` and
  ``(softmax(x) - onehot) * g``; ``-sum(y * log_softmax(x))`` and ``(softmax(x)
  * sum(y) - y) * g``. Classes that ``w`` masks are left out (of the softmax and
  of the sums); a fully masked row gives 0 and a zero gradient."""
  x = np.where(w, x.astype(np.float64), -np.inf)
  g = g.astype(np.float64)[:, None]
  m = np.max(x, -1, keepdims=True)
  live = m > -np.inf
  m = np.where(live, m, 0.0)
  e = np.exp(x - m)
  d = np.sum(e, -1, keepdims=True)
  lse = m + np.log(np.where(live, d, 1.0))
  p = e / np.where(live, d, 1.0)
  if kind == INTEGER:
    onehot = np.arange(x.shape[1])[None, :] == labels[:, None]
    loss = lse[:, 0] - np.where(onehot, np.where(w, x, 0.0), 0.0).sum(-1)
    dx = (p - onehot) * g
  else:
    y = np.where(w, labels.astype(np.float64), 0.0)
    loss = -np.sum(y * np.where(w, x - lse, 0.0), -1)
    dx = (p * np.sum(y, -1, keepdims=True) - y) * g
  return np.where(live[:, 0], loss, 0.0), np.where(live, dx, 0.0)


def check_losses(sizes, dtypes, impls, most_rows=CHECK_ROWS) -> list[dict]:
  """Both losses with each of ``impls`` (None: the default) on each size's first
  ``most_rows`` rows (at most) against float64 (``_loss_ref64``), with the
  tolerances of `check`: row 1 has a ``where`` mask, row 2 is fully masked,
  row 3's soft labels sum to 1/2, rows 4 and 5 hold a NaN and a +inf, which
  must make their loss and gradient NaN (and only theirs). (A few seconds a
  cell, mostly compiling: not bounded by the step's deadline, which only the
  timings heed.)"""
  rows = []
  cells = [(s, d, k, i) for s in sizes for d in dtypes for k in (INTEGER, SOFT) for i in impls]
  for (r, cols), dt, kind, impl in _progress(cells, "losses: correctness"):
    dtype = jnp.dtype(dt)
    eps = float(jnp.finfo(dtype).eps)
    row = dict(loss=kind, implementation=impl or "default", cols=cols, dtype=dt,
               fwd_tol=4 * eps, bwd_tol=8 * eps)  # fmt: skip
    k = jax.random.split(jax.random.key(cols + 1), 5)
    n = max(CHECK_ROWS, min(r, most_rows))
    row["rows"] = n
    x = np.array(3 * jax.random.normal(k[0], (n, cols), jnp.float32)).astype(dtype)
    ints = np.array(jax.random.randint(k[1], (n,), 0, cols))
    w = np.ones((n, cols), bool)
    w[1] = np.array(jax.random.bernoulli(k[2], 0.8, (cols,)))
    w[1, ints[1]] = True  # (a label at a masked class contributes its logit, as in optax)
    w[2] = False  # fully masked
    x[4, cols // 2], x[5, cols // 3] = np.nan, np.inf
    labels = ints
    if kind == SOFT:
      s = np.exp(2 * np.array(jax.random.normal(k[3], (n, cols), jnp.float32), np.float64))
      s /= s.sum(-1, keepdims=True)
      s[3] *= 0.5
      labels = s.astype(dtype)
    g = np.array(jax.random.normal(k[4], (n,), jnp.float32)).astype(dtype)
    try:
      ours = jax.jit(_loss(kind, impl))
      loss, dx = _value_and_vjp(lambda v, y=labels, w=w, ours=ours: ours(v, y, where=w), x, g)
    except Exception as e:  # a kernel that fails to compile or run: record it, go on
      rows.append(_failed_check(row, f"check {kind} {impl} {cols} {dt}", e))
      continue
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    labels = labels if kind == INTEGER else f32(labels)
    bad = np.zeros(n, bool)
    bad[[4, 5]] = True  # NaN and +inf: NaN loss and gradient, only there
    nan_ok = bool(np.isnan(loss[bad]).all() and np.isnan(dx[bad]).all())
    nan_ok = nan_ok and bool(np.isfinite(loss[~bad]).all() and np.isfinite(dx[~bad]).all())
    r_loss, r_dx = _loss_ref64(f32(x)[~bad], labels[~bad], w[~bad], f32(g)[~bad], kind)
    ef, eb = _rel(loss[~bad], r_loss), _rel(dx[~bad], r_dx)
    ok = ef <= 4 * eps and eb <= 8 * eps and nan_ok
    rows.append(dict(row, fwd_rel_err=ef, bwd_rel_err=eb, nan_rows_ok=nan_ok, ok=ok))
  return rows


def _loss_labels(kind, shape, dt, count):
  """``count`` label arrays for rotating logits: class ids, or distributions."""
  keys = jax.random.split(jax.random.key(1), count)
  if kind == INTEGER:
    return [jax.random.randint(k, shape[:1], 0, shape[1]) for k in keys]
  return [jax.nn.softmax(jax.random.normal(k, shape, jnp.float32)).astype(dt) for k in keys]


def loss_timings(
  cells, pallas, calls, samples, on_cell=lambda rows, notes: None, deadline=float("inf")
) -> tuple[list[dict], list[str]]:
  """Each ``(kind, shape, dtype)`` of ``cells``: the mean loss of every contender
  (``_loss_contenders``) jitted, forward alone and ``value_and_grad`` w.r.t. the
  logits, each direction's contenders in turn within every sample
  (``_interleaved``), on rotating buffers. Bytes: the logits (and soft labels)
  read once forward; in fwd+bwd read again by the backward, which recomputes
  the softmax from them, and the gradient written. Returns the rows and notes
  (optax missing, cells skipped after ``deadline``); ``on_cell(rows, notes)``
  after each cell."""
  rows, notes = [], []
  for kind, shape, dt in _progress(cells, "losses: timing"):
    if time.monotonic() > deadline:
      notes.append(f"{kind} {shape[0]}x{shape[1]} {dt}: skipped, no time left")
      continue
    base = INTEGER if kind == PADDED else kind
    contenders, note = _loss_contenders(base, pallas)
    if note and note not in notes:
      notes.append(note)
    nbytes = int(np.prod(shape)) * jnp.dtype(dt).itemsize
    read = 2 * nbytes if kind == SOFT else nbytes  # logits (and soft labels)
    xs = _buffers(shape, dt, 3 if kind == SOFT else 2)
    labels = _loss_labels(base, shape, dt, len(xs))
    # (The padding mask is an argument, made outside the timed programs.)
    masks = [y % 32 != 0 if kind == PADDED else None for y in labels]
    argsets = list(zip(xs, labels, masks, strict=True))
    fwds, fwd_bwds = [], []
    for f in contenders.values():

      def mean(x, y, w, f=f):
        return jnp.mean(f(x, y) if w is None else f(x, y, where=w))

      fwds.append((mean, argsets))
      fwd_bwds.append((jax.value_and_grad(mean), argsets))
    t_fwds = _interleaved(fwds, calls, samples)
    t_fwd_bwds = _interleaved(fwd_bwds, calls, samples)
    del fwds, fwd_bwds, argsets, xs
    timed = {}
    for name, t_f, t_fb in zip(contenders, t_fwds, t_fwd_bwds, strict=True):
      cell = dict(loss=kind, contender=name, rows=shape[0], cols=shape[1], dtype=dt)
      e = next((t for t in (t_f, t_fb) if isinstance(t, Exception)), None)
      if e is not None:  # record a failing contender; the others are timed
        rows.append(dict(cell, error=_failed(f"timing {kind} {name} {shape} {dt}", e)))
        continue
      timed[name] = cell = dict(cell, fwd_s=t_f, fwd_bwd_s=t_fb, fwd_bytes_per_s=read / t_f,
                                fwd_bwd_bytes_per_s=(2 * read + nbytes) / t_fb)  # fmt: skip
      rows.append(cell)
      print(
        f"{kind} {name} {shape} {dt}: fwd {t_f * 1e6:.1f} us, fwd+bwd {t_fb * 1e6:.1f} us",
        flush=True,
      )
    for name, cell in timed.items():  # time over xla's and optax's, where both ran
      for ref in ("jaxsoftmax-xla", "optax"):
        if ref in timed and ref != name:
          for d in ("fwd", "fwd_bwd"):
            cell[f"{d}_vs_{ref.removeprefix('jaxsoftmax-')}"] = (
              cell[f"{d}_s"] / timed[ref][f"{d}_s"]
            )
    on_cell(rows, notes)
  return rows, notes


def losses_markdown(losses, copy_bw) -> list[str]:
  """The "## Losses" section: the checks, the timings and Pallas's ratios."""
  checks, rows = losses.get("checks", []), losses.get("timings", [])
  lines = ["", "## Losses", ""]
  if not all(c["ok"] for c in checks):
    lines += ["**The losses' correctness check FAILED.**", ""]
  lines += [f"- {n}" for n in losses.get("notes", [])]
  lines += [""] if losses.get("notes") else []
  if checks:
    lines += [
      "Correctness vs float64 (first rows; row 1 with a `where` mask, row 2 fully masked; "
      "rows 4 and 5 hold a NaN and a +inf, and must be NaN, and only they):",
      "",
      "| loss | implementation | rows | cols | dtype | fwd err / tol | bwd err / tol | ok |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
      ok = (
        "yes"
        if c["ok"]
        else "**NO**" + (f" ({c['error'].splitlines()[0][:80]})" if "error" in c else "")
      )
      lines.append(
        f"| {c['loss']} | {c['implementation']} | {c.get('rows', '-')} | {c['cols']} "
        f"| {c['dtype']} "
        f"| {c['fwd_rel_err']:.2e} / {c['fwd_tol']:.1e} "
        f"| {c['bwd_rel_err']:.2e} / {c['bwd_tol']:.1e} | {ok} |"
      )
    lines.append("")
  if not rows:
    return lines
  lines += [
    "Median per call of the jitted mean loss: forward, and forward + backward "
    "(`value_and_grad` w.r.t. the logits). GB/s count the logits (soft labels: and the "
    "labels) read once forward; in fwd+bwd twice (the backward reads them again) and the "
    "gradient written; % copy is of the measured copy.",
    "",
    "| loss | shape | dtype | contender | fwd us | fwd GB/s | % copy | fwd+bwd us "
    "| fwd+bwd GB/s | % copy |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    head = f"| {r['loss']} | {r['rows']}x{r['cols']} | {r['dtype']} | {r['contender']} "
    if "error" in r:
      lines.append(head + f"| failed: {r['error'].splitlines()[0][:80]} |")
      continue
    cells = []
    for d in ("fwd", "fwd_bwd"):
      bps = r[f"{d}_bytes_per_s"]
      cells += [f"{r[f'{d}_s'] * 1e6:.1f}", f"{bps / 1e9:.0f}", f"{100 * bps / copy_bw:.0f}%"]
    lines.append(head + "| " + " | ".join(cells) + " |")
  ours = [r for r in rows if r["contender"] == "pallas" and "error" not in r]
  if ours:
    lines += ["", "Pallas's time over XLA's and optax's (below 1: Pallas is faster):", ""]
    lines.append("| loss | shape | dtype | fwd: pallas / xla | pallas / optax "
                 "| fwd+bwd: pallas / xla | pallas / optax |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|")
    for r in ours:
      vs = [r.get(f"{d}_vs_{ref}") for d in ("fwd", "fwd_bwd") for ref in ("xla", "optax")]
      vs = " | ".join("-" if v is None else f"{v:.2f}x" for v in vs)
      lines.append(f"| {r['loss']} | {r['rows']}x{r['cols']} | {r['dtype']} | {vs} |")
  return lines


LONG = [(1024, 65536), (128, 262144)]

# What the H200 runs settled (gpu_pallas-2026-11-26T0031Z and T0041Z): the write
# order of streamed rows (last to first), the backward's whole-row budget (200
# KiB), and that neither 4 or 6 pipeline stages nor 1-2 persistent CTAs per SM
# lift streamed rows past 67% of copy (reading each row twice). Then (T0511Z,
# and gpu_variants-2026-11-26T0518Z with 50 calls and 15 samples):
# - the backward's pairs of rows split over a cluster in 64 KiB parts ran at
#   0.81-0.94x of the streamed time at 1024 x 65536, in both runs: now the
#   default (``bwd_split_bytes``); 200 KiB parts in persistent clusters, 0.81-0.84x;
# - split forwards: 0.91x in float32 (64 KiB parts, 4 CTAs), 1.17-1.41x in
#   bfloat16 and with larger parts; nothing gained at 128 x 262144;
# - several short rows per CTA (``block_bytes``): 1.1-2.1x slower; a ring of
#   row blocks (``ring_slots``): 0.96-1.14x the default's time at 4096 x {1024,
#   4096} in the second run (the first run's 0.72-0.80x at 4096 x 1024 did not
#   repeat), 1.06-1.23x at 4096 x 16384; the read-only drain: within 1%. Those
#   forms were removed from gpu.py on 2026-11-27.
# Then on an H100 (T1329Z; the variants at 1024 x 65536 and 128 x 262144, in
# that order, before the budget ran out):
# - rows of up to 200 KiB held whole, or split in 200 KiB parts, by persistent
#   clusters, with per-element statistics and approximate math: forward 0.81x
#   (bfloat16) and 0.79x (float32) of the streamed time at 1024 x 65536, now the
#   forward's default (``split_bytes``, ``split_cluster`` 2, ``split_ctas``);
#   0.94x at 128 x 262144 bfloat16 (4 parts), where 6 stages took 0.81x: now the
#   default for 16-bit streamed rows (``stages=None``, ``stream_bytes``). The
#   same for the backward: 0.97-1.02x at 1024 x 65536, 0.87x at 128 x 262144
#   bfloat16 (float32 not reached);
# - per-element statistics and approximate math on streamed rows: 0.89-1.01x,
#   now the default on the forward's long rows (``None``); the backward's
#   0.99-1.00x;
# - streamed rows shared by clusters of 4: 0.87-1.00x, behind the above.
# Then on an H200 (T2049Z, and T2058Z with 4096 x 1024 alone before the
# variants; 1024 x 65536 and the rest not reached):
# - overlapping rows split (``split_overlap``): 0.86x / 0.81-0.84x of the
#   streamed time at 4096 x 32000 float32, 86-89% of copy: now the default;
# - log_softmax's live flag from l (``live_from_l``): the differentiated
#   forward 0.85-0.91x, the backward 0.92-0.96x at 4096 x 4096: now the default
#   (both switches were removed from gpu.py on 2026-11-27, with their old forms);
# - 16-bit forward rows in 64 KiB parts on two CTAs an SM: 1.15-1.17x at 128 x
#   262144 bfloat16; dropped there;
# - 16-bit chunks of 16 KiB (96 KiB in flight): 0.91-0.94x forward, 0.97-0.98x
#   backward at 128 x 262144 bfloat16. Not adopted: ``chunk_elems`` sets the
#   chunks of every path, timed at that one cell;
# - per-element row statistics and approximate math on rows kept whole: 0.85x and
#   0.91x forward at 4096 x 4096 bfloat16, 1.00-1.01x in float32; in two passes
#   0.83x and 1.00x (the runs disagree); the backwards 0.96-1.01x;
# - the backward's 200 KiB persistent parts at 128 x 262144: 1.04-1.07x in
#   bfloat16 (on the H100, with per-element statistics and approximate math,
#   0.87x); in float32 its pairs still stream (no change). The float32
#   forward's 96 KiB in flight: 0.99x (T2058Z). Those two are no longer timed.
# Then on the H200 again (T2249Z, T2258Z; 4096 x 32000 and 128 x 262144 not reached):
# - per-element row statistics and approximate math on 16-bit rows kept whole:
#   forward 0.95x at 4096 x 16384 bfloat16 (both runs), 0.91x at 4096 x 4096,
#   0.87x and 1.00x at 4096 x 1024: now the default there (``elementwise_stats``
#   None); in float32 0.97-1.01x, and approximate math alone 1.00-1.05x: those
#   two are no longer timed. In two passes, 0.81x and 0.96x (one-pass 0.91x and
#   0.95x in the same samples): still timed;
# - log_softmax with approximate math at 1024 x 65536: backward 0.95x
#   (bfloat16), 0.98-0.99x (float32); forward 1.00x;
# - the forward's 64 KiB parts on two CTAs an SM at 1024 x 65536: 1.04x and
#   1.07x (both runs): dropped.
# Then on an H100 (T0116Z, T0125Z; 4096 x 4096 and 1024 x 65536 float32 not
# reached):
# - log_softmax's backward with the live flag gathered in the row sum
#   (``live_in_rowsum``): 0.90x at 4096 x 32000 bfloat16, 0.99x and 1.00x at
#   4096 x 16384: now the default; with approximate math 0.95x at 4096 x 32000
#   and 1024 x 65536 bfloat16 (0.95x on the H200 before), 1.00x in float32: now
#   the default for 16-bit rows (``approx_math`` None);
# - the backward's pairs of rows past 64 KiB split in two: log_softmax 0.91x at
#   4096 x 32000 bfloat16 (still timed, on the new default), softmax 1.01x; in
#   float32 at 4096 x 16384 1.02x and 1.00x: dropped;
# - at 128 x 262144 the backward with per-element statistics and approximate
#   math 0.98-1.00x (0.96-1.01x on the H200): dropped; 16-bit chunks of 16 KiB
#   0.97x forward, 1.00x backward (0.91-0.94x / 0.97-0.98x on the H200): now
#   the forward's default (``wide_16bit_stream``);
# - two passes at 4096 x 16384 bfloat16: 1.00x / 0.99x.
# Then on the H200 (T1934Z, every cell reached):
# - ragged rows by bulk copies at 4096 x 50257: forward 0.87x (bfloat16) and
#   0.94x (float32), backward 0.63x (bfloat16 pairs bulk copied) and 1.00x
#   (float32: s bulk copied, g read twice): now the default
#   (``ragged_bulk_bytes``); ragged rows read twice with the second pass first
#   to last, 1.01-1.03x: no longer timed;
# - short rows in registers: 0.97-1.02x forward, 0.93-1.00x backward at 4096 x
#   1024 and 4096 x 4096: not adopted, still timed;
# - log_softmax's live flag in its own pass: 1.00x / 1.00-1.15x: the default
#   (in the row sum) holds on the H200 too; bfloat16 pairs past 64 KiB split,
#   log_softmax at 4096 x 32000: 1.03x / 0.88x;
# - 16-bit chunks of 8192 elements: 1.37x / 0.99x at 4096 x 16384, 0.92x /
#   0.96x at 1024 x 65536; the streamed forward's 8 KiB chunks 1.08x (the
#   default's 16 KiB hold); streamed clusters of 2: 0.98-1.03x / 0.99x, of 8:
#   1.02-1.95x / 0.96-0.98x.
# No longer timed: log_softmax's live flag in its own pass, two passes, the
# 8 KiB streamed chunks, streamed clusters of 2; 16-bit chunks of 8192 elements
# at 1024 x 65536 only. Then on the H200 (T1949Z, T1952Z, ragged rows, bulk
# copies the default): the direct reads took 1.16x and 1.06x the forward's time
# at 4096 x 50257 (log_softmax 1.28x, 1.15x), the backward 1.57x in bfloat16
# (log_softmax 1.14x) and 0.98x in float32, where s alone was bulk copied and g
# read twice (log_softmax 0.77x): that form is now off
# (``ragged_bulk_g_twice``). At 4096 x 4097 the rows held in registers took
# 0.70x and 0.92x the bulk copies' forward time (log_softmax 0.92x, 1.00x): held
# rows keep them; the backward's bulk pairs 0.79x and 0.98x of the direct
# reads' time (log_softmax 0.92x, 0.88x).
# And from T1934Z: log_softmax's 16-bit pairs past 64 KiB split
# (``log_bwd_16bit_row_bytes``; 0.88x at 4096 x 32000 bfloat16).
# Timed next: 4096 x 50257 and 4096 x 4097 (the direct reads against the new
# defaults), then as before.

HELD = [(4096, 4096), (4096, 16384), (4096, 1024)]
VOCAB = (4096, 32000)
RAGGED = (4096, 50257)  # GPT-2's vocabulary: no TMA row pitch
NANOGPT = (4096, 50304)  # GPT-2's vocabulary padded to a multiple of 64
LLAMA3 = (4096, 128256)
RAGGED_SHORT = (4096, 4097)  # ragged rows of a few chunks (held in registers when read directly)
LOG = "log_softmax: "  # a variant timed on log_softmax rather than softmax

# Why log_softmax's backward lags softmax's where a pair of rows is kept whole
# in one CTA an SM (T2249Z): at 4096 x 32000 bfloat16 (2 x 64000 bytes) it took
# 1.41x softmax's time, at 4096 x 16384 float32 (2 x 64 KiB) 1.10x, where at
# 16384 bfloat16 (2 x 32 KiB, three CTAs an SM) 1.00x. Its extra work a row (the
# live flag, an exp an element) is hidden by nothing while one warpgroup holds
# the SM. On the H100 (T0116Z) the flag gathered in the row sum and approximate
# exp each took 0.90-0.95x its time there (both now the default). Split in two
# parts of 64 KiB (``bwd_row_bytes``), the pairs run three CTAs an SM, as 4096 x
# 32000 float32 does: 0.91x there, before those two, and 0.88x with them on the
# H200 (T1934Z): log_softmax's default since (``log_bwd_16bit_row_bytes``).


# name: (config, the shapes it is timed at); the config may be a dict of them
# by dtype name, when the variant suits only those dtypes.
VARIANTS = {
  "default": (
    lambda: gpu.Config(),
    [RAGGED, RAGGED_SHORT, HELD[2], HELD[0], VOCAB, LONG[1], LONG[0]],
  ),
  # Ragged rows read directly from HBM element by element (twice, or once where
  # held in registers: 4097 columns forward), the default before T1934Z, against
  # the bulk copies of their aligned interior (``Config.ragged_bulk_bytes``),
  # first timed on an H200 (T1934Z, T1949Z); log_softmax's too.
  "ragged rows: direct reads": (lambda: gpu.Config(ragged_bulk_bytes=0), [RAGGED, RAGGED_SHORT]),
  LOG + "ragged rows: direct reads": (
    lambda: gpu.Config(ragged_bulk_bytes=0),
    [RAGGED, RAGGED_SHORT],
  ),
  # Short rows held in registers (``Config.register_elems``): 16-byte vector
  # loads from HBM and stores from registers, no TMA, SMEM or barrier, as XLA's
  # fused softmax does; where the kernel's forward of rows kept whole in SMEM
  # took 1.11-1.18x jax.nn's time (4096 x 1024, H100, T0116Z) and 1.00-1.02x at
  # 4096 x 4096, and log_softmax's bfloat16 backward ran at 36% of copy (4096 x
  # 1024). 8192 elements: both directions at both shapes. New: first run on a GPU.
  "short rows: registers": (lambda: gpu.Config(register_elems=8192), HELD[2::-2]),
  LOG + "short rows: registers": (lambda: gpu.Config(register_elems=8192), HELD[2::-2]),
  # log_softmax's 16-bit pairs past 64 KiB kept whole, one CTA an SM, the
  # default before they split (``Config.log_bwd_16bit_row_bytes``, adopted from
  # this variant's inverse: 0.88x on the H200, T1934Z; 0.91x on the H100).
  LOG + "backward: 16-bit pairs kept whole": (
    lambda: {"bfloat16": gpu.Config(log_bwd_16bit_row_bytes=None)},
    [VOCAB],
  ),
  # 16-bit rows in chunks of 8192 elements (16 KiB, as float32's 4096) on every
  # path: the whole rows and split rows of both passes, whose 16-bit cells lag
  # float32's (H100, T0116Z: 89% against 91% of copy forward at 4096 x 16384,
  # 76% against 88% at 1024 x 65536), where the streamed forward's 16 KiB chunks
  # paid (``wide_16bit_stream``). A chunk takes 64 float32 values a thread. (At
  # 4096 x 4096 a row is one chunk either way.)
  "16-bit: chunks of 8192 elements": (
    lambda: {"bfloat16": gpu.Config(chunk_elems=8192)},
    [LONG[0]],
  ),
  # Clusters of 8: each CTA streams an eighth of the row (128 KiB in float32)
  # twice, so that the bytes read between a chunk's two reads are those of the
  # rows in flight (one or two CTAs an SM: 16-33 rows, 8-33 MiB), within the
  # 50 MB L2, rather than every row's (128 MiB at one CTA a row): the second
  # read can hit L2, which the default's reverse order finds only for the last
  # chunks. The forward, which reads each row twice and writes it once, runs
  # at 58-62% of copy there (T0116Z), close to the two thirds that three HBM
  # passes allow.
  "streamed rows: clusters of 8": (lambda: gpu.Config(stream_cluster=8), LONG[1:]),
  # float32 rows past 400 KiB split over clusters of up to 8 CTAs (parts of
  # up to 200 KiB; a chunk count that 8 divides, ``chunk_multiple``): each row
  # read from HBM once, where the streamed default reads it twice (three passes
  # of HBM traffic for two: at most about two thirds of copy; 59% on the H200
  # at 128 x 262144, T1934Z). 128 x 262144 in parts of 128 KiB over 8 CTAs,
  # LLaMA-3's 128256 in 125 KiB over 4. The 16-bit split over 4 CTAs took 0.94x
  # the streamed time at 128 x 262144, 6 stages 0.81x (H100, T1329Z); float32's
  # was never timed. New: first run on a GPU.
  "forward: float32 rows split over up to 8 CTAs": (
    lambda: {"float32": gpu.Config(split_cluster=8, chunk_multiple=8)},
    [LONG[1], LLAMA3],
  ),
  # Rows in a multiple of 8 chunks (``Config.chunk_multiple``): at 50304
  # columns 16 chunks of 26 sub-rows of 128, where the default's 13 chunks of 31
  # split over no cluster, so the backward streams its pairs of rows (and
  # `None` runs XLA's backward for log_softmax). In 16 chunks the pairs split,
  # over 8 CTAs in float32 and 4 in 16 bits (parts of 49 KiB). New: first run
  # on a GPU.
  "chunk count a multiple of 8": (lambda: gpu.Config(chunk_multiple=8), [NANOGPT]),
  LOG + "chunk count a multiple of 8": (lambda: gpu.Config(chunk_multiple=8), [NANOGPT]),
}


def _programs(cfg, log: bool, shape, dtype):
  """The 2-D kernels under ``cfg``, jitted: ``fwd(x)`` and ``bwd(out, g)``, ``out``
  what ``fwd`` returned. softmax: ``out`` is s. log_softmax, as a differentiated
  call runs it: ``out`` is l and the live flag from the forward's lse (None
  where the backward does not read it, ``gpu.bwd_reads_live``)."""
  if not log:
    fwd = lambda x: gpu.softmax_fwd_2d(x, log=False, cfg=cfg)[0]  # noqa: E731
    return jax.jit(fwd), jax.jit(lambda s, g: gpu.softmax_bwd_2d(s, g, log=False, cfg=cfg))
  need = gpu.bwd_reads_live(*shape, jnp.dtype(dtype), cfg)

  def fwd(x):
    l, lse = gpu.softmax_fwd_2d(x, log=True, cfg=cfg, lse=need)
    return l, (lse != -jnp.inf) if need else None

  def bwd(out, g):
    return gpu.softmax_bwd_2d(out[0], g, out[1], log=True, cfg=cfg)

  return jax.jit(fwd), jax.jit(bwd)


def _built(cfg, log: bool, xs, gs) -> list:
  """``_build`` of the forward and of the backward (``_programs``) over the
  arrays ``xs`` and cotangents ``gs``; the backward's inputs are what the built
  forward returned (no program of its own compiled for them). Raises what
  building the forward raised."""
  fwd, bwd = _programs(cfg, log, xs[0].shape, xs[0].dtype)
  built = _build(fwd, [(x,) for x in xs])
  if isinstance(built, Exception):
    raise built
  batch, argsets = built
  return [built, _build(bwd, list(zip(batch(argsets), gs, strict=True)))]


def _first_of(built):
  """``(fwd, bwd)`` as ``_programs`` gives them, run by the programs that
  ``_built`` compiled: each call runs the batch with its arguments in place of
  the first set, and returns the first result. The same shapes: nothing
  compiles again."""
  for b in built:
    if isinstance(b, Exception):
      raise b

  def first(k):
    batch, argsets = built[k]
    return lambda *args: batch([args, *argsets[1:]])[0]

  return first(0), first(1)


# A variant cell compares these rows with float64 (``variant_rows``): every row
# up to VARIANT_ALL_ROWS, else the first and last VARIANT_EDGE_ROWS and every
# VARIANT_ROW_STEP-th. The kernels run on the whole array, whose row count picks
# their path and grid. Variant cells took 7.5 s at 128 x 262144 and 17 s at 4096
# x 32000 (H100, T0125Z, T0116Z), growing with the array: on this 2-core
# machine the float64 reference of the whole of 4096 x 32000 takes 25 s and
# comparing its forward and backward 14 s more, where the 126 rows checked take
# 0.4 s. The step is an odd prime: the rows checked fall on every residue
# modulo a power of two (a cluster's CTAs, pairs of rows) and on as many CTAs of
# a persistent grid as there are rows checked.
VARIANT_ALL_ROWS = 512
VARIANT_EDGE_ROWS = 8
VARIANT_ROW_STEP = 37


def variant_rows(n: int) -> np.ndarray:
  """The rows, of ``n``, that a variant cell checks: row 0 first (log_softmax's
  all -inf row)."""
  if n <= VARIANT_ALL_ROWS:
    return np.arange(n)
  edges = [*range(VARIANT_EDGE_ROWS), *range(n - VARIANT_EDGE_ROWS, n)]
  return np.unique(np.concatenate([edges, np.arange(0, n, VARIANT_ROW_STEP)]))


# Every row of a variant cell is also screened on the GPU against XLA's float32
# softmax (``_row_errors``): the rows that ``variant_rows`` leaves out may not
# be wrong by more than this many eps of the input dtype, row by row. That is
# loose for a rounding error (bfloat16 output rounds a row by at most eps / 2)
# and tight for a row that a kernel got wrong (a chunk left out of a sum, a row
# written in another's place: errors of percents).
SCREEN_EPS = 16


@functools.partial(jax.jit, static_argnames="log")
def _row_errors(y, dx, x, g, log: bool):
  """The largest ``||a - r|| / ||r||`` of a row of ``y`` (softmax or log_softmax
  of ``x``) and of ``dx`` (its VJP with ``g``) against XLA's float32 values, and
  the rows where they are: ``((err_fwd, row), (err_bwd, row))``, a NaN where ``r``
  has none counting as inf. log_softmax's row 0 (all -inf) is left out."""
  x, g = x.astype(jnp.float32), g.astype(jnp.float32)
  if log:
    r = jax.nn.log_softmax(x)
    rdx = g - jnp.exp(r) * jnp.sum(g, -1, keepdims=True)
  else:
    r = jax.nn.softmax(x)
    rdx = r * (g - jnp.sum(g * r, -1, keepdims=True))

  def worst(a, b):
    num = jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32) - b), -1))
    den = jnp.sqrt(jnp.sum(jnp.square(b), -1))
    e = num / jnp.where(den == 0, 1.0, den)
    e = jnp.where(jnp.isnan(e), jnp.inf, e)
    if log:
      e = e.at[0].set(0.0)
    return jnp.max(e), jnp.argmax(e)

  return worst(y, r), worst(dx, rdx)


def _variant_check(cfg, x, g, log, eps, ref, programs=None) -> str | None:
  """None if the 2-D kernels under ``cfg`` match float64 (the tolerances of
  `check`) for softmax or log_softmax on ``x`` and ``g``, else what is off.
  ``ref(log)`` is the float64 reference at the rows ``variant_rows`` picks; every
  row is then screened against XLA's float32 (``_row_errors``, SCREEN_EPS).
  log_softmax's row 0 is made all -inf, where it must be all -inf and its
  gradient 0 (the live flag). ``programs``: ``(fwd, bwd)`` to run (by default
  ``_programs``', compiled here)."""
  fwd, bwd = programs or _programs(cfg, log, x.shape, x.dtype)
  if log:
    x = x.at[0].set(-jnp.inf)
  out = fwd(x)
  y_all, dx_all = (out[0] if log else out), bwd(out, g)
  rows = jnp.asarray(variant_rows(x.shape[0]))
  ry, rdx = ref(log)
  y, dx, k = np.asarray(y_all[rows], np.float32), np.asarray(dx_all[rows], np.float32), int(log)
  err_f, err_b = _rel(y[k:], ry[k:]), _rel(dx[k:], rdx[k:])
  empty_ok = not log or (np.all(y[0] == -np.inf) and np.all(dx[0] == 0.0))
  op = "log_softmax" if log else "softmax"
  if not (err_f <= 4 * eps and err_b <= 8 * eps and empty_ok):
    return f"wrong: {op} fwd err {err_f:.2e}, bwd err {err_b:.2e}" + (
      "" if empty_ok else ", empty row"
    )
  (sf, rf), (sb, rb) = jax.device_get(_row_errors(y_all, dx_all, x, g, log))
  if sf <= SCREEN_EPS * eps and sb <= SCREEN_EPS * eps:
    return None
  return (
    f"wrong: {op} fwd err {sf:.2e} (row {rf}), bwd err {sb:.2e} (row {rb}) against XLA's "
    "float32, the worst rows"
  )


def _paths(shape, dtype, cfg) -> str:
  """Which kernel path the forward and the backward take (``gpu.route``)."""
  p = gpu.plan(shape[1], dtype, cfg)
  if isinstance(p, str):  # (ragged rows)
    fwd = "ragged bulk" if gpu.ragged_fwd_bulk(*shape, dtype, cfg) else "ragged"
    n, hold_g = gpu.ragged_bwd_bulk(*shape, dtype, cfg)
    return f"{fwd} / {('ragged bulk' if hold_g else 'ragged bulk, g twice') if n else 'ragged'}"
  (fk, fn), (bk, bn) = (gpu.route(shape[0], p, dtype, cfg, b) for b in (False, True))
  show = lambda kind, n: kind if n == 1 else f"{kind} {n}"  # noqa: E731
  return f"{show(fk, fn)} / {show(bk, bn)}"


def cell_key(variant, rows, cols, dtype) -> str:
  """A variant cell's name, as the child and the parent process pass it."""
  return f"{variant} {rows}x{cols} {dtype}"


def variants(
  dtypes,
  calls,
  samples,
  on_cell=lambda rows: None,
  skip=(),
  on_start=lambda key: None,
  shapes=None,
) -> list[dict]:
  """The 2-D kernels under each of ``VARIANTS`` at its shapes: softmax and
  log_softmax checked against float64, softmax forward and backward timed
  (log_softmax's for a variant named ``LOG ...``).
  Cells named in ``skip`` (``cell_key``) are left out; ``on_start(key)`` before
  each cell, ``on_cell(rows)`` after each. ``shapes``: only these, in this order
  (default: every shape of ``VARIANTS``, in order of first use)."""
  rows = []

  def config(name, z, dt):
    """VARIANTS[name]'s config at (z, dt), or None if it has no cell left there."""
    if z not in VARIANTS[name][1] or cell_key(name, *z, dt) in skip:
      return None
    return variant_config(name, dt)

  # (shape, dtype) pairs where a variant other than the default has a cell left
  # to run (the default alone measures nothing that step 2 does not), shapes in
  # order of first use.
  listed = dict.fromkeys(z for _, zs in VARIANTS.values() for z in zs)
  shapes = listed if shapes is None else [tuple(z) for z in shapes if tuple(z) in listed]
  others = [name for name in VARIANTS if name != "default"]
  pairs = [
    (z, dt) for z in shapes for dt in dtypes if any(config(n, z, dt) is not None for n in others)
  ]

  def add(row):
    rows.append(row)
    on_cell(rows)

  for shape, dt, xs, gs, nbytes in _cells(pairs, "variants"):
    eps = float(jnp.finfo(jnp.dtype(dt)).eps)

    @functools.cache
    def ref(log, x=xs[0], g=gs[0]):  # float64 on the host: once per cell, not per variant
      rows = jnp.asarray(variant_rows(x.shape[0]))
      x, g = np.asarray(x[rows], np.float32), np.asarray(g[rows], np.float32)
      return _ref64(x, np.ones(x.shape, bool), g, log)

    # The default's built programs at this cell, timed with each variant: softmax's
    # if the "default" variant ran; log_softmax's (under the "default" variant's
    # config) built when a LOG variant asks.
    defaults = {False: None, True: None}
    logged_default = False  # the default's log_softmax has a row of its own
    # The default's softmax is timed only for the softmax variants of this cell:
    # where all that is left are log_softmax's, it has no variant to pair with.
    softmax_left = any(not n.startswith(LOG) and config(n, shape, dt) is not None for n in others)
    for name in VARIANTS:
      cfg = config(name, shape, dt)
      if cfg is None or (name == "default" and not softmax_left):
        continue
      on_start(cell_key(name, *shape, dt))
      start = time.perf_counter()
      log = name.startswith(LOG)
      cell = dict(variant=name, op="log_softmax" if log else "softmax")
      cell.update(rows=shape[0], cols=shape[1], dtype=dt)

      try:
        cell["path"] = _paths(shape, dt, cfg)
        # The timed op's programs are built first, and its check runs them: a
        # cell compiles each kernel once (the other op's for its check alone).
        built = _built(cfg, log, xs, gs)
        steps = dict(build=time.perf_counter() - start)
        wrong = None
        for op_log in (False, True):
          mine = _first_of(built) if op_log == log else None
          wrong = wrong or _variant_check(cfg, xs[0], gs[0], op_log, eps, ref, mine)
        steps["check"] = time.perf_counter() - start - steps["build"]
        if wrong:
          add(dict(cell, error=wrong))
          continue
        if log and defaults[True] is None:
          defaults[True] = _built(VARIANTS["default"][0](), True, xs, gs)
        pair = defaults[log] if name != "default" else None
        # Forward, then backward; each in turn with the default's within every
        # sample, so that their ratio compares the two under the same clocks.
        times = [
          _sample([b] + ([pair[k]] if pair else []), calls, samples) for k, b in enumerate(built)
        ]
        (t_fwd, *d_fwd), (t_bwd, *d_bwd) = times
        for t in (t_fwd, t_bwd):
          if isinstance(t, Exception):
            raise t
        if pair and not any(isinstance(t, Exception) for t in d_fwd + d_bwd):
          if log and not logged_default:
            # The default's log_softmax, as timed with this variant: a row of its
            # own (no wall time: not a cell), so that the tables compare with it.
            logged_default = True
            base = dict(cell, variant="default", path=_paths(shape, dt, VARIANTS["default"][0]()))
            add(_timed(base, d_fwd[0], d_bwd[0], nbytes))
          cell.update(fwd_vs_default=t_fwd / d_fwd[0], bwd_vs_default=t_bwd / d_bwd[0])
        if name == "default":
          defaults[False] = built  # timed: the later variants of this cell pair with it
        del built
      except Exception as e:  # e.g. a variant over the shared-memory limit
        add(dict(cell, error=_failed(f"variant {name} {shape} {dt}", e)))
        continue
      # Compiling, checking and timing the cell: what sizes VARIANTS to the timeout.
      cell["wall_s"] = round(time.perf_counter() - start, 2)
      # Where it went: building (compiling, warming) the timed programs; the
      # checks (the other op's programs compiled, the cell's float64 reference
      # made by its first variant); the timing (and the default's log_softmax
      # built, by a cell's first LOG variant).
      steps["time"] = cell["wall_s"] - steps["build"] - steps["check"]
      cell["steps_s"] = {k: round(v, 2) for k, v in steps.items()}
      add(_timed(cell, t_fwd, t_bwd, nbytes))
  return rows


CELL_TIMEOUT = 60  # s: a variant cell (compile, check, time) past this is taken as hung


def variants_in_child(
  dtypes,
  calls,
  samples,
  timeout_s,
  cell_timeout_s=CELL_TIMEOUT,
  child=None,
  on_rows=None,
  shapes=None,
  skip=(),
) -> list[dict]:
  """``variants`` in child processes, all within ``timeout_s``. A variant kernel
  that hangs on the GPU (a barrier that never completes) cannot be stopped from
  inside: when a cell runs past ``cell_timeout_s``, its child is killed, the cell
  is reported as hung, and a new child goes on with the cells not yet run.

  The child (``child`` + ``[directory]``, by default this script with
  ``--variants-only``) reads the cells to skip from ``skip.json``, names the cell
  it starts in ``current.json`` and writes its rows to ``rows.json`` after each.
  ``on_rows(rows)`` gets the rows so far whenever a child has written more, so
  that a call killed from outside keeps them. ``shapes``: as for ``variants``;
  ``skip``: the cells (``cell_key``) not to run, as for ``variants``."""
  child = child or [sys.executable, __file__, "--variants-only"]
  opts = ["--calls", str(calls), "--samples", str(samples), "--dtypes", ",".join(dtypes)]
  if shapes is not None:
    opts += ["--variant-shapes", ",".join(f"{r}x{c}" for r, c in shapes)]
  root = str(Path(__file__).resolve().parent.parent)  # for `import benchmarks`
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  # This process holds JAX's preallocated 75% of the GPU's memory: the child
  # allocates what it uses from the rest instead of asking for 75% again.
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  deadline = time.monotonic() + timeout_s
  rows: list[dict] = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    rows_file, current = tmp / "rows.json", tmp / "current.json"

    def child_rows():  # the current child's rows so far
      try:
        return json.loads(rows_file.read_text())
      except (FileNotFoundError, json.JSONDecodeError):
        return []

    while True:
      done = [*skip, *(cell_key(r["variant"], r["rows"], r["cols"], r["dtype"]) for r in rows)]
      (tmp / "skip.json").write_text(json.dumps(done))
      rows_file.unlink(missing_ok=True)
      current.unlink(missing_ok=True)
      proc = subprocess.Popen([*child, str(tmp), *opts], env=env)
      hung = late = False
      seen = None
      while proc.poll() is None:
        time.sleep(0.2)
        if on_rows is not None and rows_file.exists() and rows_file.stat().st_mtime != seen:
          seen = rows_file.stat().st_mtime
          on_rows(rows + child_rows())
        late = time.monotonic() > deadline
        try:
          hung = time.time() - current.stat().st_mtime > cell_timeout_s
        except FileNotFoundError:
          pass
        if hung or late:
          proc.kill()
          proc.wait()
          break
      rows += child_rows()
      if on_rows is not None:
        on_rows(rows)
      if late:
        note = (
          f"timed out after {timeout_s} s (the time --budget and --variants-timeout left"
          " them; not a hang): the variants after this one were not run"
        )
        rows.append(dict(variant="(child process)", rows=0, cols=0, dtype="-", error=note))
        return rows
      if not hung:
        return rows
      key = current.read_text()
      name, shape, dt = key.rsplit(" ", 2)
      n, c = map(int, shape.split("x"))
      error = f"hung: killed after {cell_timeout_s} s (the next cells ran in a new process)"
      rows.append(dict(variant=name, rows=n, cols=c, dtype=dt, error=error))
      print(f"gpu_pallas.py: variant cell {key} {error}", flush=True)


def _lowers(fn, *args) -> str | None:
  """None if ``fn`` (jitted) lowers for ``cuda`` with ``args`` (shapes), else why not."""
  try:
    jax.export.export(fn, platforms=["cuda"])(*args)
  except Exception as e:  # recorded, and the rest still lowered
    return f"{type(e).__name__}: {e}"[:500]
  return None


def _lowered_cell(key: str, cfg, shape, dtype) -> list[str]:
  """What fails to lower for ``cuda`` (``_lowers``) of softmax's and log_softmax's
  forward and backward programs (``_programs``) under ``cfg`` at ``shape``, a
  line each, named ``key``; one line for the cell if each lowers alone but the
  four together do not."""
  x = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  programs = [_programs(cfg, log, shape, dtype) for log in (False, True)]

  def cell(x):
    return [(out := fwd(x), bwd(out, x)) for fwd, bwd in programs]

  # The four in one export, which pays its fixed costs once (the preflight takes
  # 13% less time than with four); a program each only where that fails, to
  # name what failed.
  if (together := _lowers(jax.jit(cell), x)) is None:
    return []
  failed = []
  for log, (fwd, bwd) in zip((False, True), programs, strict=True):
    if why := _lowers(fwd, x) or _lowers(bwd, jax.eval_shape(fwd, x), x):
      failed.append(f"{key} {'log_softmax' if log else 'softmax'}: {why}")
  return failed or [f"{key}: {together}"]


def lower_steps(dtypes, on_cell=lambda key, wrong: None) -> list[str]:
  """The default kernels of steps 1-4 lowered for ``cuda``, as ``lower_variants``
  does the variants': softmax's and log_softmax's at every size timed (but those
  of the "default" variant, which ``lower_variants`` lowers) and every shape
  checked (CHECK_ROWS rows: another row count, another grid), and the losses'
  row statistics at theirs."""
  cols = [c for _, c in SIZES + NEW_SIZES] + NEW_CHECK_COLS
  shapes = [z for z in SIZES + NEW_SIZES if z not in VARIANTS["default"][1]]
  shapes += [(CHECK_ROWS, c) for c in cols]
  loss_shapes = LOSS_SIZES + [(CHECK_ROWS, c) for _, c in LOSS_SIZES]
  stats = jax.jit(functools.partial(gpu.row_stats_2d, cfg=gpu.Config()))
  failed = []
  for z in shapes:
    for dt in dtypes:
      key = f"default {z[0]}x{z[1]} {dt}"
      wrong = _lowered_cell(key, gpu.Config(), z, dt)
      on_cell(key, wrong)
      failed += wrong
  for z in loss_shapes:
    for dt in dtypes:
      key = f"row statistics {z[0]}x{z[1]} {dt}"
      why = _lowers(stats, jax.ShapeDtypeStruct(z, jnp.dtype(dt)))
      wrong = [f"{key} row_stats: {why}"] if why else []
      on_cell(key, wrong)
      failed += wrong
  return failed


def lower_variants(dtypes, shapes=None, on_cell=lambda key, wrong: None) -> list[str]:
  """Each of ``VARIANTS`` at each of its shapes (``shapes``: only these) and
  ``dtypes``: softmax's and log_softmax's forward and backward programs lowered
  for ``cuda`` with ``jax.export``, on any machine, before a GPU run spends a
  cell on a kernel that does not lower. What failed, a line each;
  ``on_cell(key, wrong)`` after each cell (``wrong``: its failures)."""
  failed = []
  for name, (_, zs) in VARIANTS.items():
    for z in zs if shapes is None else [z for z in zs if z in shapes]:
      for dt in dtypes:
        if (cfg := variant_config(name, dt)) is None:
          continue
        key = cell_key(name, *z, dt)
        wrong = _lowered_cell(key, cfg, z, dt)
        on_cell(key, wrong)
        failed += wrong
  return failed


def done_cells(rows) -> set[str]:
  """The cells (``cell_key``) that variant ``rows`` ran, timed, wrong or hung: not
  the default's (each variant is timed with its cell's default, which must run
  again with it) nor a note of the child process."""
  others = ("default", "(child process)")
  return {
    cell_key(r["variant"], r["rows"], r["cols"], r["dtype"])
    for r in rows
    if r["variant"] not in others
  }


def variants_done(path):
  """``--variants-done``: the cells that an earlier call on this machine ran (from
  the JSON list at ``path``, none if there is none), and a function that adds
  those of the variant rows it is given and writes the list back. The GPU
  machine stays warm for 30 s between calls, so a second call must start at
  once: with the same file it goes on where the first left off."""
  path = Path(path)
  earlier = set(json.loads(path.read_text())) if path.exists() else set()

  def record(rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sorted(earlier | done_cells(rows)), indent=1))

  return earlier, record


TARGET = 0.85  # of the measured copy bandwidth, forward and backward
# jax.nn at the bandwidth ceiling, where matching it is enough: at this fraction
# of copy or above, or taking at most 1 / CEILING of the time of an elementwise
# op that moves the same bytes (``ELEMENTWISE``), the ceiling for a transfer of
# that size where it sits below copy (4096 x 4096 float32 forward on the H100,
# T0116Z: the elementwise op at 88% of copy, jax.nn at 87%).
CEILING = 0.95


def _at_ceiling(ref, top, d, copy_bw) -> bool:
  """Whether jax.nn's row ``ref`` sits at the bandwidth ceiling in direction
  ``d``: by copy, or by the cell's elementwise row ``top`` (None: not timed)."""
  if ref[f"{d}_bytes_per_s"] / copy_bw >= CEILING:
    return True
  return top is not None and top[f"{d}_s"] >= CEILING * ref[f"{d}_s"]


def _against(r, ref, d, copy_bw, top=None):
  """Direction ``d`` ("fwd" or "bwd") of the timing row ``r`` against jax.nn's
  row ``ref``: its share of copy, its time over jax.nn's, whether that meets the
  targets, and whether only because jax.nn sits at the bandwidth ceiling
  (``_at_ceiling``; ``top`` is the cell's elementwise row), where matching it
  is enough."""
  frac = r[f"{d}_bytes_per_s"] / copy_bw
  ratio = r[f"{d}_s"] / ref[f"{d}_s"]
  excepted = ratio > 1.0 and _at_ceiling(ref, top, d, copy_bw)
  return frac, ratio, frac >= TARGET and (ratio <= 1.0 or excepted), excepted


def _met(ok: bool, excepted: bool) -> str:
  """The ``met`` column: yes, yes only by the ceiling's exception, or no."""
  return ("yes, jax.nn at the ceiling" if excepted else "yes") if ok else "**no**"


def _by_cell(rows, op) -> dict:
  """The timing rows of ``op`` that did not fail, by (rows, cols, dtype, contender)."""
  return {
    (r["rows"], r["cols"], r["dtype"], r["contender"]): r
    for r in rows
    if "error" not in r and r.get("op", "softmax") == op
  }


def targets(rows, copy_bw, op="softmax") -> list[str]:
  """The issue's targets per cell of ``op``: Pallas at >= ``TARGET`` of copy, and
  faster than jax.nn except where jax.nn already runs at the bandwidth ceiling.
  The last column, for reference only: Pallas's share of the cell's ``ELEMENTWISE``
  (its time over Pallas's), forward / backward."""
  by = _by_cell(rows, op)
  head = "| shape | dtype | fwd % copy | bwd % copy | fwd / jax.nn | bwd / jax.nn | met "
  out = [head + "| % of elementwise |", "|---|---|---|---|---|---|---|---|"]
  for (n, c, dt, who), r in by.items():
    ref = by.get((n, c, dt, f"jax.nn.{op}"))
    if who != "pallas" or ref is None:
      continue
    top = by.get((n, c, dt, ELEMENTWISE))
    fwd, bwd = (_against(r, ref, d, copy_bw, top) for d in ("fwd", "bwd"))
    (pf, rf, okf, exf), (pb, rb, okb, exb) = fwd, bwd
    met = _met(okf and okb, exf or exb)
    vs_top = "-"
    if top is not None:
      vs_top = f"{100 * top['fwd_s'] / r['fwd_s']:.0f}% / {100 * top['bwd_s'] / r['bwd_s']:.0f}%"
    out.append(
      f"| {n}x{c} | {dt} | {100 * pf:.0f}% | {100 * pb:.0f}% | {rf:.2f}x | {rb:.2f}x "
      f"| {met} | {vs_top} |"
    )
  return out


# The contender that times each half of a backend name ``"<forward>/<backward>"``.
_HALF = {"pallas": "pallas", "xla": "jaxsoftmax-xla"}


def none_times(by: dict, r: dict) -> tuple[float, float] | None:
  """The forward and backward times of what ``implementation=None`` ran in the
  cell of the Pallas row ``r`` (its ``default``), taken from the contenders that
  ran each half (``by``: ``_by_cell``'s rows); None where one is missing."""
  if "default" not in r:
    return None
  fwd_name, _, bwd_name = r["default"].partition("/")
  cell = (r["rows"], r["cols"], r["dtype"])
  fwd, bwd = (by.get((*cell, _HALF[h])) for h in (fwd_name, bwd_name or fwd_name))
  return None if fwd is None or bwd is None else (fwd["fwd_s"], bwd["bwd_s"])


def defaults(rows, op="softmax") -> list[str]:
  """Per cell of ``op``: the backend ``implementation=None`` picked there (the
  Pallas row's ``default``), its forward and backward times, taken from the
  contenders that ran each half, over jax.nn's, and over the fastest of the
  four pairings of Pallas's and our XLA path's halves: 1.00x when
  ``_pallas.preferred`` chose the fastest."""
  by = _by_cell(rows, op)
  out = [
    "| shape | dtype | `None` runs | fwd us | bwd us | fwd+bwd / jax.nn | / fastest pairing |",
    "|---|---|---|---|---|---|---|",
  ]
  for (n, c, dt, who), r in by.items():
    halves = [by.get((n, c, dt, _HALF[h])) for h in ("pallas", "xla")]
    ref = by.get((n, c, dt, f"jax.nn.{op}"))
    if who != "pallas" or ref is None or None in halves or (times := none_times(by, r)) is None:
      continue
    fwd, bwd = times
    fastest = min(f["fwd_s"] for f in halves) + min(b["bwd_s"] for b in halves)
    out.append(
      f"| {n}x{c} | {dt} | {r['default']} | {fwd * 1e6:.1f} | {bwd * 1e6:.1f} "
      f"| {(fwd + bwd) / (ref['fwd_s'] + ref['bwd_s']):.2f}x | {(fwd + bwd) / fastest:.2f}x |"
    )
  return out


def best_variants(variant_rows, rows, copy_bw) -> list[str]:
  """Per op, shape and dtype: the fastest correct variant forward and backward,
  its share of copy and its time over ``jax.nn``'s (from ``rows``), and whether
  the two together meet the targets: what a new default would give (``-``
  where ``rows`` has no jax.nn time for the cell)."""

  def of(who):
    return {
      (r.get("op", "softmax"), r["rows"], r["cols"], r["dtype"]): r
      for r in rows
      if "error" not in r and r.get("contender") == who.format(op=r.get("op", "softmax"))
    }

  nn, tops = of("jax.nn.{op}"), of(ELEMENTWISE)
  cells = {}
  for r in variant_rows:
    if "error" not in r:
      cells.setdefault((r.get("op", "softmax"), r["rows"], r["cols"], r["dtype"]), []).append(r)
  out = ["| op | shape | dtype | fastest fwd | fwd % copy, / jax.nn | fastest bwd "]
  out[0] += "| bwd % copy, / jax.nn | met |"
  out.append("|---|---|---|---|---|---|---|---|")
  for (op, n, c, dt), rs in cells.items():
    ref, top = nn.get((op, n, c, dt)), tops.get((op, n, c, dt))
    line, ok, excepted = f"| {op} | {n}x{c} | {dt} ", True, False
    for d in ("fwd", "bwd"):
      best = min(rs, key=lambda r: r[f"{d}_s"])
      frac = best[f"{d}_bytes_per_s"] / copy_bw
      if ref is None:
        line += f"| {best['variant']} | {100 * frac:.0f}% "
        continue
      _, ratio, met, ex = _against(best, ref, d, copy_bw, top)
      ok, excepted = ok and met, excepted or ex
      line += f"| {best['variant']} | {100 * frac:.0f}%, {ratio:.2f}x "
    out.append(line + f"| {_met(ok, excepted) if ref is not None else '-'} |")
  return out


def _timing_line(r, who, copy_bw, gbps) -> str:
  """A table row: us (GB/s) and % of copy, forward then backward; or the error."""
  head = f"| {r['rows']}x{r['cols']} | {r['dtype']} | {who} "
  if "error" in r:
    return head + f"| failed: {r['error'].splitlines()[0][:80]} |"
  cells = []
  for d in ("fwd", "bwd"):
    bps = r[f"{d}_bytes_per_s"]
    cells.append(f"{r[f'{d}_s'] * 1e6:.1f}")
    cells += [f"{bps / 1e9:.0f}"] if gbps else []
    cells.append(f"{100 * bps / copy_bw:.0f}%")
  return head + "| " + " | ".join(cells) + " |"


def variant_table(variant_rows, copy_bw) -> list[str]:
  """The variants, each with its ``/ default`` ratio (if it was paired) and its paths."""
  head = "| shape | dtype | variant | fwd us | fwd % copy | bwd us | bwd % copy "
  lines = [head + "| / default | path fwd / bwd |", "|---|---|---|---|---|---|---|---|---|"]
  for r in variant_rows:
    line = _timing_line(r, r["variant"], copy_bw, gbps=False)
    if "error" not in r:
      vs = "-"
      if "fwd_vs_default" in r:
        vs = f"{r['fwd_vs_default']:.2f}x / {r['bwd_vs_default']:.2f}x"
      line += f" {vs} | {r.get('path', '')} |"
    lines.append(line)
  return lines


def markdown(meta, checks, rows, copy_bw, variant_rows=(), losses=None) -> str:
  lines = [f"# Pallas softmax on {meta['device']} (jax {meta['jax']}, {meta['date']})", ""]
  if not all(c["ok"] for c in checks):
    lines += ["**The correctness check FAILED: the Pallas timings are of a wrong kernel.**", ""]
  lines.append(f"Measured copy bandwidth (`-x`, 1 GiB float32): **{copy_bw / 1e9:.0f} GB/s**.")
  lines += ["", "## Correctness vs float64 (first rows, with masks and non-finite rows)", ""]
  lines.append("| op | rows | cols | dtype | fwd err / tol | bwd err / tol | ok |")
  lines.append("|---|---|---|---|---|---|---|")
  for c in checks:
    lines.append(
      f"| {c['op']} | {c.get('rows', CHECK_ROWS)} | {c['cols']} | {c['dtype']} "
      f"| {c['fwd_rel_err']:.2e} / {c['fwd_tol']:.1e} "
      f"| {c['bwd_rel_err']:.2e} / {c['bwd_tol']:.1e} | {'yes' if c['ok'] else '**NO**'} |"
    )
  for op in [*OPS, WHERE]:
    of_op = [r for r in rows if r.get("op", "softmax") == op]
    if not of_op:
      continue
    lines += ["", f"## {op} timings (median per call)", ""]
    if op == WHERE:
      lines += [
        "A causal mask stretched over the row (`j <= i * cols / rows`), an argument of "
        "every call; % copy counts x and s (or s, g, dx), not the mask's bytes.",
        "",
      ]
    lines.append(
      "| shape | dtype | contender | fwd us | fwd GB/s | % copy | bwd us | bwd GB/s | % copy |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in of_op:
      lines.append(_timing_line(r, r["contender"], copy_bw, gbps=True))
    if op != WHERE:  # (the targets are without a mask)
      lines += ["", f"## {op} targets: Pallas >= 85% of copy, faster than jax.nn.{op}", ""]
      lines += targets(rows, copy_bw, op)
      if any("default" in r for r in of_op):
        lines += ["", f"## {op}: what `implementation=None` runs", ""]
        lines += defaults(rows, op)
  if losses is not None:
    lines += losses_markdown(losses, copy_bw)
  if variant_rows:
    lines += ["", "## Mosaic GPU kernel variants (2-D kernels called directly)", ""]
    lines.append(
      "Each variant is timed in turn with the default of its cell (same samples): "
      "`/ default` is their ratio of times, fwd / bwd."
    )
    lines.append("")
    lines += variant_table(variant_rows, copy_bw)
    lines += ["", "## The fastest correct variant per cell, and the targets", ""]
    lines.append(
      "Each variant's own times (its child process) against jax.nn's from the table above "
      "(an earlier time); forward and backward may be different variants. The `/ default` "
      "ratios above, from shared samples, are the firmer comparison."
    )
    lines.append("")
    lines += best_variants(variant_rows, rows, copy_bw)
  return "\n".join(lines) + "\n"


def _shapes(text: str) -> list[tuple[int, int]]:
  """``"RxC,RxC,..."`` (a command-line flag) as a list of ``(R, C)``; ``""`` none."""
  return [tuple(int(n) for n in rc.split("x")) for rc in text.split(",") if rc]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="benchmarks/results", help="directory for JSON and Markdown")
  p.add_argument("--calls", type=int, default=20, help="back-to-back calls per sample")
  p.add_argument("--samples", type=int, default=7, help="samples per measurement (median)")
  p.add_argument("--allow-cpu", action="store_true", help="smoke-test the script on the CPU")
  p.add_argument("--no-variants", action="store_true", help="skip the kernel-variant timings")
  p.add_argument("--no-losses", action="store_true", help="skip the cross-entropy step")
  p.add_argument(
    "--loss-sizes",
    help="RxC,...: the losses at these sizes (soft labels at the first) instead of LOSS_SIZES",
  )
  p.add_argument("--variants-timeout", type=int, default=360, help="seconds for all variants")
  p.add_argument(
    "--budget",
    type=int,
    default=540,
    help="seconds for the whole script: the variants stop in time",
  )
  p.add_argument(
    "--sizes",
    help="RxC,...: check and time these instead of SIZES and NEW_SIZES (no 'where' rows);"
    " '' none (the copy bandwidth and the variants)",
  )
  p.add_argument("--check-cols", help="C,...: checked (8 rows) instead of NEW_CHECK_COLS")
  p.add_argument(
    "--check-rows",
    type=int,
    default=CHECK_ROWS,
    help="rows of each timed size checked against float64 (persistent CTAs take several)",
  )
  p.add_argument(
    "--variant-shapes",
    help="RxC,...: the variants at these of their shapes only, in this order",
  )
  p.add_argument(
    "--variants-done",
    metavar="FILE",
    help="JSON list of the variant cells run: skipped if listed, added as they run",
  )
  p.add_argument(
    "--lower-only",
    action="store_true",
    help="lower every kernel the script runs for cuda, and exit (any machine; --variant-shapes"
    " and --dtypes apply; with --variant-shapes, the variants only)",
  )
  p.add_argument("--variants-only", metavar="DIR", help=argparse.SUPPRESS)  # the child
  p.add_argument("--dtypes", default=",".join(DTYPES), help="D,...: the variants' dtypes")
  args = p.parse_args(argv)
  started = time.monotonic()
  vshapes = _shapes(args.variant_shapes) if args.variant_shapes else None
  if args.lower_only:
    say = lambda key, wrong: print(f"{key}: {'FAILED' if wrong else 'lowers'}", flush=True)  # noqa: E731
    dts = args.dtypes.split(",")
    failed = [] if vshapes else lower_steps(dts, say)
    failed += lower_variants(dts, vshapes, say)
    print("\n".join(failed) or "gpu_pallas.py: every kernel lowers for cuda", flush=True)
    return 1 if failed else 0
  if args.variants_only:  # the child of variants_in_child
    tmp = Path(args.variants_only)
    skip = set(json.loads((tmp / "skip.json").read_text()))

    def save_rows(rows):  # whole or not at all: the parent reads it while the child runs
      (tmp / "rows.part").write_text(json.dumps(rows, indent=1))
      os.replace(tmp / "rows.part", tmp / "rows.json")

    on_start = lambda key: (tmp / "current.json").write_text(key)  # noqa: E731
    dts = args.dtypes.split(",")
    save_rows(variants(dts, args.calls, args.samples, save_rows, skip, on_start, vshapes))
    return 0

  platform = jax.default_backend()
  if platform != "gpu" and not args.allow_cpu:
    print(f"gpu_pallas.py: no GPU (default backend {platform!r}); see --allow-cpu", file=sys.stderr)
    return 2
  sizes, new_sizes, dtypes, where_sizes = SIZES, NEW_SIZES, DTYPES, WHERE_SIZES
  if args.sizes is not None:  # "": no checks or timings, the variants alone
    sizes = _shapes(args.sizes)
    new_sizes, where_sizes = [], []
  check_cols = NEW_CHECK_COLS
  if args.check_cols is not None:
    check_cols = [int(c) for c in args.check_cols.split(",") if c]
  if platform != "gpu" and sizes:  # smoke test: tiny sizes, no Pallas
    sizes, new_sizes, dtypes = [(64, 256)], [(8, 384)], ["float32"]
    where_sizes = sizes
  probe = jnp.zeros((8, 1024), jnp.float32)
  try:
    t = time.perf_counter()
    jax.block_until_ready(jaxsoftmax.softmax(probe, implementation="pallas"))
    print(f"gpu_pallas.py: first Pallas call {time.perf_counter() - t:.1f} s", flush=True)
    pallas = True
  except ValueError as e:
    print(f"gpu_pallas.py: Pallas unavailable here: {e}", file=sys.stderr)
    pallas = False
  except Exception as e:  # supported but failing: the checks below record where
    _failed("the first Pallas call", e)
    pallas = True
  if platform == "gpu" and not pallas:
    return 1
  copy_n = 1 << 28 if platform == "gpu" else 1 << 20

  meta = dict(
    device=str(jax.devices()[0].device_kind),
    platform=platform,
    jax=jax.__version__,
    commit=_git_commit(),
    date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ"),
    calls=args.calls,
    samples=args.samples,
  )
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"gpu_pallas-{meta['date']}"
  result = dict(meta=meta)

  def save(md=None):
    # Written after every step, so that a call that runs out of time, or a kernel
    # that brings the process down, loses nothing measured before it.
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if md is not None:
      stem.with_suffix(".md").write_text(md)
      print(md, flush=True)

  result["checks"] = checks = check(sizes, dtypes, args.check_rows) if pallas else []
  ok = all(c["ok"] for c in checks)
  save()
  if not ok:
    # Timed anyway (the numbers say whether the kernels are worth mending), but
    # reported as wrong and the exit status is 1.
    print("gpu_pallas.py: correctness check FAILED; timings follow", file=sys.stderr)
    for c in checks:
      if not c["ok"]:
        print({k: v for k, v in c.items() if k != "error"}, file=sys.stderr)
  # A first copy measurement, in case the call runs out of time before the last.
  result["copy_bytes_per_s_before"] = copy_bandwidth(args.calls, args.samples, copy_n)

  def on_cell(rows):
    result["timings"] = rows
    save()

  rows = timings(sizes, dtypes, pallas, args.calls, args.samples, on_cell, where_sizes)
  result["copy_bytes_per_s"] = copy_bandwidth(args.calls, args.samples, copy_n)
  save(markdown(meta, checks, rows, result["copy_bytes_per_s"]))
  more = [*new_sizes, *[(CHECK_ROWS, c) for c in check_cols]] if platform == "gpu" else []
  checks += check(more, dtypes) if pallas else []
  ok = all(c["ok"] for c in checks)
  save()
  rows += timings(new_sizes, dtypes, pallas, args.calls, args.samples, lambda r: on_cell(rows + r))
  copy_bw = copy_bandwidth(args.calls, args.samples, copy_n)
  result.update(copy_bytes_per_s=copy_bw, timings=rows)
  save(markdown(meta, checks, rows, copy_bw))
  if not args.no_losses and args.budget - (time.monotonic() - started) < 45:
    print("gpu_pallas.py: under 45 s left of --budget: no losses step", flush=True)
  elif not args.no_losses:
    loss_sizes, soft_sizes = LOSS_SIZES, SOFT_LOSS_SIZES
    if platform != "gpu":  # smoke test: a small ragged row
      loss_sizes = soft_sizes = [(64, 1000)]
    if args.loss_sizes:
      loss_sizes = _shapes(args.loss_sizes)
      soft_sizes = loss_sizes[:1]
    # The timings within LOSSES_S, and within --budget (less the last save's 15 s).
    deadline = min(time.monotonic() + LOSSES_S, started + args.budget - 15)
    result["losses"] = losses = dict(calls=min(args.calls, LOSS_CALLS))
    losses["samples"] = min(args.samples, LOSS_SAMPLES)
    try:
      # Pallas on a GPU; on the CPU the default (XLA), a smoke test of the check.
      impls = ["pallas"] if pallas else [None]
      losses["checks"] = check_losses(loss_sizes, dtypes, impls, args.check_rows)
      ok = ok and all(c["ok"] for c in losses["checks"])
      save()

      def on_loss_cell(loss_rows, notes):
        losses.update(timings=loss_rows, notes=notes)
        save()

      cells = [(INTEGER, z, dt) for z in loss_sizes for dt in dtypes]
      cells += [(SOFT, z, dt) for z in soft_sizes for dt in dtypes]
      cells += [(PADDED, loss_sizes[0], dtypes[0])]
      losses["timings"], losses["notes"] = loss_timings(
        cells, pallas, losses["calls"], losses["samples"], on_loss_cell, deadline
      )
    except Exception as e:  # not fatal: the variants still run
      losses.setdefault("notes", []).append(f"the losses step failed: {_failed('losses', e)}")
    save(markdown(meta, checks, rows, copy_bw, losses=losses))
  losses = result.get("losses")
  left = args.budget - (time.monotonic() - started) - 15  # for the last save
  if pallas and not args.no_variants and left < 30:
    print(f"gpu_pallas.py: {left:.0f} s left of --budget: no variants", flush=True)
  elif pallas and not args.no_variants:
    earlier, record = variants_done(args.variants_done) if args.variants_done else (set(), None)
    if earlier:
      meta["variant_cells_run_before"] = len(earlier)
      print(f"gpu_pallas.py: {len(earlier)} variant cells ran in an earlier call", flush=True)

    def on_rows(vrows):  # as the variants come in, quietly
      result["variants"] = vrows
      stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
      stem.with_suffix(".md").write_text(markdown(meta, checks, rows, copy_bw, vrows, losses))
      if record is not None:
        record(vrows)

    timeout = int(min(args.variants_timeout, left))
    result["variants"] = variants_in_child(
      dtypes, args.calls, args.samples, timeout, on_rows=on_rows, shapes=vshapes, skip=earlier
    )
    save(markdown(meta, checks, rows, copy_bw, result["variants"], losses))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
