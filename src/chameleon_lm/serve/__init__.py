"""Serving: the generation engine behind an OpenAI-compatible HTTP API, and a web viewer."""
