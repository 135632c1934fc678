"""The two tokenizers: byte-level BPE for text, a VQGAN for images, and their shared vocabulary."""
