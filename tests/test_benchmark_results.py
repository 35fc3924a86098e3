"""benchmarks/report.py: rerunning part of a suite keeps the rest of the saved results."""

import json

from benchmarks import report


def _cell(size, dtype, ms):
  return {"size": list(size), "dtype": dtype, "rows": [{"median_s": ms / 1e3}]}


def test_rerunning_one_cell_keeps_the_others(tmp_path):
  path = tmp_path / "cpu.json"
  first = {
    "machine": "a",
    "suites": {
      "ce": {"reps": 9, "cells": [_cell((8, 4), "float32", 1.0), _cell((8, 4), "bfloat16", 2.0)]},
      "softmax": {"reps": 30, "cells": [_cell((4, 4), "float32", 3.0)]},
    },
  }
  report.save_json(path, first)
  rerun = {"reps": 40, "cells": [_cell((8, 4), "float32", 5.0)]}
  second = {"machine": "b", "suites": {"ce": rerun}}
  merged = report.save_json(path, second)
  assert json.loads(path.read_text()) == merged
  assert merged["machine"] == "b"
  assert merged["suites"]["softmax"] == first["suites"]["softmax"]
  ce = merged["suites"]["ce"]
  assert ce["reps"] == 40
  assert ce["cells"] == [_cell((8, 4), "float32", 5.0), _cell((8, 4), "bfloat16", 2.0)]
  # A new cell is appended after the old ones.
  third = {"machine": "c", "suites": {"ce": {"reps": 9, "cells": [_cell((16, 4), "float32", 7.0)]}}}
  assert [c["size"] for c in report.save_json(path, third)["suites"]["ce"]["cells"]] == [
    [8, 4],
    [8, 4],
    [16, 4],
  ]
