"""Issue 14's structural rules, checked from the source: no module over 400 lines, no function
over 60 lines, no import cycle between the package's modules.

    .venv/bin/python scripts/check_structure.py          # prints violations; exit 1 if any

Imports are read with `ast` from every `import`/`from ... import` anywhere in a module (inside
functions too, so a lazy import that closes a cycle counts). `from package import name` is an
edge to `package.name` when that is a module, else to the package's `__init__`. Cycles are the
strongly connected components (more than one module) of that graph.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules that `module` imports (resolved as the module docstring says)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in modules else source)
    return {m for m in found if m in modules and m != module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on_stack.add(start)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop(); on_stack.discard(w); component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def violations(root: Path) -> list[str]:
    """Every rule broken under the package directory `root`, one line each."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in files.items()}
    problems = []
    for m, p in files.items():
        n_lines = len(p.read_text().splitlines())
        if n_lines > MAX_MODULE_LINES:
            problems.append(f"{p}: module of {n_lines} lines (> {MAX_MODULE_LINES})")
        for node in ast.walk(trees[m]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{p}:{node.lineno}: function {node.name} of {length} lines "
                                    f"(> {MAX_FUNCTION_LINES})")
    modules = set(files)
    graph = {m: imported(trees[m], m, files[m].name == "__init__.py", modules) for m in files}
    for component in cycles(graph):
        edges = "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(component)))}" for m in component)
        problems.append(f"import cycle: {edges}")
    return problems


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "sparse_lens"
    problems = violations(root)
    print("\n".join(problems) if problems else f"{root}: no structural violations")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
