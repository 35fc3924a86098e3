#!/usr/bin/env bash
# The test command: sets up .venv (if missing), installs the package with its
# test extras, then runs the suite. Any failure, or a run that collects no
# tests (pytest's exit code 5), fails the whole command.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch==2.13.0 is the CPU wheel, on Python 3.11 (pyproject.toml's torch extra
# installs nothing on newer Pythons); an unpinned torch would pull a CUDA build.
.venv/bin/python -m pip install -q -e ".[test,torch]"

# One persistent compilation cache for the run's processes (both pytest workers,
# and the suites after the first), in a fresh directory removed at exit: where
# a test builds a program that another test or worker has compiled already,
# XLA's executable is read back instead of compiled again. Every program is
# still compiled once in the run, by the jax installed above.
cache_dir=$(mktemp -d)
trap 'rm -rf "$cache_dir"' EXIT
export JAX_COMPILATION_CACHE_DIR="$cache_dir"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

run_pytest() {
  set +e
  .venv/bin/python -m pytest "$@"
  rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests for: $*" >&2
    exit 1
  fi
  if [ "$rc" -ne 0 ]; then
    exit "$rc"
  fi
}

# The single-device suite, spread over the cores.
run_pytest tests -n "${PYTEST_WORKERS:-2}" --ignore=tests/multidevice -p no:cacheprovider
# Multi-device tests need 8 CPU devices before JAX starts: processes of their
# own (each worker sees the flag), spread over the cores as well.
if ls tests/multidevice/test_*.py >/dev/null 2>&1; then
  XLA_FLAGS="--xla_force_host_platform_device_count=8" \
    run_pytest tests/multidevice -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider
fi
# The docstring examples.
run_pytest --doctest-modules jaxsoftmax -p no:cacheprovider
