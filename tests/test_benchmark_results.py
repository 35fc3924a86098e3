"""benchmarks/report.py: rerunning part of a suite keeps the rest of the saved results."""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import report


def _cell(size, dtype, ms):
  return {"size": list(size), "dtype": dtype, "rows": [{"median_s": ms / 1e3}]}


def _run(commit, suites):
  return {"machine": {"git_commit": commit}, "suites": suites}


def test_rerunning_one_cell_keeps_the_others(tmp_path):
  path = tmp_path / "cpu.json"
  first = _run(
    "a",
    {
      "ce": {"reps": 9, "cells": [_cell((8, 4), "float32", 1.0), _cell((8, 4), "bfloat16", 2.0)]},
      "softmax": {"reps": 30, "cells": [_cell((4, 4), "float32", 3.0)]},
    },
  )
  report.save_json(path, first)
  rerun = {"reps": 40, "cells": [_cell((8, 4), "float32", 5.0)]}
  merged = report.save_json(path, _run("b", {"ce": rerun}))
  assert json.loads(path.read_text()) == merged
  assert merged["machine"] == {"git_commit": "b"}
  assert merged["suites"]["softmax"] == first["suites"]["softmax"]
  ce = merged["suites"]["ce"]
  assert ce["reps"] == 40
  # Each cell keeps the commit of the run that measured it.
  assert ce["cells"] == [
    {**_cell((8, 4), "float32", 5.0), "commit": "b"},
    {**_cell((8, 4), "bfloat16", 2.0), "commit": "a"},
  ]
  # A new cell is appended after the old ones.
  third = _run("c", {"ce": {"reps": 9, "cells": [_cell((16, 4), "float32", 7.0)]}})
  cells = report.save_json(path, third)["suites"]["ce"]["cells"]
  assert [(c["size"], c["commit"]) for c in cells] == [([8, 4], "b"), ([8, 4], "a"), ([16, 4], "c")]


def test_markdown_names_the_cells_from_other_runs():
  cell = {"size": [8, 4], "label": "8x4", "dtype": "float32", "rows": [], "reps": 9}
  cells = [{**cell, "commit": "new", "reps": 30}, {**cell, "dtype": "bfloat16", "commit": "old"}]
  lines = report.other_runs({"reps": 30, "cells": cells}, "new")
  assert lines == ["Cells from other runs: 8x4 bfloat16 (commit `old`, 9 reps)."]
  assert report.other_runs({"reps": 30, "cells": cells[:1]}, "new") == []


# ----------------------------------------------- benchmarks/gpu_pallas.py, on the CPU


def _xla_kernels(monkeypatch, off=()):
  """The GPU module's 2-D kernels replaced by XLA stand-ins (the same results,
  in a fraction of interpret mode's time), for tests of the script around them;
  the forward's output off by 1% at the rows (indices) in ``off``. The real
  kernels go through the script's programs in
  ``test_every_kernel_of_the_gpu_script_lowers_for_cuda``."""
  from benchmarks import gpu_pallas

  def fwd(x, *, log, cfg, lse=None):
    y = jnp.where(x == -jnp.inf, -jnp.inf, jax.nn.log_softmax(x)) if log else jax.nn.softmax(x)
    for r in off:
      y = y.at[r].multiply(1.01)
    return y, jax.nn.logsumexp(x, axis=1, keepdims=True)

  def bwd(y, g, live=None, *, log, cfg):
    if not log:
      return y * (g - (g * y).sum(1, keepdims=True))
    if live is None:
      live = jnp.any(y != -jnp.inf, axis=1, keepdims=True)
    return live * (g - jnp.exp(y) * g.sum(1, keepdims=True))

  monkeypatch.setattr(gpu_pallas.gpu, "softmax_fwd_2d", fwd)
  monkeypatch.setattr(gpu_pallas.gpu, "softmax_bwd_2d", bwd)


