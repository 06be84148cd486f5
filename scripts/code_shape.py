"""The shape of the code: import cycles, private names imported across modules, imports inside
functions, and the longest functions. Reads the source as text (AST); imports nothing of it.

    python scripts/code_shape.py [SRC_DIR]      (default: src/flywheel)
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(tree: ast.Module, module: str, is_pkg: bool, known: set[str]):
    """(target module, names, inside a function?) for each import of a flywheel module."""
    out = []
    parents: dict[ast.AST, ast.AST] = {}
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            parents[child] = parent

    def in_function(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return True
        return False

    def in_type_checking(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                return True
        return False

    for node in ast.walk(tree):
        if in_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("flywheel"):
                    out.append((alias.name, [], in_function(node)))
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node, module, is_pkg)
            if not target.startswith("flywheel"):
                continue
            names = [a.name for a in node.names]
            # `from flywheel.x import y` where y is a module
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            if subs:
                for s in subs:
                    out.append((s, [], in_function(node)))
            else:
                out.append((target, names, in_function(node)))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "src/flywheel").resolve()
    files = sorted(p for p in root.rglob("*.py") if "migrations" not in p.parts)
    known = {module_name(p, root) for p in files}
    graph: dict[str, set[str]] = defaultdict(set)
    private: list[str] = []
    inside: list[str] = []
    lengths: list[tuple[int, str]] = []
    for path in files:
        mod = module_name(path, root)
        tree = ast.parse(path.read_text())
        for target, names, in_fn in imports_of(tree, mod, path.name == "__init__.py", known):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != mod:
                graph[mod].add(target)
            for n in names:
                if n.startswith("_") and target != mod:
                    private.append(f"{mod} imports {target}.{n}")
            if in_fn:
                inside.append(f"{mod} -> {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                lengths.append((n, f"{mod}.{node.name}"))
    found = cycles(graph)
    print(f"modules: {len(known)}; import edges between flywheel modules: "
          f"{sum(len(v) for v in graph.values())}")
    print(f"import cycles (strongly connected groups): {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))
    print(f"private names imported across modules: {len(private)}")
    for p in private:
        print("  " + p)
    print(f"flywheel imports inside functions: {len(inside)}")
    for p in sorted(set(inside)):
        print(f"  {p} (x{inside.count(p)})")
    print("ten longest functions (lines):")
    for n, name in sorted(lengths, reverse=True)[:10]:
        print(f"  {n:4d}  {name}")


if __name__ == "__main__":
    main()
