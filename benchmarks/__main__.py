"""``python -m benchmarks``: what do I gain or lose with jaxsoftmax on this machine?

For each suite (an op and its contenders, see ``benchmarks/suites/``) and each
size and dtype, it first checks every contender against the float64 naive
definition, then times forward and forward+backward of all contenders
interleaved in one process, with the copy and exp passes over the same bytes as
the roofline. It reports median times, ratios to the baseline, GB/s and the
percentage of the ceiling, the bytes saved for the backward and the compiled
programs' temporary memory, and writes a JSON record, a Markdown table and a
plot to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Idle OpenMP threads (PyTorch's) must not spin while the JAX contenders run.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import harness, report
from .registry import discover

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parse(argv):
  suites = discover()
  p = argparse.ArgumentParser(
    prog="python -m benchmarks",
    description=__doc__.split("\n")[0].split(": ", 1)[1],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="suites:\n" + "\n".join(f"  {n:<22} {s.description}" for n, s in suites.items()),
  )
  p.add_argument(
    "--suite",
    action="append",
    choices=sorted(suites),
    help="run only this suite (repeatable; default: all)",
  )
  p.add_argument("--quick", action="store_true", help="3 sizes, 12 repetitions")
  p.add_argument("--reps", type=int, help="timed repetitions per program (default 30, quick 12)")
  p.add_argument("--warmup", type=int, default=3, help="untimed calls per program first")
  p.add_argument(
    "--calls",
    type=int,
    help="back-to-back calls per timed sample (default: 1 on the CPU, 20 on accelerators)",
  )
  p.add_argument(
    "--budget",
    type=float,
    help="stop starting new cells after this many seconds (the rest is skipped and listed)",
  )
  p.add_argument("--dtype", action="append", help="only this dtype (repeatable)")
  p.add_argument(
    "--size", action="append", help="only this size, e.g. 4096x512 (repeatable; overrides)"
  )
  p.add_argument(
    "--no-torch",
    action="store_true",
    help="leave PyTorch (CPU) out even if installed; always left out on accelerators",
  )
  p.add_argument("--contender", action="append", help="only this contender (repeatable)")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
  p.add_argument("--no-save", action="store_true", help="print only, write no files")
  p.add_argument("--no-plots", action="store_true", help="write JSON and Markdown, no PNG")
  p.add_argument("--check-only", action="store_true", help="run the correctness check and stop")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--list", action="store_true", help="list the suites and exit")
  return p.parse_args(argv), suites


def _progress(total: int):
  try:
    from tqdm import tqdm

    return tqdm(
      total=total, unit="cell", file=sys.stderr, leave=False, disable=not sys.stderr.isatty()
    )
  except ImportError:
    return None


def _cell_text(suite, cell) -> str:
  roof = cell["roofline"]
  lines = [
    f"\n{suite.name} {cell['label']} {cell['dtype']}: copy {1e3 * roof['copy_s']:.3f} ms "
    f"({roof['copy_gb_s']:.1f} GB/s), exp pass {roof['exp_gb_s']:.1f} GB/s",
    f"  {'contender':<20} {'mode':<8} {'ms':>9} {'/' + suite.baseline:>10} {'GB/s':>7} "
    f"{'%copy':>6}",
  ]
  for r in cell["rows"]:
    ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    lines.append(
      f"  {r['contender']:<20} {r['mode']:<8} {1e3 * r['median_s']:>9.3f} {ratio:>10} "
      f"{r['gb_s']:>7.1f} {r['pct_copy']:>5.0f}%"
    )
  for t in cell["targets"]:
    lines.append(
      f"  target {t['contender']} / {t['reference']} fwd+bwd: {t['ratio']:.2f}x "
      f"(<= {t.get('limit', 1.0):.2f}x) {'ok' if t['ok'] else 'MISSED'}"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  args, suites = _parse(argv)
  if args.list:
    for n, s in suites.items():
      print(f"{n:<22} {s.description}")
    return 0
  selected = [suites[n] for n in (args.suite or suites)]
  reps = args.reps or (12 if args.quick else 30)
  machine = report.machine_info()
  on_cpu = machine["platform"] == "cpu"
  # torch contenders run on the CPU: comparing them with JAX on an accelerator says nothing.
  use_torch = on_cpu and harness.torch_available() and not args.no_torch
  calls = args.calls or (1 if on_cpu else 20)
  print(
    f"{machine['platform']}: {machine['device']}, {machine['cpu_model']} x{machine['cpu_count']}; "
    f"jax {machine['jax']}, torch {machine.get('torch') if use_torch else 'not used'}"
  )

  started = report.now()
  record = dict(date=started.strftime("%Y-%m-%d"), machine=machine, suites={})
  failed_check = False
  plan = []
  wanted_sizes = [tuple(int(n) for n in z.split("x")) for z in args.size or ()]
  for z in wanted_sizes:
    if not any(len(z) == len(suite.check_size) for suite in selected):
      arities = sorted({len(suite.check_size) for suite in selected})
      raise SystemExit(
        f"--size {'x'.join(map(str, z))}: {len(z)} dimensions, but the selected suites "
        f"take {' or '.join(map(str, arities))}"
      )
  for suite in selected:
    contenders = [
      c
      for c in suite.contenders
      if (use_torch or c.framework != "torch")
      and (not args.contender or c.name in args.contender or c.name == suite.baseline)
    ]
    dtypes = args.dtype or list(suite.dtypes)
    if args.size:
      # Each suite takes the sizes of its own arity (rows x classes, or
      # tokens x hidden x vocabulary for the fused linear one).
      sizes = [z for z in wanted_sizes if len(z) == len(suite.check_size)]
    else:
      sizes = list(suite.quick_sizes if args.quick else suite.sizes)
    plan.append((suite, contenders, dtypes, sizes))

  for suite, contenders, dtypes, _ in plan:
    rows = [r for dt in dtypes for r in harness.check(suite, dt, contenders, args.seed)]
    bad = [r for r in rows if not r["ok"]]
    print(f"\ncheck {suite.name}: {len(rows) - len(bad)}/{len(rows)} within tolerance")
    for r in bad:
      print(
        f"  MISMATCH {r['contender']} {r['dtype']}: forward {r['fwd_err_eps']:.1f} eps, "
        f"backward {r['bwd_err_eps']:.1f} eps (allowed {r['tolerance_eps']})"
      )
    failed_check |= bool(bad)
    record["suites"][suite.name] = dict(
      description=suite.description,
      baseline=suite.baseline,
      contenders=[c.name for c in contenders],
      mode="quick" if args.quick else "full",
      reps=reps,
      check=rows,
      cells=[],
    )
  if failed_check:
    print("\nCorrectness check failed: not timing.", file=sys.stderr)
    return 1
  if args.check_only:
    return 0

  bar = _progress(sum(len(d) * len(s) for _, _, d, s in plan))
  skipped = []
  for suite, contenders, dtypes, sizes in plan:
    entry = record["suites"][suite.name]
    entry["time"] = report.now().isoformat(timespec="seconds")
    try:
      entry["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
      pass
    entry["calls_per_sample"] = calls
    for size in sizes:
      for dtype in dtypes:
        if args.budget is not None and (report.now() - started).total_seconds() > args.budget:
          skipped.append(f"{suite.name} {suite.size_label(size)} {dtype}")
          continue
        cell = harness.measure_cell(
          suite, size, dtype, contenders, reps, args.warmup, args.seed, calls, batch=not on_cpu
        )
        cell["load_average"] = [round(v, 2) for v in os.getloadavg()]
        entry["cells"].append(cell)
        if bar is not None:
          bar.update(1)
        (print if bar is None else bar.write)(_cell_text(suite, cell))
  if bar is not None:
    bar.close()
  elapsed = (report.now() - started).total_seconds()
  print(f"\ndone in {elapsed:.0f} s")
  if skipped:
    print(f"skipped (over the {args.budget:.0f} s budget): {', '.join(skipped)}")
    for name in record["suites"]:
      record["suites"][name]["skipped"] = [s for s in skipped if s.startswith(name + " ")]

  missed = [
    (n, c["label"], c["dtype"], t)
    for n, s in record["suites"].items()
    for c in s["cells"]
    for t in c["targets"]
    if not t["ok"]
  ]
  for n, label, dtype, t in missed:
    print(f"target missed: {n} {label} {dtype} {t['contender']}/{t['reference']} {t['ratio']:.2f}x")

  if not args.no_save:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = report.result_stem(machine["platform"], record["date"])
    merged = report.save_json(args.out / f"{stem}.json", record)
    (args.out / f"{stem}.md").write_text(report.markdown(merged))
    written = [f"{stem}.json", f"{stem}.md"]
    for name, s in merged["suites"].items():
      png = args.out / f"{stem}-{name}.png"
      if s["cells"] and not args.no_plots and report.plot(name, s, png, machine["platform"]):
        written.append(png.name)
    print(f"wrote {', '.join(written)} in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