def test_gpu_script_variants_run_and_catch_a_wrong_kernel(monkeypatch):
  # The variant timings run on the GPU machine after everything else; here they
  # run at three small sizes. Each variant is
  # timed together with the default of its cell, when that ran first. A cell
  # where only the default is left to run does not run, nor the default's
  # softmax where only log_softmax variants are left (4 x 1280: its registers
  # skipped). The paths are the configs' (gpu.route); the kernels are XLA
  # stand-ins.
  from benchmarks import gpu_pallas

  _xla_kernels(monkeypatch)

  Config = gpu_pallas.gpu.Config
  for make, _ in gpu_pallas.VARIANTS.values():  # a Config, or a dict of them by dtype
    cfg = make()
    assert all(isinstance(c, Config) for c in (cfg.values() if isinstance(cfg, dict) else [cfg]))
  small = dict(interpret=True, chunk_elems=256, split_bytes=0, bwd_split_bytes=0)
  small.update(row_bytes=256, bwd_row_bytes=256)  # rows stream, forward and backward
  monkeypatch.setattr(gpu_pallas, "BATCH_BYTES", 1)  # 2 buffers per timed program
  monkeypatch.setattr(gpu_pallas, "WARM_S", 0.0)  # no warm-up runs past the first
  variants = {
    "default": (lambda: Config(**small), [(4, 1280), (4, 256)]),
    "registers": (lambda: Config(interpret=True, register_elems=8192), [(4, 1280), (4, 256)]),
    "split rows": (
      lambda: Config(**{**small, "split_bytes": 2048, "bwd_split_bytes": 2048, "split_cluster": 8}),
      [(4, 2048)],
    ),
    # Configs by dtype: a cell for float32 only, none for bfloat16 only.
    "one part": (
      lambda: {"float32": Config(**{**small, "split_bytes": 1 << 20, "bwd_split_bytes": 1 << 20})},
      [(4, 256)],
    ),
    "bfloat16 only": (lambda: {"bfloat16": Config(**small)}, [(4, 256)]),
    # log_softmax's, paired with the default's log_softmax (built for it): the
    # backward of whole rows taking the live flag in a pass of its own.
    gpu_pallas.LOG + "live flag": (
      lambda: Config(interpret=True, live_in_rowsum=False),
      [(4, 1280), (4, 256)],
    ),
  }
  monkeypatch.setattr(gpu_pallas, "VARIANTS", variants)
  # Each trace of a stand-in is a program compiled around a kernel: counted by
  # cell, forward and backward, softmax and log_softmax.
  traced = collections.Counter()

  def counted(way, real):
    def kernel(*args, **kw):
      traced[way, kw["log"]] += 1
      return real(*args, **kw)

    return kernel

  for way in ("fwd", "bwd"):
    name = f"softmax_{way}_2d"
    monkeypatch.setattr(gpu_pallas.gpu, name, counted(way, getattr(gpu_pallas.gpu, name)))
  started, per_cell = [], []

  def on_start(key):
    started.append(key)
    per_cell.append(traced.copy())

  skip = {gpu_pallas.cell_key("registers", 4, 1280, "float32")}
  rows = gpu_pallas.variants(["float32"], 1, 1, skip=skip, on_start=on_start)
  per_cell = [b - a for a, b in zip(per_cell, [*per_cell[1:], traced.copy()], strict=True)]
  # A cell traces each of its kernels once: the timed op's, batched for the
  # timing and run by its check, and the other op's, for its check; a cell's
  # first log_softmax variant also the default's log_softmax, paired with it.
  # (Before, the timed op's were traced for its check, then for the timing.)
  once = collections.Counter({(d, log): 1 for d in ("fwd", "bwd") for log in (False, True)})
  paired = once + collections.Counter({("fwd", True): 1, ("bwd", True): 1})
  assert per_cell == [paired, once, once, once, paired, once], per_cell
  assert [(r["variant"], r["cols"]) for r in rows] == [
    ("default", 1280),  # log_softmax's, as timed with the variant below
    ("log_softmax: live flag", 1280),
    ("default", 256),
    ("registers", 256),
    ("one part", 256),
    ("default", 256),  # log_softmax's, as timed with the variant below
    ("log_softmax: live flag", 256),
    ("split rows", 2048),
  ]
  assert [r["op"] for r in rows] == ["log_softmax"] * 2 + ["softmax"] * 3 + ["log_softmax"] * 2 + [
    "softmax"
  ]
  assert started == [
    "log_softmax: live flag 4x1280 float32",
    "default 4x256 float32",
    "registers 4x256 float32",
    "one part 4x256 float32",
    "log_softmax: live flag 4x256 float32",
    "split rows 4x2048 float32",
  ]
  assert all("error" not in r and r["fwd_s"] > 0 and r["bwd_s"] > 0 for r in rows), rows
  # (The default's log_softmax row is not a cell of its own: no wall time.)
  logged = [rows[0], rows[5]]
  assert all(r["wall_s"] > r["fwd_s"] + r["bwd_s"] for r in rows if r not in logged), rows
  assert all("wall_s" not in r and r["variant"] == "default" for r in logged)
  assert [r["path"] for r in rows] == [
    "streamed / streamed",
    "rows / rows",
    "streamed / streamed",
    "rows / rows",  # (shorter than a chunk of vectors: no registers)
    "split / split",
    "streamed / streamed",
    "rows / rows",
    "split 4 / split 8",
  ]
  md = gpu_pallas.markdown(dict(device="d", jax="j", date="t"), [], [], 1e9, rows)
  assert md.count("| split 4 / split 8 |") == 1
  # Paired with the default: the variants, not the default itself nor the
  # split rows, whose cell has no default.
  paired = [r["variant"] for r in rows if r.get("fwd_vs_default", 0) > 0 < r["bwd_vs_default"]]
  assert paired == ["log_softmax: live flag", "registers", "one part", "log_softmax: live flag"]
  table, best = md.split("## The fastest correct variant per cell")
  assert table.count("x / ") == 4 and table.count("| - |") == 4
  # No jax.nn times (no timing rows): no verdict on the targets, per cell.
  assert best.count("| - |\n") == 4 and "**no**" not in best
  # --variant-shapes: only the cells at these of the variants' shapes (4 x 999 is
  # none of theirs; 4 x 2048, the split rows, is left out); here all but one of
  # the cells at 4 x 256 skipped as done.
  done = {gpu_pallas.cell_key(n, 4, 256, "float32") for n in variants if n != "one part"}
  rows = gpu_pallas.variants(["float32"], 1, 1, skip=done, shapes=[(4, 999), (4, 256)])
  assert [(r["variant"], r["cols"]) for r in rows] == [("one part", 256)]

  # A kernel off by a factor is reported as wrong and not timed.
  monkeypatch.setattr(gpu_pallas, "VARIANTS", {k: variants[k] for k in ("default", "registers")})
  _xla_kernels(monkeypatch, off=[np.s_[:]])
  rows = gpu_pallas.variants(["float32"], calls=1, samples=1, shapes=[(4, 256)])
  assert [r["error"][:26] for r in rows] == ["wrong: softmax fwd err 1.0"] * 2, rows


