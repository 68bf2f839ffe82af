"""Branch coverage of the library by the test suite, per module, and the lines no test runs, each with a reason.

    make coverage                                   # the suite under coverage.py (branches, subprocesses too)
    python tools/coverage_table.py [.coverage]      # the table, and the lines no test runs
    python tools/coverage_table.py --check          # exit 1 if a core module has an unrun line with no reason
    python tools/coverage_table.py --template       # TOML entries for the unlisted lines, to fill in
    python tools/coverage_table.py --write "NOTE"   # keep the numbers, write the table into docs/testing.md

``[tool.coverage.run]`` in pyproject.toml measures branches and, with ``patch = ["subprocess"]``, the
Python subprocesses the tests start (the command line, torchrun workers); ``make coverage`` combines
their data. A line of a core module (:data:`CORE`) that no test runs is either tested, removed as dead
code, or listed in ``tests/coverage/uncovered.toml`` with a one-line reason, keyed by the line's source
text (stripped), so the list survives edits elsewhere in the file::

    ["rank1_pyro/inference/train.py"]
    "torch.cuda.synchronize(device)" = "runs on a CUDA device only; this machine has none"

A partially run branch counts by the line it starts from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parent.parent
LISTED = ROOT / "tests" / "coverage" / "uncovered.toml"
#: the core modules of issue #21: every unrun line is tested, removed, or listed with a reason
CORE = (
    "rank1_pyro/layers.py",
    "rank1_pyro/priors.py",
    "rank1_pyro/inference/guides.py",
    "rank1_pyro/inference/objectives.py",
    "rank1_pyro/inference/predictive.py",
    "rank1_pyro/metrics.py",
    "rank1_pyro/inference/train.py",
    "rank1_pyro/inference/checkpoint.py",
    "rank1_pyro/convert.py",
    "rank1_pyro/laplace/subnetwork.py",
    "rank1_pyro/laplace/curvature.py",
    "rank1_pyro/laplace/projected.py",
    "rank1_pyro/diagnostics.py",
    "rank1_pyro/data.py",
    "rank1_pyro/baselines.py",
)


def _analyses(data_file: str, root: Path, package: str):
    cov = coverage.Coverage(data_file=data_file)
    cov.load()
    for path in sorted((root / package).rglob("*.py")):
        yield path.relative_to(root).as_posix(), path, cov._analyze(str(path))  # coverage's own per-file analysis


def rows(data_file: str = ".coverage", root: Path = ROOT, package: str = "rank1_pyro") -> list[dict]:
    out = []
    for module, _, analysis in _analyses(data_file, root, package):
        numbers = analysis.numbers
        out.append(
            {
                "module": module,
                "statements": numbers.n_statements,
                "missing": numbers.n_missing,
                "branches": numbers.n_branches,
                "partial": numbers.n_partial_branches,
                "percent": numbers.pc_covered,
                "lines": analysis.missing_formatted(branches=True),
            }
        )
    return out


def unrun(data_file: str = ".coverage", root: Path = ROOT, package: str = "rank1_pyro", modules=CORE):
    """``{module: [(line number, stripped source text), ...]}``: the statements no test runs and the
    lines of branches only partly run, in the given modules."""
    out = {}
    for module, path, analysis in _analyses(data_file, root, package):
        if module not in modules:
            continue
        numbers = set(analysis.missing) | set(analysis.missing_branch_arcs())
        source = path.read_text().splitlines()
        out[module] = [(n, source[n - 1].strip()) for n in sorted(numbers)]
    return out


def listed(path: Path = LISTED) -> dict[str, dict[str, str]]:
    """``{module: {source text: reason}}`` from ``tests/coverage/uncovered.toml``."""
    return tomllib.loads(path.read_text()) if path.exists() else {}


def unlisted(found: dict, reasons: dict) -> dict:
    """The unrun lines of ``found`` (:func:`unrun`) whose text has no reason in ``reasons`` (:func:`listed`)."""
    out = {}
    for module, lines in found.items():
        missing = [(n, text) for n, text in lines if text not in reasons.get(module, {})]
        if missing:
            out[module] = missing
    return out


def stale(found: dict, reasons: dict) -> dict:
    """Listed texts that are no longer an unrun line (tested or removed since): drop them from the list."""
    out = {}
    for module, entries in reasons.items():
        now = {text for _, text in found.get(module, [])}
        gone = [text for text in entries if text not in now]
        if gone:
            out[module] = gone
    return out


def template(missing: dict) -> str:
    """TOML entries for ``missing`` lines (:func:`unlisted`), each with a reason to write."""
    lines = []
    for module, entries in missing.items():
        lines.append(f'["{module}"]')
        for n, text in entries:
            lines.append(f'{_toml_key(text)} = "TODO (line {n})"')
        lines.append("")
    return "\n".join(lines)


def _toml_key(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def table(data_file: str = ".coverage", root: Path = ROOT, package: str = "rank1_pyro") -> str:
    lines = ["| module | statements | not run | branches | partial | coverage |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows(data_file, root, package):
        lines.append(
            f"| `{r['module']}` | {r['statements']} | {r['missing']} | {r['branches']} | {r['partial']} | "
            f"{r['percent']:.1f}% |"
        )
    return "\n".join(lines)


RESULT = ROOT / "docs" / "results" / "coverage.json"
PAGE = ROOT / "docs" / "testing.md"
MARKS = ("<!-- coverage:start -->", "<!-- coverage:end -->")


def write(
    data_file: str, note: str, result: Path = RESULT, page: Path = PAGE, root: Path = ROOT, package: str = "rank1_pyro"
) -> None:
    """Keep the per-module numbers in ``docs/results/coverage.json`` (the mutation table reads each core
    module's branch coverage from it) and put ``note`` and :func:`table` between the page's markers."""
    kept = {r["module"]: {k: v for k, v in r.items() if k != "module"} for r in rows(data_file, root, package)}
    result.write_text(json.dumps({"note": note, "modules": kept}, indent=1) + "\n")
    text = page.read_text()
    head, rest = text.split(MARKS[0], 1)
    _, tail = rest.split(MARKS[1], 1)
    page.write_text(f"{head}{MARKS[0]}\n{note}\n\n{table(data_file, root, package)}\n{MARKS[1]}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_file", nargs="?", default=".coverage")
    parser.add_argument("--check", action="store_true", help="exit 1 if a core module has an unlisted unrun line")
    parser.add_argument("--template", action="store_true", help="print TOML entries for the unlisted lines")
    parser.add_argument(
        "--write",
        metavar="NOTE",
        help="keep the numbers (docs/results/coverage.json) and write "
        "the table, after NOTE (how it was measured), into docs/testing.md",
    )
    args = parser.parse_args(argv)
    if args.write:
        write(args.data_file, args.write)
    found, reasons = unrun(args.data_file), listed()
    missing = unlisted(found, reasons)
    if args.template:
        print(template(missing))
        return 0
    if not args.check:
        print(table(args.data_file))
        print()
        for r in rows(args.data_file):
            if r["lines"]:
                print(f"{r['module']}: {r['lines']}")
        print()
    for module, texts in stale(found, reasons).items():
        for text in texts:
            print(f"{module}: listed but run (or gone) now, drop it from {LISTED.name}: {text!r}")
    for module, entries in missing.items():
        for n, text in entries:
            print(f"{module}:{n}: not run by any test and not listed in {LISTED.name}: {text!r}")
    total = sum(len(v) for v in missing.values())
    print(f"{total} unrun line(s) of the core modules without a reason")
    return 1 if args.check and total else 0


if __name__ == "__main__":
    sys.exit(main())
