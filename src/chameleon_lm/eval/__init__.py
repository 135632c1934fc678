"""Evaluation: judges, benchmarks and metrics of trained models."""