def test_gpu_script_variant_check_catches_a_wrong_live_flag(monkeypatch):
  # A log_softmax variant is checked with an all -inf row, whose gradient must
  # be 0: a backward that gives it g is caught.
  from benchmarks import gpu_pallas

  gpu = gpu_pallas.gpu
  kx, kg = jax.random.split(jax.random.key(0))
  x, g = jax.random.normal(kx, (4, 256)), jax.random.normal(kg, (4, 256))
  eps = float(jnp.finfo(jnp.float32).eps)

  def ref(log):
    return gpu_pallas._ref64(np.asarray(x), np.ones(x.shape, bool), np.asarray(g), log)

  cfg = gpu.Config(interpret=True)
  assert gpu_pallas._variant_check(cfg, x, g, True, eps, ref) is None
  real = gpu.softmax_bwd_2d
  wrong = lambda y, g, live=None, **kw: real(y, g, live, **kw).at[0].set(g[0])  # noqa: E731
  monkeypatch.setattr(gpu, "softmax_bwd_2d", wrong)
  assert gpu_pallas._variant_check(cfg, x, g, True, eps, ref).endswith(", empty row")


def test_gpu_script_variant_check_samples_rows(monkeypatch):
  # Past 512 rows a variant cell checks some rows against float64: the first and
  # last 8 and every 37th, on every residue modulo a power of two; then every
  # row against XLA's float32, more loosely. A kernel wrong on the last row, on
  # every odd row, or on one row of those left out, is caught; here the
  # "kernels" are stand-ins on XLA, to run 1024 rows in little time.
  from benchmarks import gpu_pallas

  rows = gpu_pallas.variant_rows(4096)
  assert rows[0] == 0 and np.all(np.diff(rows) > 0) and rows[-1] == 4095
  assert set(range(8)) | set(range(4088, 4096)) <= set(rows.tolist()) and len(rows) < 4096 // 30
  for m in (2, 4, 8, 16, 32):
    assert set((rows % m).tolist()) == set(range(m))
  assert gpu_pallas.variant_rows(512).tolist() == list(range(512))

  gpu = gpu_pallas.gpu
  off = []  # the rows (an index) whose forward output is off by 1%
  _xla_kernels(monkeypatch, off)
  fwd = gpu.softmax_fwd_2d
  monkeypatch.setattr(gpu, "bwd_reads_live", lambda *a: True)
  kx, kg = jax.random.split(jax.random.key(1))
  x, g = jax.random.normal(kx, (1024, 16), jnp.float32), jax.random.normal(kg, (1024, 16))
  eps = float(jnp.finfo(jnp.float32).eps)
  picked = gpu_pallas.variant_rows(1024)

  def ref(log):
    xs, gs = np.asarray(x)[picked], np.asarray(g)[picked]
    return gpu_pallas._ref64(xs, np.ones(xs.shape, bool), gs, log)

  cfg = gpu.Config()
  for log in (False, True):
    assert gpu_pallas._variant_check(cfg, x, g, log, eps, ref) is None
  off.append(1023)
  assert gpu_pallas._variant_check(cfg, x, g, False, eps, ref).startswith("wrong: softmax fwd")
  off[:] = [np.s_[1::2]]
  assert gpu_pallas._variant_check(cfg, x, g, True, eps, ref).startswith("wrong: log_softmax fwd")
  # A row that the float64 check leaves out: the screen of every row against
  # XLA's float32 finds it, and names it.
  assert 500 not in picked
  off[:] = [500]
  wrong = gpu_pallas._variant_check(cfg, x, g, False, eps, ref)
  assert wrong.startswith("wrong: softmax fwd err 1.0") and "(row 500)" in wrong, wrong
  # A NaN there too.
  off[:] = []
  nan = jnp.full((16,), jnp.nan)
  monkeypatch.setattr(gpu, "softmax_fwd_2d", lambda x, **kw: (fwd(x, **kw)[0].at[500].set(nan), 0))
  wrong = gpu_pallas._variant_check(cfg, x, g, False, eps, ref)
  assert "fwd err inf (row 500)" in wrong, wrong


def test_gpu_script_targets():
  # 1000 B/s copy; a cell moves 2 (fwd) or 3 (bwd) arrays of 100 bytes.
  def cell(who, fwd_s, bwd_s):
    return dict(rows=1, cols=25, dtype="float32", contender=who, fwd_s=fwd_s, bwd_s=bwd_s,
                fwd_bytes_per_s=200 / fwd_s, bwd_bytes_per_s=300 / bwd_s)  # fmt: skip

  from benchmarks.gpu_pallas import targets

  met_rows = [cell("pallas", 0.22, 0.33), cell("jax.nn.softmax", 0.4, 0.4)]
  met = targets(met_rows, 1000.0)
  assert met[-1] == "| 1x25 | float32 | 91% | 91% | 0.55x | 0.82x | yes | - |"
  # The share of the cell's elementwise ceiling: its time over Pallas's.
  top = targets([*met_rows, cell("elementwise (same bytes)", 0.11, 0.3)], 1000.0)
  assert top[-1] == "| 1x25 | float32 | 91% | 91% | 0.55x | 0.82x | yes | 50% / 91% |"
  # 80% of copy misses the bandwidth target.
  slow = targets([cell("pallas", 0.25, 0.33), cell("jax.nn.softmax", 0.4, 0.4)], 1000.0)
  assert slow[-1].endswith("| **no** | - |") and "| 80% |" in slow[-1]
  # Slower than jax.nn is allowed only where jax.nn is itself at the ceiling:
  # >= 95% of copy, or within 1 / 0.95 of an elementwise op's time on the same
  # bytes (the ceiling at that size).
  tie = targets([cell("pallas", 0.22, 0.33), cell("jax.nn.softmax", 0.205, 0.4)], 1000.0)
  assert tie[-1].endswith("| 1.07x | 0.82x | yes, jax.nn at the ceiling | - |")
  behind = targets([cell("pallas", 0.22, 0.33), cell("jax.nn.softmax", 0.4, 0.32)], 1000.0)
  assert behind[-1].endswith("| 1.03x | **no** | - |")
  # jax.nn at 87% of copy forward, the elementwise op at 89%: 0.98 of its time.
  size_rows = [cell("pallas", 0.235, 0.33), cell("jax.nn.softmax", 0.23, 0.4)]
  at_top = targets([*size_rows, cell("elementwise (same bytes)", 0.225, 0.3)], 1000.0)
  assert at_top[-1].startswith("| 1x25 | float32 | 85% | 91% | 1.02x | 0.82x ")
  assert "| yes, jax.nn at the ceiling |" in at_top[-1]
  # The elementwise op well ahead of jax.nn (0.87 of its time): no exception.
  below = targets([*size_rows, cell("elementwise (same bytes)", 0.2, 0.3)], 1000.0)
  assert "| 1.02x | 0.82x | **no** |" in below[-1]
  assert "**no**" in targets(size_rows, 1000.0)[-1]  # no elementwise row: copy alone


