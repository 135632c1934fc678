"""Checkpoint layouts: chameleon-lm, Hugging Face and Meta."""
