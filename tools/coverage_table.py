"""Branch coverage of the library by the test suite, per module, as the Markdown table of docs/testing.md.

    make coverage                                   # runs the suite under coverage.py (branch coverage)
    python tools/coverage_table.py [.coverage]      # the table, and the lines no test runs

Lines that only run in a subprocess (the CLI tests that start ``python -m rank1_pyro``, torchrun
workers) count as not run: the table is a lower bound.
"""

from __future__ import annotations

import sys
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parent.parent


def rows(data_file: str = ".coverage") -> list[dict]:
    cov = coverage.Coverage(data_file=data_file)
    cov.load()
    out = []
    for path in sorted((ROOT / "rank1_pyro").rglob("*.py")):
        analysis = cov._analyze(str(path))  # coverage's own per-file numbers (statements, branches, missing)
        numbers = analysis.numbers
        out.append(
            {
                "module": str(path.relative_to(ROOT)),
                "statements": numbers.n_statements,
                "missing": numbers.n_missing,
                "branches": numbers.n_branches,
                "partial": numbers.n_partial_branches,
                "percent": numbers.pc_covered,
                "lines": analysis.missing_formatted(branches=True),
            }
        )
    return out


def table(data_file: str = ".coverage") -> str:
    lines = ["| module | statements | not run | branches | partial | coverage |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows(data_file):
        lines.append(
            f"| `{r['module']}` | {r['statements']} | {r['missing']} | {r['branches']} | {r['partial']} | "
            f"{r['percent']:.1f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    data = sys.argv[1] if len(sys.argv) > 1 else ".coverage"
    print(table(data))
    print()
    for r in rows(data):
        if r["lines"]:
            print(f"{r['module']}: {r['lines']}")