def test_gpu_script_interleaves_the_contenders(monkeypatch):
  # Each sample runs every program in turn (after each has warmed up), so that
  # the contenders share the GPU's clock state; one that fails to compile is
  # returned as its exception and the others are still timed.
  import jax.numpy as jnp
  from jax.experimental import io_callback

  from benchmarks import gpu_pallas

  monkeypatch.setattr(gpu_pallas, "WARM_S", 0.0)
  ran = []

  def program(name):
    def fn(x):
      io_callback(lambda: ran.append(name), None, ordered=True)
      return x + 1

    return fn

  def broken(x):
    raise ValueError("does not compile")

  x = jnp.ones(4)
  programs = [(program("a"), [(x,)]), (broken, [(x,)]), (program("b"), [(x,)])]
  t_a, err, t_b = gpu_pallas._interleaved(programs, calls=2, samples=3)
  assert t_a > 0 and t_b > 0 and isinstance(err, ValueError)
  # Compiled (no warm-up here), an untimed round, then 3 samples of 2 calls,
  # every other one in reverse order.
  assert ran == ["a", "b", "b", "a"] + ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
  with pytest.raises(ValueError, match="does not compile"):
    gpu_pallas._time(broken, [(x,)], calls=1, samples=1)


def test_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
  # The whole script (its smoke-test mode: tiny sizes, the XLA contenders only),
  # so that a crash in it is found here and not on the GPU machine.
  from benchmarks import gpu_pallas

  assert gpu_pallas.main(["--allow-cpu", "--out", str(tmp_path), "--calls", "2"]) == 0
  (md,) = tmp_path.glob("gpu_pallas-*.md")
  (js,) = tmp_path.glob("gpu_pallas-*.json")
  result = json.loads(js.read_text())
  assert result["copy_bytes_per_s"] > 0
  who = {(r["op"], r["contender"]) for r in result["timings"]}
  assert who == {
    ("softmax", "jaxsoftmax-xla"),
    ("softmax", "jax.nn.softmax"),
    ("softmax", "elementwise (same bytes)"),
    ("log_softmax", "jaxsoftmax-xla"),
    ("log_softmax", "jax.nn.log_softmax"),
    ("log_softmax", "elementwise (same bytes)"),
    ("softmax, where", "jaxsoftmax-xla"),
    ("softmax, where", "jax.nn.softmax"),
    ("softmax, where", "elementwise (same bytes)"),
  }
  assert all(r["fwd_s"] > 0 and r["bwd_s"] > 0 for r in result["timings"])
  text = md.read_text()
  assert "| 64x256 | float32 | jax.nn.softmax |" in text
  assert "## softmax, where timings" in text and "## softmax, where targets" not in text
  # NEW_SIZES (here 8 x 384) last of all, each op's table in that order too.
  shapes = [(r["rows"], r["cols"]) for r in result["timings"]]
  assert shapes.index((8, 384)) == len(shapes) - shapes[::-1].index((64, 256))
  assert text.index("| 64x256 | float32 | jax.nn.softmax |") < text.index(
    "| 8x384 | float32 | jax.nn.softmax |"
  )
  # The losses (step 4): checked on the default implementation here, timed against optax.
  losses = result["losses"]
  assert {(c["loss"], c["implementation"]) for c in losses["checks"]} == {
    ("integer labels", "default"),
    ("soft labels", "default"),
  }
  assert all(c["ok"] for c in losses["checks"])
  who = {(r["loss"], r["contender"]) for r in losses["timings"] if "error" not in r}
  kinds = ("integer labels", "soft labels", "integer labels, padding mask")
  assert who == {(k, c) for k in kinds for c in ("jaxsoftmax-xla", "optax")}
  assert all(r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 for r in losses["timings"])
  assert text.index("## log_softmax targets") < text.index("## Losses")
  assert "| integer labels | 64x1000 | float32 | optax |" in text

  # --sizes "" (a second call on the GPU machine, for the variants): no checks
  # or timings, the copy bandwidth still measured.
  later = tmp_path / "later"
  args = ["--allow-cpu", "--out", str(later), "--calls", "2", "--sizes", "", "--check-cols", ""]
  assert gpu_pallas.main([*args, "--no-losses"]) == 0
  (js,) = later.glob("gpu_pallas-*.json")
  result = json.loads(js.read_text())
  assert result["checks"] == [] and result["timings"] == [] and result["copy_bytes_per_s"] > 0
  assert "losses" not in result


