"""Eight CPU devices for the multi-device tests, set before JAX starts its backend.

``tests/run.sh`` runs this folder in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; run directly
(``pytest tests/multidevice``), the same is asked of JAX through
``jax_num_cpu_devices``. float64 is enabled by ``tests/conftest.py``.
"""

import os

import jax
import pytest

DEVICES = 8
_FLAG = "xla_force_host_platform_device_count"

if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  jax.config.update("jax_num_cpu_devices", DEVICES)


@pytest.fixture(autouse=True, scope="session")
def _eight_devices():
  n = len(jax.devices())
  if n < DEVICES:
    msg = (
      f"the multi-device tests need {DEVICES} devices, JAX has {n}; run them in their "
      f"own process with XLA_FLAGS=--{_FLAG}={DEVICES} (as tests/run.sh does)"
    )
    if _FLAG in os.environ.get("XLA_FLAGS", ""):
      pytest.fail(msg)
    pytest.skip(msg)
