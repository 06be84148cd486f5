"""The shape of the code, checked: layers only import downwards (import-linter), and a new arrow
running back up or sideways breaks the build; no private name is imported across modules; imports
inside functions only for heavy optional libraries; no function over 60 lines unless a comment on
the line after its signature says why it must be long (ruff has no line-count rule)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src" / "flywheel"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 60
# Imports inside functions that are allowed, and why: each use case of the API imports its stage
# when it runs (`flywheel --help` answers without importing pandas, MLflow, PyTorch and Prefect), as
# do the CLI's renderers that need a stage's names; the MLP trainer imports PyTorch, which tabular
# projects may not have installed.
IN_FUNCTION_OK = {"flywheel.api": "*", "flywheel.cli.render": {"flywheel.pipeline", "flywheel.demo.sba"},
                  "flywheel.training.trainers": {"flywheel.training"},  # torch_mlp
                  # MLflow and ONNX Runtime only while a shadow rollout runs; the log sink's reader
                  # (the sink imports this module)
                  "flywheel.serving.tabular.shadow": {"flywheel.registry",
                                                      "flywheel.serving.tabular.runtime",
                                                      "flywheel.serving.tabular.logsink"}}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = ast.parse(path.read_text())
    return out


def lint_imports(root: Path, src: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml")], cwd=root,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)


def test_the_layers_contract_is_kept():
    done = lint_imports(REPO, REPO / "src")
    assert done.returncode == 0 and "2 kept, 0 broken" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize(("module", "arrow"), [
    ("registry.py", "import flywheel.lifecycle"),             # a lower layer importing a higher one
    ("pipeline/steps.py", "import flywheel.serving.process"),  # two stages that must not know each other
    ("core/errors.py", "import flywheel.config"),              # the core stands on nothing
])
def test_an_arrow_against_the_layers_breaks_the_contract(tmp_path, module, arrow):
    shutil.copytree(SRC, tmp_path / "src" / "flywheel")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "flywheel" / module
    target.write_text(target.read_text() + f"\n{arrow}  # noqa\n")
    done = lint_imports(tmp_path, tmp_path / "src")
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout


def flywheel_imports(tree: ast.Module) -> list[tuple[ast.AST, str, list[str], bool]]:
    """(node, module imported, names, inside a function?) for each import of a flywheel module."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("flywheel"):
                found.append((child, child.module or "", [a.name for a in child.names], in_function))
            elif isinstance(child, ast.Import):
                found.extend((child, a.name, [], in_function) for a in child.names
                             if a.name.startswith("flywheel"))
            visit(child, inside)

    visit(tree, False)
    return found


def test_no_private_name_is_imported_across_modules():
    bad = [f"{mod} imports {target}.{name}" for mod, tree in modules().items()
           for _, target, names, _ in flywheel_imports(tree) for name in names
           if name.startswith("_") and target != mod]
    assert bad == []


def test_imports_inside_functions_only_for_heavy_optional_libraries():
    bad = []
    for mod, tree in modules().items():
        allowed = IN_FUNCTION_OK.get(mod, set())
        for _, target, _, inside in flywheel_imports(tree):
            if inside and allowed != "*" and target not in allowed:
                bad.append(f"{mod} imports {target} inside a function")
    assert bad == []


def test_no_function_is_longer_than_60_lines_without_a_reason():
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            body_start = node.body[0].lineno - 1
            reason = any("# long:" in line for line in lines[node.lineno - 1 : body_start + 1])
            if length > MAX_LINES and not reason:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert too_long == []


def test_scripts_and_benchmarks_import_names_that_exist():
    """They are not type-checked with src/: a moved name must not break them silently."""
    import importlib

    missing = []
    for folder in ("scripts", "benchmarks"):
        for path in sorted((REPO / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flywheel"):
                    module = importlib.import_module(node.module or "")
                    missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                                if not hasattr(module, a.name)
                                and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert missing == []