def test_gpu_script_best_variants():
  # The fastest correct variant forward and backward per cell, as a new default
  # would give them, against jax.nn's time from the main table. 1000 B/s copy.
  from benchmarks.gpu_pallas import ELEMENTWISE, best_variants

  def cell(fwd_s, bwd_s, rows=1, **kw):
    return dict(rows=rows, cols=25, dtype="float32", fwd_s=fwd_s, bwd_s=bwd_s,
                fwd_bytes_per_s=200 / fwd_s, bwd_bytes_per_s=300 / bwd_s, **kw)  # fmt: skip

  nn = [cell(0.4, 0.4, contender="jax.nn.softmax"), cell(0.4, 0.4, contender="pallas")]
  nn.append(cell(0.2, 0.5, op="log_softmax", contender="jax.nn.log_softmax"))
  variants = [
    cell(0.25, 0.33, variant="a"),
    cell(0.22, 0.5, variant="b"),
    dict(rows=1, cols=25, dtype="float32", variant="c", error="wrong: ..."),
    cell(0.1, 0.1, rows=2, variant="a"),  # a cell with no jax.nn time
    # log_softmax's: against jax.nn.log_softmax, whose forward (at copy
    # bandwidth: no faster one needed) is faster than jax.nn.softmax's here
    cell(0.22, 0.33, op="log_softmax", variant="log_softmax: d"),
  ]
  table = best_variants(variants, nn, 1000.0)
  assert table[2] == "| softmax | 1x25 | float32 | b | 91%, 0.55x | a | 91%, 0.82x | yes |"
  assert table[3] == "| softmax | 2x25 | float32 | a | 200% | a | 300% | - |"
  log = "| log_softmax | 1x25 | float32 | log_softmax: d | 91%, 1.10x "
  assert table[4] == log + "| log_softmax: d | 91%, 0.66x | yes, jax.nn at the ceiling |"
  assert len(table) == 5
  slow = best_variants([cell(0.25, 0.33, variant="a")], nn, 1000.0)
  assert slow[2].endswith("| a | 80%, 0.62x | a | 91%, 0.82x | **no** |")
  # Slower than jax.nn (1.02x) where the cell's elementwise op shows jax.nn at
  # the ceiling (0.98 of its time).
  top = [cell(0.23, 0.4, contender="jax.nn.softmax"), cell(0.225, 0.3, contender=ELEMENTWISE)]
  near = best_variants([cell(0.235, 0.33, variant="a")], top, 1000.0)
  assert near[2].endswith("| a | 85%, 1.02x | a | 91%, 0.82x | yes, jax.nn at the ceiling |")
  assert best_variants([cell(0.235, 0.33, variant="a")], top[:1], 1000.0)[2].endswith("**no** |")


# ------------------------------------------------------ python -m benchmarks --size


def test_sizes_go_to_the_suites_of_their_arity(capsys):
  # A 3-dimensional size is the fused linear suite's; a 2-dimensional one the others'.
  # (On the GPU machine one --size of each kind once crashed the run in its third suite.)
  from benchmarks.__main__ import main

  argv = ["--suite", "softmax", "--suite", "linear_cross_entropy", "--dtype", "float32"]
  argv += ["--size", "16x128", "--size", "16x8x128", "--reps", "1", "--no-save", "--no-torch"]
  assert main(argv) == 0
  out = capsys.readouterr().out
  assert "softmax 16x128 float32" in out and "linear_cross_entropy 16x8x128 float32" in out
  with pytest.raises(SystemExit, match="--size 2x3x4x5: 4 dimensions.*take 2 or 3"):
    main(argv[:6] + ["--size", "2x3x4x5"])


def test_gpu_script_targets_per_op():
  # log_softmax cells are judged against jax.nn.log_softmax, and only in their own table.
  def cell(op, who, fwd_s):
    return dict(op=op, rows=1, cols=25, dtype="float32", contender=who, fwd_s=fwd_s, bwd_s=0.33,
                fwd_bytes_per_s=200 / fwd_s, bwd_bytes_per_s=300 / 0.33)  # fmt: skip

  from benchmarks.gpu_pallas import targets

  rows = [
    cell("log_softmax", "pallas", 0.22),
    cell("log_softmax", "jax.nn.log_softmax", 0.4),
    cell("softmax", "pallas", 0.3),
    cell("softmax", "jax.nn.softmax", 0.2),
  ]
  assert targets(rows, 1000.0, "log_softmax")[2:] == [
    "| 1x25 | float32 | 91% | 91% | 0.55x | 1.00x | yes | - |"
  ]
  assert targets(rows, 1000.0)[2:] == [
    "| 1x25 | float32 | 67% | 91% | 1.50x | 1.00x | **no** | - |"
  ]


def test_gpu_script_records_what_none_picks(monkeypatch):
  # The timing step records, on the Pallas row of each cell, the backend that
  # implementation=None resolves to for that input (and only there).
  from benchmarks import gpu_pallas

  monkeypatch.setattr(gpu_pallas, "WARM_S", 0.0)
  asked = []

  def resolve(fn, implementation, x, axes, axis_name, where=None):
    asked.append((fn, implementation, x.shape, axes, where))
    return "xla/pallas"

  monkeypatch.setattr(gpu_pallas._backend, "resolve", resolve)
  fake = {"pallas": jax.nn.softmax, "jaxsoftmax-xla": jax.nn.softmax, "jax.nn.softmax": jnp.exp}
  monkeypatch.setattr(gpu_pallas, "_contenders", lambda pallas, op="softmax": fake)
  rows = gpu_pallas.timings([(8, 128)], ["float32"], True, calls=1, samples=1, where_sizes=())
  picked = {(r["op"], r["contender"]): r.get("default") for r in rows}
  for op in gpu_pallas.OPS:
    assert picked[(op, "pallas")] == "xla/pallas"
    assert picked[(op, "jaxsoftmax-xla")] is None and picked[(op, "jax.nn.softmax")] is None
  assert sorted(asked) == sorted((op, None, (8, 128), (1,), None) for op in gpu_pallas.OPS)


