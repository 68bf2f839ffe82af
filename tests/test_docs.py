"""Every Python example in README.md and docs/ runs as written, so the documentation cannot rot."""

import re
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples(page: Path) -> list[str]:
    return FENCE.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if examples(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(page, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace = {"__name__": "__doc_example__"}
    for i, code in enumerate(examples(page)):
        exec(compile(code, f"{page.name}[example {i}]", "exec"), namespace)


def test_every_docs_page_is_in_a_toctree():
    index_text = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    for page in (ROOT / "docs").rglob("*.md"):
        if page.name == "index.md" or "results" in page.relative_to(ROOT / "docs").parts[:1]:
            continue  # docs/results: benchmark outputs, excluded from the site (docs/conf.py)
        entry = str(page.relative_to(ROOT / "docs").with_suffix(""))
        assert re.search(rf"^{re.escape(entry)}$", index_text, re.M), f"{entry} is not listed in a toctree"


def _declarative():
    return (ROOT / "docs" / "howto" / "declarative.md").read_text()


def test_the_config_defaults_table_is_generated_from_the_code():
    from rank1_pyro.config import CONFIG_HELP, RunConfig, defaults_table

    assert list(CONFIG_HELP) == RunConfig.keys()  # every key explained, none that does not exist
    text = _declarative()
    table = text.split("<!-- config-defaults:start -->\n", 1)[1].split("<!-- config-defaults:end -->", 1)[0]
    assert table == defaults_table(), "docs/howto/declarative.md: regenerate the table with defaults_table()"
    for line in defaults_table().splitlines()[2:]:
        assert line.count("|") == 4  # one row, three cells: no stray pipe in a description


def test_the_declarative_example_is_the_shipped_config_and_names_the_omitted_keys():
    import tomllib

    from rank1_pyro.config import CONFIG_DIR, RunConfig, load_config

    shipped = (CONFIG_DIR / "digits_mlp.toml").read_text()
    text = _declarative()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    assert block == shipped, "docs/howto/declarative.md's TOML must be a copy of rank1_pyro/configs/digits_mlp.toml"
    values = tomllib.loads(block)
    assert RunConfig.from_dict(values) == load_config("digits_mlp")
    omitted = [k for k in RunConfig.keys() if k not in values]
    assert omitted  # the example relies on some defaults, and says which
    paragraph = text.split("## Every key and its default", 1)[1].split("<!-- config-defaults:start -->", 1)[0]
    named = [k for k in RunConfig.keys() if f"`{k}`" in paragraph.split("take these", 1)[0].split("leaves out", 1)[1]]
    assert named == omitted
    listed = ", ".join(omitted[:-1]) + " and " + omitted[-1]
    assert listed in " ".join(shipped.replace("#", " ").split())  # the file's own comment lists them too


def test_the_docs_theme_fits_wide_tables_and_numbers_never_wrap():
    import tomllib

    conf = {}
    exec((ROOT / "docs" / "conf.py").read_text(), conf)
    assert conf["html_theme"] == "furo" and "custom.css" in conf["html_css_files"]
    assert (ROOT / "docs" / "_static").is_dir() and "_static" in conf["html_static_path"]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    assert any(req.startswith("furo") for req in extra)  # `make docs` installs the theme
    css = (ROOT / "docs" / "_static" / "custom.css").read_text()
    rule = css.split("white-space: nowrap")[0].rsplit("}", 1)[-1]  # the selectors of the nowrap rule
    assert "td.text-right" in rule  # MyST's class of right-aligned (`---:`) cells: the benchmark numbers
    assert "---:" in (ROOT / "docs" / "benchmarks.md").read_text()  # ... which the benchmark tables use


def test_the_mutation_scratch_config_tells_mutmut_what_to_mutate(tmp_path, monkeypatch):
    """tools/mutants.py's scratch pyproject (what mutmut reads) names the package, the module and its
    tests: without ``source_paths`` mutmut stops with 'Could not figure out where the code to mutate is'."""
    import importlib.util
    import tomllib

    spec = importlib.util.spec_from_file_location("mutants_tool", ROOT / "tools" / "mutants.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "SCRATCH", tmp_path)
    work = tool._scratch("rank1_pyro/priors.py", ["tests/test_priors.py"])
    config = tomllib.loads((work / "pyproject.toml").read_text())
    assert config["tool"]["mutmut"]["source_paths"] == ["rank1_pyro"]
    assert config["tool"]["mutmut"]["only_mutate"] == ["rank1_pyro/priors.py"]
    assert config["tool"]["mutmut"]["pytest_add_cli_args_test_selection"] == ["tests/test_priors.py"]
    assert "not slow" in config["tool"]["mutmut"]["pytest_add_cli_args"]
    assert (work / "rank1_pyro" / "priors.py").read_text() == (ROOT / "rank1_pyro" / "priors.py").read_text()


def test_a_mutation_rerun_needs_the_last_run_of_the_same_module(tmp_path, monkeypatch):
    """``tools/mutants.py --rerun`` runs the kept survivors again only in the scratch copy of the last
    run of an unchanged module; otherwise it says to run the module in full."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutants_tool", ROOT / "tools" / "mutants.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(tool, "RESULTS", tmp_path / "results")
    with pytest.raises(SystemExit, match="no earlier run to rerun; run it in full first"):
        tool.run_module("rank1_pyro/priors.py", 1, rerun=True)
    work = tool._scratch("rank1_pyro/priors.py", ["tests/test_priors.py"])
    (work / "mutants").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "rank1_pyro.priors.json").write_text('{"surviving": []}')
    assert tool._run_tests(work) == ["tests/test_priors.py"]  # what a rerun reports: the run's own selection
    (work / "rank1_pyro" / "priors.py").write_text("# an older version\n")
    with pytest.raises(SystemExit, match="changed since its last run: its mutants are stale"):
        tool.run_module("rank1_pyro/priors.py", 1, rerun=True)


def test_a_mutation_run_that_checks_nothing_keeps_no_result(tmp_path, monkeypatch):
    """When mutmut stops before checking a mutant (a test failing in its first pass, which runs the
    unmutated code), the tool says so and keeps nothing, rather than a score of an unchecked run."""
    import importlib.util
    import subprocess
    import types

    spec = importlib.util.spec_from_file_location("mutants_tool", ROOT / "tools" / "mutants.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(tool, "RESULTS", tmp_path / "results")

    def mutmut(args, cwd, **kwargs):  # stands for mutmut: it fails, leaving its 2 mutants unchecked
        if "export-cicd-stats" in args:
            (cwd / "mutants").mkdir(exist_ok=True)
            (cwd / "mutants" / "mutmut-cicd-stats.json").write_text('{"total": 2, "killed": 0}')
        listing = "  m__mutmut_1: not checked\n  m__mutmut_2: not checked\n"
        return types.SimpleNamespace(returncode=1 if "run" in args else 0, stdout=listing)

    monkeypatch.setattr(subprocess, "run", mutmut)
    with pytest.raises(SystemExit, match=r"mutmut stopped \(exit 1\) before checking any mutant; nothing kept"):
        tool.run_module("rank1_pyro/priors.py", 1)
    assert not (tmp_path / "results").exists()


def test_a_kept_partial_result_names_the_tests_its_run_selected(tmp_path, monkeypatch):
    """``--progress`` (and ``--rerun``/``--resume``) report the test files the scratch run selects, not the
    ones configured now (mutmut keeps its verdicts for the former)."""
    import importlib.util
    import subprocess
    import types

    spec = importlib.util.spec_from_file_location("mutants_tool", ROOT / "tools" / "mutants.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(tool, "RESULTS", tmp_path / "results")
    work = tool._scratch("rank1_pyro/priors.py", ["tests/test_priors.py"])
    (work / "mutants").mkdir()
    (work / "mutants" / "mutmut-cicd-stats.json").write_text('{"total": 2, "killed": 1}')
    monkeypatch.setattr(tool, "module_tests", lambda module: ["tests/test_priors.py", "tests/test_layers.py"])
    listing = "  m__mutmut_1: killed\n  m__mutmut_2: not checked\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=0, stdout=listing))
    result = tool.run_module("rank1_pyro/priors.py", 1, progress=True)
    assert result["tests"] == ["tests/test_priors.py"] and result["not_checked"] == 1


def test_the_mutation_table_has_every_core_module_and_marks_stale_results(tmp_path, monkeypatch):
    """A core module without a kept result reads "not run yet"; a result kept for another version of
    its module is marked stale, one of a run not finished partial; branch coverage comes from the
    kept coverage numbers."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("mutants_tool", ROOT / "tools" / "mutants.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "RESULTS", tmp_path / "mutants")
    monkeypatch.setattr(tool, "COVERAGE", tmp_path / "coverage.json")
    (tmp_path / "mutants").mkdir()
    (tmp_path / "coverage.json").write_text(
        json.dumps({"note": "", "modules": {"rank1_pyro/priors.py": {"percent": 97.25}}})
    )
    kept = {"module": "rank1_pyro/priors.py", "tests": ["tests/test_priors.py"], "generated": 10, "killed": 8}
    kept |= {"equivalent": ["m1"], "surviving": ["m2"], "score": 8 / 9}
    for version, digest in [("current", tool._digest(ROOT / "rank1_pyro" / "priors.py")), ("older", "0" * 64)]:
        (tmp_path / "mutants" / "rank1_pyro.priors.json").write_text(json.dumps(kept | {"source_sha256": digest}))
        rows = {line.split(" | ")[0][3:-1]: line for line in tool.table().splitlines()[2:]}
        assert set(rows) == set(tool._core_modules())
        stale = " (stale)" if version == "older" else ""
        assert (
            rows["rank1_pyro/priors.py"]
            == f"| `rank1_pyro/priors.py` | test_priors.py | 10 | 8 | 1 | 1 | 88.9%{stale} | 97.2% |"
        )
    assert rows["rank1_pyro/layers.py"].endswith("| not run yet | | | | | – |")
    (tmp_path / "mutants" / "rank1_pyro.priors.json").write_text(json.dumps(kept | {"not_checked": 4}))  # --progress
    assert "| 88.9% (partial: 6 checked) | 97.2% |" in tool.table()


def test_the_mutation_table_is_the_kept_results():
    """docs/testing.md's table is generated from docs/results/mutants/*.json (tools/mutants.py --table --write)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutants_tool", ROOT / "tools" / "mutants.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    page = (ROOT / "docs" / "testing.md").read_text()
    block = page.split("<!-- mutants:start -->\n", 1)[1].split("\n<!-- mutants:end -->", 1)[0]
    assert block == tool.table(), "regenerate with: python tools/mutants.py --table --write"
