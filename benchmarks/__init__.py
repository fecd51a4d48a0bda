"""Reproducible benchmarks: speed against the plain reference stack, and method comparisons."""