def test_gpu_script_defaults_table():
  # What implementation=None ran: each half's time from the contender that ran
  # it, against jax.nn's and against the fastest pairing of the two paths' halves.
  def cell(who, fwd_s, bwd_s, **kw):
    return dict(op="softmax", rows=4, cols=256, dtype="float32", contender=who, fwd_s=fwd_s,
                bwd_s=bwd_s, fwd_bytes_per_s=1.0, bwd_bytes_per_s=1.0, **kw)  # fmt: skip

  from benchmarks.gpu_pallas import defaults

  def table(default):
    return defaults([
      cell("pallas", 4e-6, 2e-6, default=default),
      cell("jaxsoftmax-xla", 3e-6, 5e-6),
      cell("jax.nn.softmax", 3e-6, 7e-6),
    ])[2:]  # fmt: skip

  # fastest pairing: XLA's forward (3) + the kernel's backward (2) = 5 us; jax.nn 10 us
  assert table("xla/pallas") == ["| 4x256 | float32 | xla/pallas | 3.0 | 2.0 | 0.50x | 1.00x |"]
  assert table("pallas") == ["| 4x256 | float32 | pallas | 4.0 | 2.0 | 0.60x | 1.20x |"]
  assert table("pallas/xla") == ["| 4x256 | float32 | pallas/xla | 4.0 | 5.0 | 0.90x | 1.80x |"]
  assert table("xla") == ["| 4x256 | float32 | xla | 3.0 | 5.0 | 0.80x | 1.60x |"]
  # No row without the Pallas row's `default` (a CPU run), or another op's cells.
  assert defaults([cell("pallas", 4e-6, 2e-6), cell("jaxsoftmax-xla", 3e-6, 5e-6)])[2:] == []
  assert defaults([cell("pallas", 4e-6, 2e-6, default="xla")], "log_softmax")[2:] == []


def test_batched_programs_run_the_op_on_every_buffer():
  # On accelerators one timed program runs the op once per rotating buffer (one
  # dispatch for all): its outputs must be the single program's, buffer by buffer.
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import harness

  xs = [(jnp.full((4, 8), float(i)).at[:, 0].set(i + 1.0),) for i in range(3)]
  f = lambda x: jax.nn.softmax(x * 2.0)  # noqa: E731
  single = harness._program("c", "fwd", f, xs, {}, batch=False)
  batched = harness._program("c", "fwd", f, xs, {}, batch=True)
  assert (single.per_call, len(single.argsets)) == (1, 3)
  assert (batched.per_call, len(batched.argsets)) == (3, 1)
  outs = batched.call(batched.argsets[0])
  assert len(outs) == 3
  for (x,), out in zip(xs, outs, strict=True):
    np.testing.assert_array_equal(out, single.call((x,)))
    np.testing.assert_allclose(out, jax.nn.softmax(np.asarray(x, np.float64) * 2.0), rtol=1e-6)
  assert batched.temp_bytes == single.temp_bytes  # memory is the single program's


def test_interleaved_timing_gives_every_call_the_next_buffer():
  # No program reads the buffer that the call before it read, whichever program
  # made that call: a program timed right after another on the same buffer ran
  # faster where the arrays fit in the CPU's cache. The calls take the buffers
  # in turn; every other round runs the programs in reverse order.
  from benchmarks import harness

  log = []  # (program, buffer) per call

  def program(name, n):
    return harness.Program(
      name, "fwd", lambda a: log.append((name, a[0])), [(k,) for k in range(n)]
    )

  programs = [program("a", 3), program("b", 3), program("c", 3)]
  harness.time_interleaved(programs, reps=4, warmup=0, calls=2)
  assert [who for who, _ in log] == list("aabbccccbbaaaabbccccbbaa")
  assert [k for _, k in log] == [turn % 3 for turn in range(24)]
  assert all(len(p.times) == 4 for p in programs)


def test_every_jax_program_of_a_cell_reads_the_same_device_buffers(monkeypatch):
  # One device copy of a cell's rotating buffers, not one per contender: at
  # 1024 x 131072 soft labels, float32, the copies held 20.5 GB of this 24 GB
  # machine. Every JAX program (the roofline's too) reads buffer k as the same
  # array; forward+backward adds the cotangent, the same one for every contender.
  # The programs come in order: the roofline's copy and exp, then each
  # contender's forward and forward+backward.
  from benchmarks import harness
  from benchmarks.registry import discover

  suite = discover()["cross_entropy"]
  contenders = [c for c in suite.contenders if c.framework != "torch"]
  seen = []
  timed = harness.time_interleaved
  monkeypatch.setattr(harness, "time_interleaved", lambda ps, *a: (seen.extend(ps), timed(ps, *a)))
  harness.measure_cell(suite, (8, 16), "float32", contenders, reps=1, warmup=0)
  assert {(p.contender, p.mode) for p in seen} >= {(c.name, "fwd+bwd") for c in contenders}
  assert len(seen) == 2 + 2 * len(contenders)
  first = seen[0].argsets
  assert len(first) == harness.MAX_BUFFERS  # a small cell takes the most buffers
  fwd, fwd_bwd = seen[2].argsets, seen[3].argsets
  for p in seen:
    assert len(p.argsets) == len(first)
    for k, args in enumerate(p.argsets):
      assert args[0] is first[k][0], (p.contender, p.mode, k)
      if p.contender != "roofline":  # the labels too; the cotangent per fwd+bwd
        assert args[1] is fwd[k][1]
        if p.mode == "fwd+bwd":
          assert args[-1] is fwd_bwd[k][-1]


