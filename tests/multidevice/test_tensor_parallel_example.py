"""examples/tensor_parallel.py: a few data x tensor parallel steps, checked against one device.

The script is run as on two hosts (two processes, ``jax.distributed.initialize``)
and, in this process, on the 8 devices this test process already has.
"""

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "tensor_parallel.py"
SMALL = ["--steps", "3", "--batch", "16", "--vocab", "64", "--hidden", "16"]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_script_on_two_processes_matches_one_device():
  # As on two hosts: two processes with 4 CPU devices each, joined by
  # jax.distributed.initialize into one 2 x 4 mesh (CPU collectives over Gloo).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  port = _free_port()
  common = [*SMALL, "--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2"]
  procs = [
    subprocess.Popen(
      [sys.executable, str(SCRIPT), *common, "--process-id", str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  outs = []
  for proc in procs:
    try:
      outs.append(proc.communicate(timeout=240)[0])
    finally:
      proc.kill()
  for proc, out in zip(procs, outs, strict=True):
    assert proc.returncode == 0, out
    assert "mesh data x model = 2 x 4 on 8 cpu devices (2 process(es))" in out
    steps = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)
    assert [int(s[0]) for s in steps] == [0, 1, 2]
    for _, sharded, single, grad_diff in steps:
      assert abs(float(sharded) - float(single)) <= 1e-5 * abs(float(single))
      assert float(grad_diff) < 1e-4
    assert "OK: loss and gradients match" in out


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
