"""Writing results: the JSON record, the Markdown tables and the plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git_commit() -> str | None:
  # The GPU machine gets a copy of the working tree whose git metadata can be
  # stale (the first GPU run recorded a commit two behind): the caller names it.
  if os.environ.get("BENCH_COMMIT"):
    return os.environ["BENCH_COMMIT"]
  here = Path(__file__).resolve().parent
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--", "jaxsoftmax", "benchmarks"],
      cwd=here,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
    return commit + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def machine_info() -> dict:
  dev = jax.devices()[0]
  info = dict(
    platform=jax.default_backend(),
    device=str(dev),
    device_kind=getattr(dev, "device_kind", None),
    device_count=jax.device_count(),
    cpu_model=_cpu_model(),
    cpu_count=os.cpu_count(),
    python=sys.version.split()[0],
    jax=jax.__version__,
    jaxlib=getattr(jax.lib, "__version__", None) or _jaxlib_version(),
    git_commit=_git_commit(),
  )
  try:
    import torch

    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  except ImportError:
    info["torch"] = None
  try:
    info["load_average"] = list(os.getloadavg())
  except OSError:
    pass
  return info


def _jaxlib_version() -> str | None:
  try:
    import jaxlib

    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


def result_stem(platform_name: str, date: str) -> str:
  return f"{platform_name}-{date}"


def save_json(path: Path, record: dict) -> dict:
  """Writes ``record``, keeping what an existing file holds that this run did not measure.

  Suites this run did not touch are kept whole; in a suite it did, a cell
  (size and dtype) it measured replaces the old one and the others stay, so
  that rerunning one cell (``--size``, ``--dtype``) does not drop the rest.
  Each cell keeps its own repetition count and the commit of the run that
  measured it (``commit``); the file's ``machine`` and a suite's header are the
  last run's, and the Markdown names the cells that came from other runs.
  """
  for suite in record["suites"].values():
    for cell in suite.get("cells", []):
      cell.setdefault("commit", _commit_of(record))
  if path.exists():
    old = json.loads(path.read_text())
    for suite in old.get("suites", {}).values():
      for cell in suite.get("cells", []):
        cell.setdefault("commit", _commit_of(old))
    suites = dict(old.get("suites", {}))
    for name, suite in record["suites"].items():
      if name in suites:
        suite = {**suite, "cells": _merge_cells(suites[name].get("cells", []), suite["cells"])}
        suite["check"] = _merge_cells(suites[name].get("check", []), suite.get("check", []))
      suites[name] = suite
    record = {**record, "suites": suites}
  path.write_text(json.dumps(record, indent=1) + "\n")
  return record


def _commit_of(record: dict) -> str | None:
  machine = record.get("machine")
  return machine.get("git_commit") if isinstance(machine, dict) else None


def _merge_cells(old: list[dict], new: list[dict]) -> list[dict]:
  """``old`` with the entries of ``new`` put in place of those with the same size, dtype
  (and contender, for correctness checks); new ones are appended."""

  def key(c):
    return (tuple(c.get("size", ())), c.get("dtype"), c.get("contender"))

  fresh = {key(c): c for c in new}
  merged = [fresh.pop(key(c), c) for c in old]
  return merged + list(fresh.values())


# ----------------------------------------------------------------------------
# Markdown


def _ms(t: float) -> str:
  return f"{1e3 * t:.3g}" if t < 1 else f"{1e3 * t:.0f}"


def _mib(b: int | None) -> str:
  return "-" if b is None else f"{b / 2**20:.3g}"


def markdown(record: dict) -> str:
  m = record["machine"]
  lines = [
    f"# Benchmarks: {m['platform']}, {record['date']}",
    "",
    f"Machine: {m['cpu_model']}, {m['cpu_count']} CPUs; device {m['device']}; "
    f"jax {m['jax']}, jaxlib {m['jaxlib']}, torch {m.get('torch')}; "
    f"commit `{m['git_commit']}`.",
    "",
    "Times are medians over interleaved repetitions after warm-up, in ms; the",
    "ratio in brackets is to the suite's baseline. GB/s counts the least traffic",
    "the op needs (softmax: forward 2 arrays, x in and y out; backward 3, s and g in",
    "and dx out). A plain copy and an exp pass over the same bytes give the ceilings.",
  ]
  lines += summary(record)
  for name, s in record["suites"].items():
    lines += markdown_suite(name, s, m["git_commit"])
  return "\n".join(lines) + "\n"


def summary(record: dict) -> list[str]:
  """One table of the targets: forward+backward time ratios, ours / reference."""
  cols = []  # (suite, contender, reference)
  rows: dict[tuple[str, str], dict] = {}
  for name, s in record["suites"].items():
    for cell in s["cells"]:
      key = (cell["label"], cell["dtype"])
      for t in cell["targets"]:
        col = (name, t["contender"], t["reference"])
        if col not in cols:
          cols.append(col)
        rows.setdefault(key, {})[col] = t["ratio"]
  if not cols:
    return []
  lines = [
    "",
    "## Summary: forward+backward time, ours / reference (<= 1.00 is the target)",
    "",
    "| size | dtype | " + " | ".join(f"{n}: {c} / {r}" for n, c, r in cols) + " |",
    "|---|---|" + "---:|" * len(cols),
  ]
  for (label, dtype), by in rows.items():
    vals = [f"{by[c]:.2f}" if c in by else "-" for c in cols]
    lines.append(f"| {label} | {dtype} | " + " | ".join(vals) + " |")
  return lines


_MODES = {"fwd+bwd": "Forward + backward", "fwd": "Forward"}


def other_runs(s: dict, commit: str | None) -> list[str]:
  """A line naming the cells kept from earlier runs (``save_json``), with their
  own commit and repetitions, or none."""
  other = [
    f"{c.get('label', c['size'])} {c['dtype']} (commit `{c.get('commit')}`, {c.get('reps')} reps)"
    for c in s["cells"]
    if c.get("commit", commit) != commit or c.get("reps", s["reps"]) != s["reps"]
  ]
  return ["Cells from other runs: " + "; ".join(other) + "."] if other else []


def markdown_suite(name: str, s: dict, commit: str | None = None) -> list[str]:
  contenders = s["contenders"]
  base = s["baseline"]
  how = ""
  if s.get("calls_per_sample", 1) > 1:
    how = f"; a sample is {s['calls_per_sample']} back-to-back calls"
    if any(c.get("batched") for c in s["cells"]):
      how += ", each a program that runs the op once per rotating buffer"
  lines = [
    "",
    f"## {name}",
    "",
    f"{s['description']}. Mode: {s['mode']}, {s['reps']} repetitions{how}, run at {s['time']} "
    f"(load average {s.get('load_average', '?')}).",
  ]
  lines += other_runs(s, commit)
  for mode in ("fwd+bwd", "fwd"):
    lines += [
      "",
      f"### {_MODES[mode]}: median ms (ratio to {base})",
      "",
      "| size | dtype | " + " | ".join(contenders) + " | copy ms | ours GB/s | % copy | % exp |",
      "|---|---|" + "---:|" * (len(contenders) + 4),
    ]
    ours = contenders[0]
    for cell in s["cells"]:
      by = {r["contender"]: r for r in cell["rows"] if r["mode"] == mode}
      cols = []
      for c in contenders:
        r = by.get(c)
        if r is None:
          cols.append("-")
        elif c == base:
          cols.append(_ms(r["median_s"]))
        else:
          cols.append(f"{_ms(r['median_s'])} ({r['ratio']:.2f}x)")
      r = by[ours]
      lines.append(
        f"| {cell['label']} | {cell['dtype']} | "
        + " | ".join(cols)
        + f" | {_ms(cell['roofline']['copy_s'])} | {r['gb_s']:.1f} | {r['pct_copy']:.0f}% "
        f"| {r['pct_exp']:.0f}% |"
      )
  lines += [
    "",
    "### Memory: bytes saved for the backward (saved_residuals) and compiled temp (MiB)",
    "",
    "| size | dtype | " + " | ".join(f"{c} saved / temp" for c in contenders) + " |",
    "|---|---|" + "---:|" * len(contenders),
  ]
  for cell in s["cells"]:
    by = {r["contender"]: r for r in cell["rows"] if r["mode"] == "fwd+bwd"}
    cols = []
    for c in contenders:
      r = by.get(c)
      if r is None or r["residual_bytes"] is None:
        cols.append("-")
      else:
        cols.append(f"{_mib(r['residual_bytes'])} / {_mib(r['temp_bytes'])}")
    lines.append(f"| {cell['label']} | {cell['dtype']} | " + " | ".join(cols) + " |")
  if any(cell["targets"] for cell in s["cells"]):
    lines += ["", "### Targets (forward+backward ratio <= 1.0)", ""]
    lines += ["| size | dtype | " + " | ".join(_target_names(s)) + " |"]
    lines += ["|---|---|" + "---:|" * len(_target_names(s))]
    for cell in s["cells"]:
      cols = [f"{t['ratio']:.2f} {'ok' if t['ok'] else 'MISSED'}" for t in cell["targets"]]
      lines.append(f"| {cell['label']} | {cell['dtype']} | " + " | ".join(cols) + " |")
  if s.get("check"):
    lines += [
      "",
      "### Correctness (relative L2 error vs float64 naive definition, in eps)",
      "",
      "| dtype | contender | forward | backward | ok |",
      "|---|---|---:|---:|---|",
    ]
    for r in s["check"]:
      lines.append(
        f"| {r['dtype']} | {r['contender']} | {r['fwd_err_eps']:.2f} | {r['bwd_err_eps']:.2f} "
        f"| {'yes' if r['ok'] else 'NO'} |"
      )
  return lines


def _target_names(s: dict) -> list[str]:
  for cell in s["cells"]:
    if cell["targets"]:
      return [f"{t['contender']} / {t['reference']}" for t in cell["targets"]]
  return []


# ----------------------------------------------------------------------------
# Plot


def plot(name: str, s: dict, path: Path, platform_name: str) -> bool:
  """GB/s against row length, one line per contender; one panel per mode and dtype."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  dtypes = list(dict.fromkeys(c["dtype"] for c in s["cells"]))
  modes = ["fwd", "fwd+bwd"]
  fig, axes = plt.subplots(
    len(modes), len(dtypes), figsize=(5.5 * len(dtypes), 4 * len(modes)), squeeze=False
  )
  for i, mode in enumerate(modes):
    for j, dtype in enumerate(dtypes):
      ax = axes[i][j]
      cells = sorted((c for c in s["cells"] if c["dtype"] == dtype), key=lambda c: c["row_length"])
      xs = [c["row_length"] for c in cells]
      for contender in s["contenders"]:
        ys = [
          next(
            (r["gb_s"] for r in c["rows"] if r["contender"] == contender and r["mode"] == mode),
            float("nan"),
          )
          for c in cells
        ]
        ax.plot(xs, ys, marker="o", label=contender)
      ax.plot(xs, [c["roofline"]["copy_gb_s"] for c in cells], "k--", label="copy ceiling")
      ax.plot(xs, [c["roofline"]["exp_gb_s"] for c in cells], "k:", label="exp pass")
      ax.set_xscale("log", base=2)
      ax.set_ylim(bottom=0)
      ax.set_xlabel("row length (softmax axis)")
      ax.set_ylabel("GB/s (least traffic)")
      ax.set_title(f"{name} {mode}, {dtype}")
      ax.grid(True, alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(f"{name} on {platform_name} ({s['time'][:10]}); higher is better")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def now() -> datetime.datetime:
  return datetime.datetime.now(datetime.UTC)