def test_gpu_script_variants_child_is_killed_after_its_timeout():
  # A variant kernel that hangs on the GPU must not take the rest of the call with it.
  from benchmarks import gpu_pallas

  rows = gpu_pallas.variants_in_child(["float32"], calls=1, samples=1, timeout_s=1)
  assert rows[-1]["error"].startswith("timed out after 1 s"), rows
  md = gpu_pallas.markdown(dict(device="d", jax="j", date="t"), [], [], 1.0, rows)
  assert "| (child process) | failed: timed out after 1 s" in md


def test_gpu_script_variants_child_gets_the_shapes(tmp_path):
  # The parent passes --variant-shapes (and its calls, samples and dtypes) on to
  # each child; this child reports its arguments as a row.
  import sys

  from benchmarks import gpu_pallas

  child = tmp_path / "child.py"
  child.write_text(
    "import json, pathlib, sys\n"
    "tmp = pathlib.Path(sys.argv[1])\n"
    "row = dict(variant=' '.join(sys.argv[2:]), rows=1, cols=1, dtype='float32')\n"
    "(tmp / 'rows.json').write_text(json.dumps([row]))\n"
  )
  kw = dict(timeout_s=30, child=[sys.executable, str(child)])
  rows = gpu_pallas.variants_in_child(["float32"], 3, 2, shapes=[(4, 2048), (8, 256)], **kw)
  args = "--calls 3 --samples 2 --dtypes float32 --variant-shapes 4x2048,8x256"
  assert rows[0]["variant"] == args, rows
  rows = gpu_pallas.variants_in_child(["float32"], 3, 2, **kw)
  assert rows[0]["variant"] == "--calls 3 --samples 2 --dtypes float32", rows


HANGING_CHILD = """
import json, pathlib, sys, time
tmp = pathlib.Path(sys.argv[1])
skip = set(json.loads((tmp / "skip.json").read_text()))
rows = []
for key in ["a 1x128 float32", "hangs 1x128 float32", "a 2x128 float32"]:
  if key in skip:
    continue
  (tmp / "current.json").write_text(key)
  if key.startswith("hangs"):
    time.sleep(60)
  name, shape, dtype = key.rsplit(" ", 2)
  n, c = map(int, shape.split("x"))
  rows.append(dict(variant=name, rows=n, cols=c, dtype=dtype, fwd_s=float(n)))
  (tmp / "rows.json").write_text(json.dumps(rows))
"""


def test_gpu_script_variants_go_on_past_a_hung_cell(tmp_path):
  # A cell that hangs is killed after the cell timeout; a new child runs the cells
  # after it, and skips those already done.
  import sys

  from benchmarks import gpu_pallas

  child = tmp_path / "child.py"
  child.write_text(HANGING_CHILD)
  seen = []  # what the parent passes on while the children run (saved to $OUT)
  rows = gpu_pallas.variants_in_child(
    ["float32"],
    1,
    1,
    timeout_s=30,
    cell_timeout_s=1,
    child=[sys.executable, str(child)],
    on_rows=lambda rows: seen.append([r["variant"] for r in rows]),
  )
  assert [(r["variant"], r["rows"], r.get("fwd_s")) for r in rows] == [
    ("a", 1, 1.0),
    ("hangs", 1, None),
    ("a", 2, 2.0),
  ]
  assert rows[1]["error"].startswith("hung: killed after 1 s")
  # The first cell's row reached the parent while the hung cell still ran.
  assert seen[0] == ["a"] and seen[-1] == ["a", "hangs", "a"]


def test_gpu_script_second_call_goes_on_where_the_first_stopped(tmp_path):
  # --variants-done: the cells a call ran are written to a file as they come in;
  # a second call with the same file skips them (not the defaults, which each
  # variant is timed with), and adds its own.
  import sys

  from benchmarks import gpu_pallas

  done = tmp_path / "state" / "done.json"
  earlier, record = gpu_pallas.variants_done(done)
  assert earlier == set() and not done.exists()
  first = [
    dict(variant="default", rows=1, cols=128, dtype="float32", fwd_s=1.0),
    dict(variant="a", rows=1, cols=128, dtype="float32", fwd_s=1.0),
    dict(variant="(child process)", rows=0, cols=0, dtype="-", error="timed out"),
  ]
  record(first)
  earlier, record = gpu_pallas.variants_done(done)
  assert earlier == {"a 1x128 float32"}
  child = tmp_path / "child.py"
  child.write_text(HANGING_CHILD)
  rows = gpu_pallas.variants_in_child(
    ["float32"],
    1,
    1,
    timeout_s=30,
    cell_timeout_s=1,
    child=[sys.executable, str(child)],
    on_rows=record,
    skip=earlier,
  )
  assert [(r["variant"], r["rows"]) for r in rows] == [("hangs", 1), ("a", 2)]
  assert gpu_pallas.variants_done(done)[0] == {
    "a 1x128 float32",
    "hangs 1x128 float32",
    "a 2x128 float32",
  }


