"""Datasets: the built-in synthetic shapes world and readers for the on-disk formats."""
