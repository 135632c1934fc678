"""Automatic benchmarks, one module per task."""