def test_gpu_script_lowers_the_variants_for_cuda(monkeypatch, capsys):
  # --lower-only: every kernel lowered for cuda on this CPU, a preflight before
  # a GPU run (with --variant-shapes, the variants at those shapes only); a
  # kernel that cannot lower (rows shorter than a warpgroup) is named, and the
  # others still lower.
  from benchmarks import gpu_pallas

  Config = gpu_pallas.gpu.Config
  variants = {
    "default": (lambda: Config(), [(64, 256)]),
    "short": (lambda: {"float32": Config()}, [(64, 256), (64, 100)]),
  }
  monkeypatch.setattr(gpu_pallas, "VARIANTS", variants)
  args = ["--lower-only", "--dtypes", "float32,bfloat16", "--variant-shapes", "64x256,64x100"]
  assert gpu_pallas.main(args) == 1
  out = capsys.readouterr().out
  assert "default 64x256 bfloat16: lowers" in out and "short 64x256 float32: lowers" in out
  assert "short 64x256 bfloat16" not in out  # a config for float32 only
  failed = [line for line in out.splitlines() if "FAILED" in line or "Error" in line]
  assert failed[0] == "short 64x100 float32: FAILED"
  assert failed[1].startswith("short 64x100 float32 softmax: ValueError: the row length 100")
  assert gpu_pallas.main(["--lower-only", "--variant-shapes", "64x256"]) == 0
  out = capsys.readouterr().out
  assert out.endswith("every kernel lowers for cuda\n") and "row statistics" not in out


def test_every_kernel_of_the_gpu_script_lowers_for_cuda():
  # The preflight on the real script: the defaults at every check shape of
  # steps 1-4 (the losses' row statistics too; float32 here, as the lowering
  # tests of test_pallas.py take every dtype at shapes like these), then each
  # of VARIANTS, the default among them, at the shapes and dtypes the next GPU
  # run times it at (15 s on this machine). Lowering sizes the shared memory
  # for the real rows: a variant that overflows it (the float32 6-stage
  # backward at 128 x 262144, by 104 bytes, on the H100 in T1329Z) fails here,
  # not on the GPU.
  from benchmarks import gpu_pallas

  seen = []
  assert gpu_pallas.lower_steps(["float32"], lambda key, wrong: seen.append(key)) == []
  assert "default 8x70000 float32" in seen and "row statistics 4096x128256 float32" in seen
  assert gpu_pallas.lower_variants(gpu_pallas.DTYPES) == []


def test_kernel_forms_change_only_with_the_kernels():
  # benchmarks/kernel_forms.py: the same config gives the same fingerprints in
  # two traces; a change that reaches a kernel (the streamed rows' write order)
  # changes those kernels only, and not rows kept whole nor the row statistics.
  from benchmarks import kernel_forms as kf

  Config = kf.gpu.Config
  shapes = [(128, 262144), (8, 1024)]
  before = kf.forms({"c": Config()}, shapes, ["float32"])
  assert len(before) == 2 * 6 and not any(v.startswith("error") for v in before.values())
  assert kf.compare(before, kf.forms({"c": Config()}, shapes, ["float32"])) == []
  after = kf.forms({"c": Config(reverse_write=False)}, shapes, ["float32"])
  kernels = ["log_softmax bwd", "log_softmax fwd", "log_softmax fwd, no lse"]
  kernels += ["softmax bwd", "softmax fwd"]
  assert kf.compare(before, after) == [f"c|128x262144|float32|{k}" for k in kernels]
  # A kernel that only one side has counts as changed.
  assert kf.compare(before, {**before, "new": "0"}) == ["new"]
  assert "6 stages" in kf.configs() and "default" in kf.configs()


def test_readme_gpu_tables_are_made_from_their_result_files():
  # benchmarks/readme_tables.py: each table under a marker in the README is what
  # its result files give, and a number that differs is found and rewritten.
  from pathlib import Path

  from benchmarks import readme_tables as rt

  readme = Path(__file__).resolve().parents[1] / "README.md"
  text = readme.read_text()
  markers = [m for m in map(rt.MARKER.match, text.split("\n")) if m]
  assert {m.group(1) for m in markers} == {"softmax", "log_softmax", "ragged", "losses"}
  assert rt.main(["--check", str(readme)]) == 0
  cell = "| 4096x1024 | bfloat16 | 8.3 (48%) | 7.5 |"
  assert text.count(cell) == 1
  wrong = text.replace(cell, "| 4096x1024 | bfloat16 | 8.3 (48%) | 7.6 |")
  fixed, changed = rt.rewrite(wrong)
  assert fixed == text and changed == [markers[0].group(0)]


def test_readme_gpu_op_table_by_hand():
  # One cell, its numbers derived by hand: % of a copy bandwidth of 1000 B/s,
  # the kernel's fwd+bwd over jax.nn's (0.5 / 0.75), what None ran (our XLA
  # path's forward, the kernel's backward: 0.4 / 0.75) and the targets (90% and
  # 95% of copy, each faster than jax.nn).
  from benchmarks import readme_tables as rt

  def row(who, fwd, bwd, **extra):
    cell = dict(op="softmax", contender=who, rows=1, cols=25, dtype="float32", **extra)
    return dict(cell, fwd_s=fwd, bwd_s=bwd, fwd_bytes_per_s=180 / fwd, bwd_bytes_per_s=285 / bwd)

  rows = [
    row("pallas", 0.2, 0.3, default="xla/pallas"),
    row("jax.nn.softmax", 0.25, 0.5),
    row("jaxsoftmax-xla", 0.1, 0.4),
  ]
  assert rt.op_table({"copy_bytes_per_s": 1000.0, "timings": rows}, "softmax")[2:] == [
    "| 1x25 | float32 | 200000.0 (90%) | 250000.0 | 300000.0 (95%) | 500000.0 | 0.67 "
    "| xla/pallas | 0.53 | **yes** |"
  ]
  rows[0]["fwd_s"] = 0.3  # slower than jax.nn forward (and 60% of copy)
  rows[0]["fwd_bytes_per_s"] = 180 / 0.3
  assert rt.op_table({"copy_bytes_per_s": 1000.0, "timings": rows}, "softmax")[2].endswith(
    "| 0.80 | xla/pallas | 0.53 | no |"
  )
