"""Benchmark suites: every module here registers one or more suites on import."""
