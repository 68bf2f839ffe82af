"""The package's shape: no import cycle, data flowing one way, one registry per kind of thing."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _graph_tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_has_no_import_cycle():
    tool = _graph_tool()
    graph = tool.edges(tool.modules())
    assert tool.cycles(graph) == []
    # the tool finds a cycle when there is one
    assert tool.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_data_flows_one_way():
    """Lower layers never import the layers built on them (module level)."""
    tool = _graph_tool()
    graph = tool.edges(tool.modules())

    def reaches(start: str, target_prefix: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node.startswith(target_prefix) and node != start:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return False

    for low, high in [
        ("rank1_pyro.layers", "rank1_pyro.inference"),
        ("rank1_pyro.priors", "rank1_pyro.models"),
        ("rank1_pyro.models.base", "rank1_pyro.inference"),
        ("rank1_pyro.inference.objectives", "rank1_pyro.inference.train"),
        ("rank1_pyro.metrics", "rank1_pyro.inference"),
        ("rank1_pyro.diagnostics_stats", "rank1_pyro.inference"),
        ("rank1_pyro.methods", "rank1_pyro.experiments"),
        ("rank1_pyro.inference", "rank1_pyro.commands"),
        ("rank1_pyro.laplace", "rank1_pyro.commands"),
    ]:
        assert not reaches(low, high), f"{low} imports {high}"


def test_the_command_line_starts_without_the_heavy_modules():
    code = "import sys, rank1_pyro.cli as c; c.build_parser(); print(sorted(m for m in sys.modules if m in ('torch', 'pyro')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
