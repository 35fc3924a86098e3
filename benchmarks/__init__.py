"""The jaxsoftmax benchmark harness: ``python -m benchmarks --help``."""
