"""The package's shape: no import cycle, data flowing one way, one registry per kind of thing."""

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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


def test_coverage_check_lists_every_unrun_line_without_a_reason(tmp_path):
    """tools/coverage_table.py finds the statements no test runs and the partly run branches, by their
    source text, and tells listed (with a reason) from unlisted and stale entries."""
    import coverage

    if coverage.Coverage.current() is not None:
        pytest.skip("the suite itself runs under coverage (make coverage): one tracer at a time")
    spec = importlib.util.spec_from_file_location("coverage_tool", ROOT / "tools" / "coverage_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    package = tmp_path / "pkg"
    package.mkdir()
    source = "def f(x):\n    if x > 0:\n        return 1\n    return 2\n\n\ndef g():\n    return 3\n"
    (package / "mod.py").write_text(source)
    cov = coverage.Coverage(data_file=str(tmp_path / ".cov"), branch=True, source=[str(package)], config_file=False)
    cov.start()
    module_spec = importlib.util.spec_from_file_location("pkg_mod", package / "mod.py")
    mod = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(mod)
    assert mod.f(1) == 1  # x <= 0 never happens, g never runs
    cov.stop()
    cov.save()
    found = tool.unrun(str(tmp_path / ".cov"), root=tmp_path, package="pkg", modules=("pkg/mod.py",))
    assert found == {"pkg/mod.py": [(2, "if x > 0:"), (4, "return 2"), (8, "return 3")]}
    reasons = {"pkg/mod.py": {"return 2": "x > 0 always here", "return 1": "an old entry"}}
    assert tool.unlisted(found, reasons) == {"pkg/mod.py": [(2, "if x > 0:"), (8, "return 3")]}
    assert tool.stale(found, reasons) == {"pkg/mod.py": ["return 1"]}
    assert tomllib.loads(tool.template(tool.unlisted(found, reasons))) == {
        "pkg/mod.py": {"if x > 0:": "TODO (line 2)", "return 3": "TODO (line 8)"}
    }
    # --write keeps the numbers and puts the note and the table between the page's markers
    page, result = tmp_path / "testing.md", tmp_path / "coverage.json"
    page.write_text("intro\n<!-- coverage:start -->\nold\n<!-- coverage:end -->\nafter\n")
    tool.write(str(tmp_path / ".cov"), "measured so", result=result, page=page, root=tmp_path, package="pkg")
    kept = json.loads(result.read_text())
    assert kept["note"] == "measured so"
    numbers = {k: kept["modules"]["pkg/mod.py"][k] for k in ("statements", "missing", "branches", "partial")}
    assert numbers == {"statements": 6, "missing": 2, "branches": 2, "partial": 1}
    assert kept["modules"]["pkg/mod.py"]["percent"] == pytest.approx(100 * (4 + 1) / (6 + 2))  # run / (lines + arcs)
    assert page.read_text() == (
        "intro\n<!-- coverage:start -->\nmeasured so\n\n"
        "| module | statements | not run | branches | partial | coverage |\n|---|---:|---:|---:|---:|---:|\n"
        "| `pkg/mod.py` | 6 | 2 | 2 | 1 | 62.5% |\n<!-- coverage:end -->\nafter\n"
    )
