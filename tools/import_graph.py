"""The package's module-level import graph: prints any import cycle (exit 1) and each module's
imports of the package (``--edges``). ``make lint`` runs it, so a cycle fails CI.

Only imports at module level count (an import inside a function runs when it is called, after
every module has loaded); ``from . import x`` counts as an import of the submodule ``x``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rank1_pyro"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def edges(found: dict[str, Path]) -> dict[str, set[str]]:
    graph = {name: set() for name in found}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ImportFrom) and not isinstance(node, ast.Import):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            graph[name] |= {t for t in targets if t in found and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    graph = edges(modules())
    if "--edges" in argv:
        for name in sorted(graph):
            print(f"{name}: {', '.join(sorted(graph[name]))}")
    loops = cycles(graph)
    for loop in loops:
        print("import cycle: " + " -> ".join(loop))
    if not loops:
        print(f"{len(graph)} modules, no import cycle")
    return 1 if loops else 0


if __name__ == "__main__":
    sys.exit(main())
