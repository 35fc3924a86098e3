"""A follow-up to gpu_pallas.py's variant table, for a second, shorter call on
the same GPU session: the candidate defaults re-timed, each in turn with its
cell's default in the same samples, with more calls and samples than the first
pass (whose short-row ratios were noisy), and the cells it did not reach.

  OUT=/some/dir PYTHONPATH=. python benchmarks/gpu_variants_followup.py

Rows go to $OUT/gpu_variants-<date>.json after every cell, so a hang loses
nothing measured before it (the cell being run is printed first); the table,
with % of a copy bandwidth measured at the end, to gpu_variants-<date>.md.

  python benchmarks/gpu_variants_followup.py --render RUN.json --copy-bw GB/S

writes the table of an earlier run (the run of 2026-11-26T0518Z measured no
copy bandwidth: it takes that of gpu_pallas-2026-11-26T0511Z, the same session).

Its configurations are those of that run (``THEN``): ``gpu.Config``'s defaults
have changed since (gpu_pallas-2026-11-26T1329Z).
"""

import datetime
import json
import os
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import gpu_pallas as gp  # noqa: E402
from jaxsoftmax._pallas import gpu  # noqa: E402

SHORT, LONG, MID = [(4096, 1024), (4096, 4096)], gp.LONG[:1], [(4096, 16384)]
# The defaults of that run (gpu.Config's have changed since).
THEN = dict(split_bytes=0, elementwise_stats=False, approx_math=False, stages=3)


def _config(**cfg):
  return gpu.Config(**{**THEN, **cfg})


def _split(kib, **cfg):
  """Rows split in parts of ``kib`` KiB, forward and backward, as that run split them."""
  return _config(
    **{"split_bytes": kib * 1024, "bwd_split_bytes": kib * 1024, "split_cluster": 8, **cfg}
  )


# Short rows first (the undecided ring cells), then the long rows' split
# backward, then 4096 x 16384, which the first pass did not reach.
gp.VARIANTS = {
  "default": (_config, SHORT + LONG + MID),
  "ring of 3 slots": (lambda: _config(ring_slots=3), SHORT + MID),
  "ring of 4 slots": (lambda: _config(ring_slots=4), SHORT),
  "ring of 3 slots, read-only drain": (
    lambda: _config(ring_slots=3, read_only_drain=True),
    SHORT,
  ),
  "read-only drain": (lambda: _config(read_only_drain=True), SHORT[1:] + MID),
  "split rows, 64 KiB parts": (lambda: _split(64, split_ctas=None), LONG),
  "split rows, 200 KiB parts, persistent": (
    lambda: _split(200, split_ctas=gpu.sm_count(), bwd_split_ctas=gpu.sm_count()),
    LONG,
  ),
}


def markdown(result, copy_bw) -> str:
  meta = result["meta"]
  lines = [
    f"# Mosaic GPU kernel variants on {meta['device']} (jax {meta['jax']}, {meta['date']})",
    "",
    f"Commit {meta['commit'] or '?'}; {meta['calls']} calls a sample, {meta['samples']} "
    f"samples; % of a copy bandwidth of {copy_bw / 1e9:.0f} GB/s. Each variant is timed in "
    "turn with the default of its cell (same samples): `/ default` is their ratio of "
    "times, fwd / bwd.",
    "",
    *gp.variant_table(result["variants"], copy_bw),
  ]
  return "\n".join(lines) + "\n"


def render(path: Path, copy_bw: float) -> None:
  path.with_suffix(".md").write_text(markdown(json.loads(path.read_text()), copy_bw))


def main() -> int:
  if sys.argv[1:2] == ["--render"]:
    render(Path(sys.argv[2]), float(sys.argv[4]) * 1e9)
    return 0
  out = Path(os.environ.get("OUT", "benchmarks/results"))
  out.mkdir(parents=True, exist_ok=True)
  date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
  meta = dict(
    device=str(jax.devices()[0].device_kind),
    jax=jax.__version__,
    commit=os.environ.get("BENCH_COMMIT", ""),
    date=date,
    calls=int(os.environ.get("CALLS", 50)),
    samples=int(os.environ.get("SAMPLES", 15)),
  )
  path = out / f"gpu_variants-{date}.json"

  def save(rows):
    path.write_text(json.dumps(dict(meta=meta, variants=rows), indent=1))

  start = lambda key: print("cell:", key, flush=True)  # noqa: E731
  rows = gp.variants(gp.DTYPES, meta["calls"], meta["samples"], save, (), start)
  save(rows)
  copy_bw = gp.copy_bandwidth(meta["calls"], meta["samples"])
  render(path, copy_bw)
  for r in rows:
    keys = ("variant", "rows", "cols", "dtype", "fwd_s", "bwd_s", "fwd_vs_default")
    print({k: r.get(k) for k in (*keys, "bwd_vs_default", "error")}, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
