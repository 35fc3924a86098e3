"""examples/tensor_parallel.py: a few data x tensor parallel steps, checked against one device."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "tensor_parallel.py"
SMALL = ["--steps", "3", "--batch", "16", "--vocab", "64", "--hidden", "16"]


def test_script_runs_on_8_simulated_devices_and_matches_one_device():
  # As a user runs it: its own process, which asks JAX for 8 CPU devices itself.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), *SMALL], capture_output=True, text=True, env=env, timeout=300
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "mesh data x model = 2 x 4 on 8 cpu devices" in proc.stdout
  steps = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)$", proc.stdout, re.M)
  assert [int(s[0]) for s in steps] == [0, 1, 2]
  for _, sharded, single, grad_diff in steps:
    assert abs(float(sharded) - float(single)) <= 1e-5 * abs(float(single))
    assert float(grad_diff) < 1e-4
  assert "OK: loss and gradients match" in proc.stdout


def test_script_catches_a_wrong_model(capsys, monkeypatch):
  # The per-step check can fail: a reference loss off by 1% must be reported.
  spec = importlib.util.spec_from_file_location("tensor_parallel", SCRIPT)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  reference = example.reference_loss
  monkeypatch.setattr(example, "reference_loss", lambda *a: 1.01 * reference(*a))
  # This process already has 8 CPU devices: `--devices 0` uses them as they are.
  assert example.main([*SMALL, "--steps", "1", "--devices", "0", "--mesh", "4x2"]) == 1
  assert "FAILED" in capsys.readouterr().err
