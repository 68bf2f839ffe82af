"""Mutation testing of one module with its own tests (mutmut 3), and the score that proves it.

    python tools/mutants.py rank1_pyro/metrics.py             # one module (make mutants MODULE=...)
    python tools/mutants.py rank1_pyro/metrics.py --rerun     # only the last run's survivors, after adding tests
    python tools/mutants.py rank1_pyro/metrics.py --resume    # go on with an interrupted run
    python tools/mutants.py rank1_pyro/metrics.py --progress  # keep a run's counts so far, as a partial result
    python tools/mutants.py --changed                         # the modules changed since main (make mutants-changed)
    python tools/mutants.py --table                           # docs/testing.md's table from the kept results

mutmut changes the module one small edit at a time (a ``<`` becomes ``<=``, a constant moves, an
argument is dropped, ...) and runs the tests that exercise the changed function; a *killed* mutant
made a test fail, a *surviving* one did not. Each module runs in a scratch copy
``.mutants/<module>/`` whose ``pyproject.toml`` carries the shared ``[tool.mutmut]`` settings of
this project's pyproject with ``only_mutate`` set to the module and the test selection set to the
module's tests (``[tool.rank1_pyro.mutation-tests]``), so a run costs minutes, not the whole suite
per mutant.

A surviving mutant is either a missing test (write one that compares against an independent
computation) or *equivalent* (the change cannot alter behaviour): list those in
``tests/mutants/equivalent.toml`` with a one-line reason, so the next run does not re-triage them.
The result of each run is kept in ``docs/results/mutants/<module>.json``:
generated, killed, equivalent, surviving (their names), and the score
``killed / (generated - equivalent)``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".mutants"
RESULTS = ROOT / "docs" / "results" / "mutants"
EQUIVALENT = ROOT / "tests" / "mutants" / "equivalent.toml"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def module_tests(module: str) -> list[str]:
    """The test files of ``module`` (``[tool.rank1_pyro.mutation-tests]``, else ``tests/test_<name>.py``)."""
    table = _pyproject().get("tool", {}).get("rank1_pyro", {}).get("mutation-tests", {})
    if module in table:
        return list(table[module])
    guess = ROOT / "tests" / f"test_{Path(module).stem}.py"
    if not guess.exists():
        raise SystemExit(f"no tests known for {module}: add it to [tool.rank1_pyro.mutation-tests] in pyproject.toml")
    return [str(guess.relative_to(ROOT))]


def equivalent(module: str) -> dict[str, str]:
    """Mutant name -> reason, for the listed equivalent mutants of ``module``."""
    if not EQUIVALENT.exists():
        return {}
    return dict(tomllib.loads(EQUIVALENT.read_text()).get(module, {}))


def _toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _scratch(module: str, tests: list[str]) -> Path:
    """A copy of the package and the tests with a pyproject that mutates ``module`` only."""
    work = SCRATCH / _slug(module)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "rank1_pyro", work / "rank1_pyro", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    base = _pyproject().get("tool", {}).get("mutmut", {})
    lines = ["[tool.mutmut]"]
    for key, value in base.items():
        if key not in ("only_mutate", "pytest_add_cli_args_test_selection"):
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, list) else _toml_list(value)}")
    lines.append(f"only_mutate = {_toml_list([module])}")
    lines.append(f"pytest_add_cli_args_test_selection = {_toml_list(tests)}")
    pytest_opts = _pyproject()["tool"]["pytest"]["ini_options"]
    lines += ["", "[tool.pytest.ini_options]", f"testpaths = {_toml_list(tests)}"]
    lines += [f"markers = {_toml_list(pytest_opts.get('markers', []))}"]
    lines += [f"filterwarnings = {_toml_list(pytest_opts.get('filterwarnings', []))}"]
    (work / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return work


def _run_tests(work: Path) -> list[str]:
    """The test files a scratch copy's run selects (mutmut keeps its verdicts only for those)."""
    with open(work / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["tool"]["mutmut"]["pytest_add_cli_args_test_selection"])


def _names(output: str, status: str) -> list[str]:
    return sorted(set(re.findall(rf"^\s*(\S+): {status}\s*$", output, flags=re.M)))


