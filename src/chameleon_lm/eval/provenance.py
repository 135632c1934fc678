"""What a result was computed with: model hashes and package versions, recorded with every report."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = ("chameleon-lm", "torch", "numpy", "tokenizers", "safetensors", "transformers", "lm-eval",
            "pillow")


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 over a model folder's files (names and bytes, sorted), or over one file: equal hashes
    mean equal weights, tokenizers and configs."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def versions() -> dict[str, str]:
    """Python, the platform, the installed versions of the packages that shape results, and the
    source checkout's git commit when there is one."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                capture_output=True, timeout=5, check=False)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=Path(__file__).parent, text=True, capture_output=True, timeout=5, check=False)
            out["git_commit"] = commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out
