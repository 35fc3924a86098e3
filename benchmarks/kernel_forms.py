"""Fingerprints of the GPU kernels as Mosaic GPU would compile them, on any machine.

A change to ``jaxsoftmax/_pallas/gpu.py`` meant to leave the kernels alone (a
refactor, a switch removed) can be checked without a GPU: each kernel's jaxpr,
with its body, grid, cluster, scratch and compiler parameters, is hashed for
the default config and every config the GPU script queues (``gpu_pallas.VARIANTS``,
and a few off-by-default forms), at the script's shapes and a few short and
odd ones, in the three dtypes. Two runs on the same jax compare key by key:

  PYTHONPATH=. python benchmarks/kernel_forms.py --out /tmp/before.json
  (change gpu.py)
  PYTHONPATH=. python benchmarks/kernel_forms.py --out /tmp/after.json --compare /tmp/before.json

``--compare`` lists the kernels whose form changed and exits 1 if any did.
About 3 minutes on 2 cores (11232 kernels); the hash covers the traced program,
not Mosaic GPU's lowering of it, which is a function of it for a given jax.
"""

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import gpu_pallas  # noqa: E402
from jaxsoftmax._pallas import gpu  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
# Beside the script's sizes: one chunk, ragged, overlapping chunks, few rows.
SHAPES = sorted(
  {*gpu_pallas.SIZES, *gpu_pallas.NEW_SIZES}
  | {(8, 1024), (16, 32000), (8, 50304), (5, 1000), (5, 4104), (3, 70000), (6, 384)}
  | {(6, 1280), (6, 2048), (6, 4097), (6, 129), (6, 20001), (6, 8197), (100, 49152)}
  | {(1024, 32768), (6, 256), (6, 1152), (64, 2000), (64, 8192)}
)
SMALL = dict(chunk_elems=256, row_bytes=2048, bwd_row_bytes=4096)
# Forms off by default that no variant queues, on their own paths.
EXTRA = {
  "streamed": dict(SMALL, split_bytes=0, bwd_split_bytes=0),
  "split in clusters of 8": dict(SMALL, split_bytes=2048, bwd_split_bytes=2048, split_cluster=8),
  "per-element statistics": dict(elementwise_stats=True, approx_math=True),
  "statistics a chunk at a time": dict(elementwise_stats=False, approx_math=False),
  "two passes": dict(elementwise_stats=True, held_two_pass=True),
  "streamed clusters of 4": dict(stream_cluster=4),
  "persistent split backward": dict(
    split_bytes=200 * 1024, bwd_split_bytes=200 * 1024, split_ctas=132, bwd_split_ctas=132
  ),
  "6 stages": dict(stages=6),
  "Warpgroup semantics": dict(semantics=gpu.plgpu.LoweringSemantics.Warpgroup),
  "split clusters a row": dict(split_ctas=None),
  "ragged bulk, g held": dict(ragged_bulk_bytes=200 * 1024, ragged_bulk_g_twice=False),
  "interpret": dict(interpret=True),
}


def configs() -> dict:
  """Name (with ``|dtype`` where a variant suits one dtype) to ``gpu.Config``."""
  out = {}
  for name, (make, _) in gpu_pallas.VARIANTS.items():
    cfg = make()
    for key, c in cfg.items() if isinstance(cfg, dict) else [(None, cfg)]:
      out[name if key is None else f"{name}|{key}"] = c
  out.update({name: gpu.Config(**kw) for name, kw in EXTRA.items()})
  return out


def _kernels(cfg):
  """The GPU module's entry points under ``cfg``, each with its arguments for x."""
  live = lambda x: jax.ShapeDtypeStruct((x.shape[0], 1), jnp.float32)  # noqa: E731
  return {
    "softmax fwd": (lambda x: gpu.softmax_fwd_2d(x, log=False, cfg=cfg), lambda x: (x,)),
    "log_softmax fwd": (lambda x: gpu.softmax_fwd_2d(x, log=True, cfg=cfg), lambda x: (x,)),
    "log_softmax fwd, no lse": (
      lambda x: gpu.softmax_fwd_2d(x, log=True, cfg=cfg, lse=False),
      lambda x: (x,),
    ),
    "softmax bwd": (lambda x: gpu.softmax_bwd_2d(x, x, log=False, cfg=cfg), lambda x: (x,)),
    "log_softmax bwd": (
      lambda x, l: gpu.softmax_bwd_2d(x, x, l, log=True, cfg=cfg),
      lambda x: (x, live(x)),
    ),
    "row stats": (lambda x: gpu.row_stats_2d(x, cfg=cfg), lambda x: (x,)),
  }


def fingerprint(f, *args) -> str:
  """A hash of ``jax.make_jaxpr(f)(*args)``, object addresses blanked."""
  text = re.sub(r"0x[0-9a-f]+", "0x", str(jax.make_jaxpr(f)(*args)))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def forms(cfgs: dict, shapes, dtypes=DTYPES) -> dict:
  """``"config|shape|dtype|kernel"`` to its fingerprint, or to ``"error: ..."``
  where it does not trace."""
  out = {}
  for name, cfg in cfgs.items():
    for shape in shapes:
      for dt in dtypes:
        x = jax.ShapeDtypeStruct(shape, jnp.dtype(dt))
        for kernel, (f, args) in _kernels(cfg).items():
          key = f"{name}|{shape[0]}x{shape[1]}|{dt}|{kernel}"
          try:
            out[key] = fingerprint(f, *args(x))
          except Exception as e:  # (a form that cannot trace is recorded, not fatal)
            out[key] = f"error: {type(e).__name__}: {str(e)[:120]}"
  return out


def compare(old: dict, new: dict) -> list[str]:
  """The keys whose fingerprint differs, or that only one of the two has."""
  return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="where to write the fingerprints (JSON)")
  ap.add_argument("--compare", help="an earlier --out file: list what changed, exit 1 if any")
  a = ap.parse_args(argv)
  new = forms(configs(), SHAPES)
  Path(a.out).write_text(json.dumps(new, indent=0, sort_keys=True))
  errors = sum(v.startswith("error") for v in new.values())
  print(f"{len(new)} kernels fingerprinted ({errors} do not trace) -> {a.out}")
  if not a.compare:
    return 0
  changed = compare(json.loads(Path(a.compare).read_text()), new)
  for k in changed:
    print("changed:", k)
  print(f"{len(changed)} of {len(new)} kernels changed against {a.compare}")
  return 1 if changed else 0


if __name__ == "__main__":
  sys.exit(main())
