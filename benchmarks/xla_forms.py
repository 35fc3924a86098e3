"""Candidate XLA forms of log_softmax over the last axis, for the GPU script.

On the H200 (benchmarks/results/gpu_pallas-2026-11-26T0511Z.md) our XLA
log_softmax forward took 1.2-2.0x ``jax.nn.log_softmax``'s time at 4096 rows
(16.5 vs 8.5 us at 4096 x 1024 bfloat16, 160.7 vs 85.7 us at 4096 x 16384),
while our XLA softmax forward, the same statistics without the per-row ``live``
flag, timed level with ``jax.nn.softmax``. The suspect is that flag: a max of
its own (``_stats.slice_stats``), which keeps XLA:CPU's forward one fused pass
but may cost XLA:GPU a kernel and a read of ``x``. Each form below moves the
flag elsewhere; `benchmarks/gpu_pallas.py` checks them against float64 and
times them beside ``implementation="xla"`` and ``jax.nn``. Whichever wins
becomes the GPU's form in ``_xla.py`` (``lax.platform_dependent``), with the
masking table tested there; until then nothing here is used by the library.

Each form computes in float32 for bfloat16 and float16 input, returns the
input dtype, and gives an empty row (all -inf) ``l = -inf`` and gradient 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsoftmax._stats import two_sum


def _cdt(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _with_vjp(fwd, bwd):
  """log_softmax from ``fwd(x) -> (l, res)`` and ``bwd(l, res, g) -> dx``,
  saving ``l`` and ``res``."""

  @jax.custom_vjp
  def f(x):
    return fwd(x)[0]

  def f_fwd(x):
    l, res = fwd(x)
    return l, (l, res)

  def f_bwd(saved, g):
    return (bwd(*saved, g),)

  f.defvjp(f_fwd, f_bwd)
  return f


def _bwd_flag(l, live, g):
  """``dx = g - exp(l) * sum(g)``, times the row's 0/1 ``live`` flag."""
  cdt = _cdt(l.dtype)
  lc, gc = l.astype(cdt), g.astype(cdt)
  dx = gc - jnp.exp(lc) * jnp.sum(gc, -1, keepdims=True)
  return (dx * live.astype(cdt)).astype(l.dtype)


def _stats_finfo(x):
  """The current statistics: a max from ``finfo.min`` (finite for an empty
  row), ``d = sum(exp(x - m))`` (0 for an empty row), and ``l = x - hi - lo``."""
  xs = x.astype(_cdt(x.dtype))
  init = jnp.array(jnp.finfo(x.dtype).min, x.dtype)
  m = jax.lax.reduce(x, init, jax.lax.max, (x.ndim - 1,))[..., None].astype(xs.dtype)
  d = jnp.sum(jnp.exp(xs - m), -1, keepdims=True)
  hi, lo = two_sum(m, jnp.log(jnp.maximum(d, 1)))
  return (xs - hi) - lo, d


def _live_from_d_fwd(x):
  # The flag from the normaliser: d >= 1 in a live row (its max contributes
  # exp(0) = 1), 0 in an empty one, NaN (counted live) in a NaN row.
  l, d = _stats_finfo(x)
  return l.astype(x.dtype), d != 0


def _shift_from_max_fwd(x):
  # jax.nn's structure: the max from -inf, the flag and the shift both from it.
  xs = x.astype(_cdt(x.dtype))
  m = jnp.max(xs, -1, keepdims=True)
  live = m != -jnp.inf
  shift = jnp.where(live, m, 0.0)
  d = jnp.sum(jnp.exp(xs - shift), -1, keepdims=True)
  hi, lo = two_sum(shift, jnp.log(jnp.maximum(d, 1)))
  return ((xs - hi) - lo).astype(x.dtype), live


def _flag_in_bwd_fwd(x):
  return _stats_finfo(x)[0].astype(x.dtype), None


def _flag_in_bwd_bwd(l, _, g):
  # An empty row is all -inf in l; a live row has a finite entry at its max.
  live = jnp.max(l, -1, keepdims=True) != -jnp.inf
  return _bwd_flag(l, live, g)


FORMS = {
  "xla form: live from d": _with_vjp(_live_from_d_fwd, _bwd_flag),
  "xla form: shift from a -inf max": _with_vjp(_shift_from_max_fwd, _bwd_flag),
  "xla form: live in the backward": _with_vjp(_flag_in_bwd_fwd, _flag_in_bwd_bwd),
}
