"""Data flow is the architecture: a stage may import earlier stages only, never later ones."""

import ast
from pathlib import Path

import chameleon_lm

PACKAGE = Path(chameleon_lm.__file__).parent

# Stage -> the stages it may import. A new stage must be added here (the test fails until it is).
ALLOWED = {
    "utils": set(),
    "tokenizers": {"utils"},
    "documents": {"utils", "tokenizers"},
    "data": {"utils", "tokenizers", "documents"},
    "model": {"utils"},
    "checkpoints": {"utils", "tokenizers", "documents", "model"},
    "training": {"utils", "tokenizers", "documents", "data", "model", "checkpoints"},
    "generation": {"utils", "tokenizers", "documents", "model", "checkpoints"},
    "serve": {"utils", "tokenizers", "documents", "data", "model", "checkpoints", "generation"},
    "eval": {"utils", "tokenizers", "documents", "data", "model", "checkpoints", "generation"},
}
TOP_LEVEL = {"__init__", "__main__", "cli", "quickstart"}  # entry points may import every stage


def imported_stages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    stages = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "chameleon_lm" and len(parts) > 1:
                stages.add(parts[1])
    return stages


def test_no_stage_imports_a_later_stage():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        stage = rel.parts[0].removesuffix(".py")
        if stage in TOP_LEVEL:
            continue
        assert stage in ALLOWED, f"new stage {stage!r}: declare what it may import in ALLOWED"
        bad = imported_stages(path) - ALLOWED[stage] - {stage}
        if bad:
            problems.append(f"{rel} imports {sorted(bad)}")
    assert not problems, problems


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import chameleon_lm, sys; print(sorted(m for m in sys.modules if m.startswith('chameleon_lm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['chameleon_lm']"

