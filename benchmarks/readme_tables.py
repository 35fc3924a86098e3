"""The README's GPU tables, made from ``benchmarks/results/gpu_pallas-*.json``.

Each table in the README follows a marker comment that names its kind and the
result files it comes from, for example::

    <!-- gpu-table: softmax gpu_pallas-2026-11-27T1934Z.json -->

    | shape | dtype | Pallas fwd | ...

Kinds: ``softmax`` and ``log_softmax`` (every cell of one run: the kernel's and
``jax.nn``'s times, what ``implementation=None`` ran and the issue's targets),
``ragged`` (softmax then log_softmax, Pallas against ``jax.nn`` only, from one
or more runs in turn) and ``losses``. After a GPU run, point the markers at the
new files and rewrite the tables under them:

    python -m benchmarks.readme_tables --update README.md

Without ``--update`` it prints each marker's table; ``--check`` exits 1 where
the README's table differs from its files (``tests/test_benchmark_results.py``
runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks import gpu_pallas

RESULTS = Path(__file__).resolve().parent / "results"
MARKER = re.compile(r"^<!-- gpu-table: (\S+) ((?:\S+\.json ?)+)-->$")
OP_HEAD = [
  "| shape | dtype | Pallas fwd | `jax.nn` fwd | Pallas bwd | `jax.nn` bwd | fwd+bwd / `jax.nn` "
  "| `None` runs | `None` / `jax.nn` | targets met |",
  "|---|---|---:|---:|---:|---:|---:|---|---:|---|",
]
RAGGED_HEAD = [
  "| op | shape | dtype | Pallas fwd | `jax.nn` fwd | Pallas bwd | `jax.nn` bwd |",
  "|---|---|---|---:|---:|---:|---:|",
]
LOSSES_HEAD = [
  "| loss | shape | dtype | Pallas fwd | XLA fwd | optax fwd | Pallas fwd+bwd | XLA fwd+bwd "
  "| optax fwd+bwd |",
  "|---|---|---|---:|---:|---:|---:|---:|---:|",
]


def load(name: str) -> dict:
  return json.loads((RESULTS / name).read_text())


def _us(seconds: float) -> str:
  return f"{seconds * 1e6:.1f}"


def _of_copy(row: dict, d: str, copy_bw: float) -> str:
  """Direction ``d``'s time in us and its share of the run's copy bandwidth."""
  return f"{_us(row[f'{d}_s'])} ({100 * row[f'{d}_bytes_per_s'] / copy_bw:.0f}%)"


def _cells(by: dict, op: str):
  """Per cell of ``op`` in ``by`` (``gpu_pallas._by_cell``'s rows, in the run's
  order): the Pallas row, jax.nn's and the elementwise op's (None if missing)."""
  for (n, c, dt, who), r in by.items():
    ref = by.get((n, c, dt, f"jax.nn.{op}"))
    if who == "pallas" and ref is not None:
      yield r, ref, by.get((n, c, dt, gpu_pallas.ELEMENTWISE))


def op_table(record: dict, op: str) -> list[str]:
  """One run's cells of ``op``: the kernel (us, % of copy) against ``jax.nn``,
  what ``None`` ran and its time over ``jax.nn``'s, and whether the issue's
  targets are met (``gpu_pallas.targets``' judgement, a yes in bold)."""
  bw = record["copy_bytes_per_s"]
  by = gpu_pallas._by_cell(record["timings"], op)
  out = list(OP_HEAD)
  for r, ref, top in _cells(by, op):
    fwd, bwd = (gpu_pallas._against(r, ref, d, bw, top) for d in ("fwd", "bwd"))
    met = gpu_pallas._met(fwd[2] and bwd[2], fwd[3] or bwd[3]).replace("**", "")
    met = met.replace("yes", "**yes**")
    t_ref = ref["fwd_s"] + ref["bwd_s"]
    none = gpu_pallas.none_times(by, r)
    out.append(
      f"| {r['rows']}x{r['cols']} | {r['dtype']} | {_of_copy(r, 'fwd', bw)} | {_us(ref['fwd_s'])} "
      f"| {_of_copy(r, 'bwd', bw)} | {_us(ref['bwd_s'])} "
      f"| {(r['fwd_s'] + r['bwd_s']) / t_ref:.2f} | {r.get('default', '-')} "
      f"| {'-' if none is None else f'{sum(none) / t_ref:.2f}'} | {met} |"
    )
  return out


def ragged_table(records: list[dict]) -> list[str]:
  """softmax's cells of every run in turn, then log_softmax's: the kernel (us,
  % of its run's copy bandwidth) against ``jax.nn``."""
  out = list(RAGGED_HEAD)
  for op in ("softmax", "log_softmax"):
    for record in records:
      bw = record["copy_bytes_per_s"]
      for r, ref, _ in _cells(gpu_pallas._by_cell(record["timings"], op), op):
        out.append(
          f"| {op} | {r['rows']}x{r['cols']} | {r['dtype']} | {_of_copy(r, 'fwd', bw)} "
          f"| {_us(ref['fwd_s'])} | {_of_copy(r, 'bwd', bw)} | {_us(ref['bwd_s'])} |"
        )
  return out


def losses_table(record: dict) -> list[str]:
  """The losses' forward and forward + backward (us): the kernel, our XLA path, optax."""
  rows = record["losses"]["timings"]
  by = {(r["loss"], r["rows"], r["cols"], r["dtype"], r["contender"]): r for r in rows}
  out = list(LOSSES_HEAD)
  for (loss, n, c, dt, who), r in by.items():
    if who != "pallas":
      continue
    others = [by.get((loss, n, c, dt, o)) for o in ("jaxsoftmax-xla", "optax")]
    if None in others:
      continue
    fwd = " | ".join(_us(x["fwd_s"]) for x in (r, *others))
    both = " | ".join(_us(x["fwd_bwd_s"]) for x in (r, *others))
    out.append(f"| {loss} | {n}x{c} | {dt} | {fwd} | {both} |")
  return out


def table(kind: str, names: list[str]) -> list[str]:
  records = [load(n) for n in names]
  if kind in ("softmax", "log_softmax"):
    (record,) = records
    return op_table(record, kind)
  if kind == "ragged":
    return ragged_table(records)
  if kind == "losses":
    (record,) = records
    return losses_table(record)
  raise ValueError(f"unknown table kind {kind!r}: expected softmax, log_softmax, ragged or losses")


def rewrite(text: str) -> tuple[str, list[str]]:
  """``text`` with the table under each marker made anew from its files, and the
  markers whose table changed."""
  lines, out, changed, i = text.split("\n"), [], [], 0
  while i < len(lines):
    out.append(lines[i])
    m = MARKER.match(lines[i])
    i += 1
    if not m:
      continue
    while i < len(lines) and not lines[i].strip():  # a blank line before the table
      out.append(lines[i])
      i += 1
    old = []
    while i < len(lines) and lines[i].startswith("|"):
      old.append(lines[i])
      i += 1
    new = table(m.group(1), m.group(2).split())
    if new != old:
      changed.append(m.group(0))
    out.extend(new)
  return "\n".join(out), changed


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("readme", nargs="?", default="README.md")
  mode = ap.add_mutually_exclusive_group()
  mode.add_argument("--update", action="store_true", help="rewrite the tables in place")
  mode.add_argument("--check", action="store_true", help="exit 1 where a table differs")
  args = ap.parse_args(argv)
  path = Path(args.readme)
  text = path.read_text()
  new, changed = rewrite(text)
  if args.update:
    path.write_text(new)
    print(f"{len(changed)} table(s) rewritten", file=sys.stderr)
  elif args.check:
    for marker in changed:
      print(f"{path}: the table under {marker} differs from its files", file=sys.stderr)
    return 1 if changed else 0
  else:
    for m in filter(None, map(MARKER.match, text.split("\n"))):
      print("\n".join([m.group(0), "", *table(m.group(1), m.group(2).split()), ""]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
