"""Imports between tunekit's packages run one way (docs/design.md, "Layers"):

    cli, recipes -> training -> evaluation -> generation -> models -> modules -> losses -> checkpoint -> config

(``data`` sits beside ``modules``: training and generation use it, it uses modules' masks;
``losses`` are pure functions of tensors.) Every
import is checked, also those inside functions, so a cycle cannot come back through a lazy import.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the tunekit packages it may import (besides itself and the top-level tunekit modules)
ALLOWED = {
    "config": set(),
    "checkpoint": {"config"},
    "losses": {"checkpoint", "config"},
    "modules": {"losses", "checkpoint", "config"},
    "models": {"modules", "losses", "checkpoint", "config"},
    "data": {"modules", "losses", "checkpoint", "config"},
    "generation": {"models", "modules", "losses", "data", "checkpoint", "config"},
    # benchmark tasks: generation and log-likelihoods; the training recipes run them (eval_tasks)
    "evaluation": {"generation", "models", "modules", "losses", "data", "checkpoint", "config"},
    "training": {"evaluation", "models", "modules", "losses", "data", "checkpoint", "config"},
    "cli": {"training", "evaluation", "generation", "models", "modules", "losses", "data", "checkpoint", "config"},
    "recipes": {"training", "evaluation", "generation", "models", "modules", "losses", "data", "checkpoint",
                "config"},
}


def package_of(path: Path) -> str | None:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "recipes":
        return "recipes"
    if rel.parts[0] == "tunekit" and len(rel.parts) > 2:
        return rel.parts[1]
    return None  # tunekit/__init__.py, tunekit/_paths.py: the top level, importable by all


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(tunekit package, line) of every ``import tunekit.X`` / ``from tunekit.X import ...``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "tunekit" \
                else [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tunekit" and len(parts) > 1 and (ROOT / "tunekit" / parts[1]).is_dir():
                found.add((parts[1], node.lineno))
    return found


SOURCES = sorted([*(ROOT / "tunekit").rglob("*.py"), *(ROOT / "recipes").glob("*.py")])


def test_every_package_is_placed():
    packages = {p.name for p in (ROOT / "tunekit").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= ALLOWED.keys(), f"place the new package(s) {packages - ALLOWED.keys()} in ALLOWED"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    package = package_of(path)
    if package is None:
        return
    wrong = sorted(f"line {line}: {package} -> {target}" for target, line in imported_packages(path)
                   if target != package and target not in ALLOWED[package])
    assert not wrong, f"{path.relative_to(ROOT)} imports against the layering: {wrong}"


def test_allowed_graph_has_no_cycle():
    # the table itself must be a DAG, or the per-file checks would allow a cycle
    seen, done = set(), set()

    def visit(p, stack):
        assert p not in stack, f"cycle in ALLOWED: {stack + [p]}"
        if p in done:
            return
        for q in ALLOWED[p]:
            visit(q, stack + [p])
        done.add(p)

    for p in ALLOWED:
        visit(p, [])


def test_checker_sees_lazy_and_plain_imports(tmp_path):
    # the checker must not be blind to imports inside functions (where the old cycles hid)
    probe = tmp_path / "probe.py"
    probe.write_text("import tunekit.models\nfrom tunekit import data\n\n\ndef f():\n"
                     "    from tunekit.training.train_step import x\n")
    assert imported_packages(probe) == {("models", 1), ("data", 2), ("training", 6)}