def _slug(module: str) -> str:
    """``rank1_pyro/laplace/projected.py`` -> ``rank1_pyro.laplace.projected``: the name of its scratch
    copy and of its kept result."""
    return Path(module).with_suffix("").as_posix().replace("/", ".")


def _env() -> dict:
    """The environment mutmut runs in: one thread each, so parallel mutants do not oversubscribe."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _result_file(module: str) -> Path:
    return RESULTS / f"{_slug(module)}.json"


def _listing(work: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
    ).stdout


def _rerun_names(work: Path, module: str) -> list[str]:
    """The mutants of the last run to check again: those that survived, had no test, or timed out (a
    timeout counts as killed, but on a busy machine it may be only slow), less the listed equivalents."""
    listing = _listing(work)
    names = _names(listing, "survived") + _names(listing, "no tests") + _names(listing, "timeout")
    known = equivalent(module)
    return sorted(n for n in names if n not in known)


def run_module(
    module: str, max_children: int, rerun: bool = False, resume: bool = False, progress: bool = False
) -> dict:
    """Run mutmut on ``module`` in its scratch copy; returns (and keeps) the counts.

    ``rerun``: run again only the mutants the last run left surviving, run by no test or timed out,
    against the current tests, in the scratch copy of the last run (the module itself unchanged):
    minutes after adding tests, where a full run takes most of an hour. ``resume``: go on with an
    interrupted run in its scratch copy (the mutants not checked yet), against the current tests.
    ``progress``: run nothing; keep the counts of the run under way (or interrupted) so far, marked
    partial (the table says how many mutants were checked), to be completed by ``resume``."""
    if not (ROOT / module).is_file():
        raise SystemExit(f"no such module: {module}")
    tests = module_tests(module)
    work = SCRATCH / _slug(module)
    if (progress or rerun or resume) and (work / "pyproject.toml").is_file():
        tests = _run_tests(work)  # the tests the run selected (the configured ones may have changed since)
    names = []
    if progress:
        if not (work / "mutants").is_dir():
            raise SystemExit(f"{module}: no run under way or interrupted")
    elif rerun or resume:
        if not (work / "mutants").is_dir() or (rerun and not _result_file(module).is_file()):
            raise SystemExit(f"{module}: no earlier run to {'rerun' if rerun else 'resume'}; run it in full first")
        if (work / module).read_text() != (ROOT / module).read_text():
            raise SystemExit(f"{module} changed since its last run: its mutants are stale, run it in full")
        shutil.rmtree(work / "tests")
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        names = _rerun_names(work, module) if rerun else []
        if rerun and not names:
            print(f"{module}: no surviving mutant to rerun")
    else:
        work = _scratch(module, tests)
    env = _env()
    mutmut = [sys.executable, "-m", "mutmut"]
    print(f"{module}: mutating with {', '.join(tests)} in {os.path.relpath(work, ROOT)}", flush=True)
    failed = 0
    if not progress and (names or not rerun):
        # mutmut's progress display, kept out of the terminal
        with open(work / "mutmut.log", "a" if rerun or resume else "w") as log:
            failed = subprocess.run(
                [*mutmut, "run", "--max-children", str(max_children), *names],
                cwd=work,
                env=env,
                check=False,
                stdout=log,
                stderr=log,
            ).returncode
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=work, env=env, check=False, capture_output=True)
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    listing = _listing(work)
    survived = _names(listing, "survived")
    uncovered = _names(listing, "no tests")
    known = equivalent(module)
    real = [m for m in survived + uncovered if m not in known]
    generated = int(stats.get("total", 0))
    not_checked = len(_names(listing, "not checked"))
    killed = int(stats.get("killed", 0)) + int(stats.get("timeout", 0))
    if failed and not_checked == generated:  # e.g. a test failing in mutmut's first (stats) pass
        raise SystemExit(
            f"{module}: mutmut stopped (exit {failed}) before checking any mutant; nothing kept. "
            f"Its log says why: {os.path.relpath(work / 'mutmut.log', ROOT)}"
        )
    counted = generated - not_checked - len([m for m in known if m in survived + uncovered])
    result = {
        "module": module,
        "tests": tests,
        "generated": generated,
        "killed": killed,
        "equivalent": sorted(m for m in known if m in survived + uncovered),
        "surviving": real,
        "no_tests": uncovered,
        "not_checked": not_checked,  # > 0: a partial result (--progress), completed by --resume
        "score": killed / counted if counted else 1.0,
        "source_sha256": _digest(work / module),  # the table marks the result stale once the module changes
        "mutmut": stats,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    _result_file(module).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{module}: {generated} mutants, {killed} killed, {len(result['equivalent'])} equivalent, "
        f"{len(real)} surviving"
        + (f", {not_checked} not checked yet" if not_checked else "")
        + f" -> score {result['score']:.1%}"
    )
    for name in real:
        print(f"  surviving: {name}   (inspect: cd {os.path.relpath(work, ROOT)} && python -m mutmut show {name})")
    return result


def changed_modules() -> list[str]:
    """Library modules that differ from the ``main`` branch (committed or not) or are new."""
    out = subprocess.run(
        ["git", "diff", "--name-only", "main", "--", "rank1_pyro"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    new = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "rank1_pyro"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    return sorted({p for p in out + new if p.endswith(".py") and (ROOT / p).exists() and not p.endswith("__init__.py")})


COVERAGE = ROOT / "docs" / "results" / "coverage.json"


def table() -> str:
    """Markdown table of every kept result and every core module (docs/testing.md), with each module's
    branch coverage by the whole suite where ``make coverage`` kept it (``tools/coverage_table.py --write``)."""
    covered = json.loads(COVERAGE.read_text())["modules"] if COVERAGE.exists() else {}
    rows = [
        "| module | tests | mutants | killed | equivalent | surviving | score | branch coverage |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    results = {r["module"]: r for r in (json.loads(p.read_text()) for p in RESULTS.glob("*.json"))}
    for module in sorted(set(results) | set(_core_modules())):
        cov = f"{covered[module]['percent']:.1f}%" if module in covered else "–"
        if module not in results:
            rows.append(
                f"| `{module}` | {', '.join(Path(t).name for t in module_tests(module))} | not run yet | | | | | {cov} |"
            )
            continue
        r = results[module]
        stale = "source_sha256" in r and r["source_sha256"] != _digest(ROOT / module)
        partial = f" (partial: {r['generated'] - r['not_checked']} checked)" if r.get("not_checked") else ""
        rows.append(
            f"| `{module}` | {', '.join(Path(t).name for t in r['tests'])} | {r['generated']} | {r['killed']} | "
            f"{len(r['equivalent'])} | {len(r['surviving'])} | {r['score']:.1%}{partial}{' (stale)' if stale else ''} | {cov} |"
        )
    return "\n".join(rows)


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _core_modules() -> tuple[str, ...]:
    """The core modules of the goal (``CORE`` of tools/coverage_table.py): each gets a row, run or not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("coverage_table", Path(__file__).with_name("coverage_table.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.CORE


PAGE = ROOT / "docs" / "testing.md"
MARKS = ("<!-- mutants:start -->", "<!-- mutants:end -->")


def write_table(page: Path) -> None:
    """Put :func:`table` between the page's markers (a test checks the page against the results)."""
    text = page.read_text()
    head, rest = text.split(MARKS[0], 1)
    _, tail = rest.split(MARKS[1], 1)
    page.write_text(f"{head}{MARKS[0]}\n{table()}\n{MARKS[1]}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="library modules, e.g. rank1_pyro/metrics.py")
    parser.add_argument("--changed", action="store_true", help="the modules changed since the main branch")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the kept results")
    parser.add_argument("--write", action="store_true", help="with --table: write it into docs/testing.md")
    parser.add_argument(
        "--rerun", action="store_true", help="run only the last run's surviving mutants again (after adding tests)"
    )
    parser.add_argument("--resume", action="store_true", help="go on with an interrupted run of the module")
    parser.add_argument(
        "--progress", action="store_true", help="keep the counts of a run under way, as a partial result"
    )
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant runs (default 2)")
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        if args.write:
            write_table(PAGE)
        return 0
    modules = args.modules + (changed_modules() if args.changed else [])
    if not modules:
        print("nothing to mutate" + (" (no module changed since main)" if args.changed else ": name a module"))
        return 0
    results = [run_module(m, args.max_children, args.rerun, args.resume, args.progress) for m in modules]
    return 0 if all(r["score"] >= 0.9 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
