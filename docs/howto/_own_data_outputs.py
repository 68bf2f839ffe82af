"""Run the examples of docs/howto/own-data.md and write what they print into the page.

The page's ```python blocks run in order, in one namespace, in a fresh temporary directory (as
tests/test_docs.py runs them). What a block prints goes into the ```text block between the
``<!-- output -->`` and ``<!-- /output -->`` markers that follow it (before the next python
block); a block that prints without such markers, or markers without a block, is an error.

    python docs/howto/_own_data_outputs.py            # run the examples, rewrite the outputs in the page
    python docs/howto/_own_data_outputs.py --check    # exit 1 when the page's outputs differ in form
    python docs/howto/_own_data_outputs.py --check --quick

The numbers vary with library versions and machines, so ``--check`` compares the *form* of what
is printed (:func:`form`: lines, CSV columns, table rows and keys, numbers masked). ``--quick``
runs every example with ``epochs = 1`` (the form does not depend on it): seconds instead of
minutes, which is what tests/test_own_data.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "own-data.md"
PYTHON = re.compile(r"^```python\n(.*?)^```\n", re.S | re.M)
OUTPUT = re.compile(r"^<!-- output -->\n```text\n(.*?)^```\n<!-- /output -->\n", re.S | re.M)
NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:e[-+]?\d+)?|\bnan\b|\binf\b")


def layout(text: str) -> list[tuple[str, int | None]]:
    """Each python block with the index of its output region (``None``: it has none)."""
    blocks = [(m.start(), m.end(), m.group(1)) for m in PYTHON.finditer(text)]
    regions = list(OUTPUT.finditer(text))
    owner = {}
    for r, region in enumerate(regions):
        before = [i for i, (_, end, _) in enumerate(blocks) if end <= region.start()]
        if not before or before[-1] in owner or text[blocks[before[-1]][1] : region.start()].count("```"):
            raise ValueError(f"{PAGE.name}: output region {r + 1} does not follow a python block directly")
        owner[before[-1]] = r
    return [(code, owner.get(i)) for i, (_, _, code) in enumerate(blocks)]


def run_examples(text: str, quick: bool = False) -> list[str]:
    """What each python block of ``text`` prints, run in order in the current directory."""
    import matplotlib

    matplotlib.use("Agg")
    namespace = {"__name__": "__doc_example__"}
    printed = []
    for i, (code, _) in enumerate(layout(text)):
        if quick:
            code = re.sub(r"^epochs = \d+", "epochs = 1", code, flags=re.M)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(code, f"{PAGE.name}[example {i}]", "exec"), namespace)
        printed.append(buffer.getvalue())
    return printed


def render(text: str, printed: list[str]) -> str:
    """``text`` with every output region holding what its block printed."""
    outputs = {}
    for (_, region), out in zip(layout(text), printed):
        if region is None:
            if out.strip():
                raise ValueError(f"{PAGE.name}: an example prints but has no output region:\n{out[:300]}")
        else:
            outputs[region] = out
    count = iter(range(len(outputs)))

    def fill(match):
        body = "\n".join(line.rstrip() for line in outputs[next(count)].strip("\n").splitlines())
        return f"<!-- output -->\n```text\n{body}\n```\n<!-- /output -->\n"

    return OUTPUT.sub(fill, text)


def form(output: str) -> list[str]:
    """The form of printed text: numbers masked, and the data rows of a CSV table (after its
    ``id,...`` header) reduced to their number of fields (their text, e.g. a predicted class, may
    change with the training); blank lines dropped."""
    shapes, fields = [], None
    for line in output.splitlines():
        if not line.strip():
            continue
        if line.startswith("id,"):
            fields = line.count(",") + 1
        elif fields is not None and line.count(",") + 1 == fields:
            shapes.append(f"<CSV row of {fields} fields>")
            continue
        else:
            fields = None
        shapes.append(NUMBER.sub("#", line.rstrip()))
    return shapes


def mismatches(text: str, printed: list[str]) -> list[str]:
    """Where the page's outputs differ in form from ``printed`` (empty: they agree)."""
    shown = [m.group(1) for m in OUTPUT.finditer(text)]
    expected = render(text, printed)
    problems = []
    for r, (old, new) in enumerate(zip(shown, [m.group(1) for m in OUTPUT.finditer(expected)])):
        if form(old) != form(new):
            problems.append(f"output {r + 1}:\n  page: {form(old)}\n  code: {form(new)}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the form only; write nothing")
    parser.add_argument("--quick", action="store_true", help="every example with epochs = 1")
    args = parser.parse_args(argv)
    text = PAGE.read_text()
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        try:
            printed = run_examples(text, quick=args.quick)
        finally:
            os.chdir(here)
    if args.check:
        problems = mismatches(text, printed)
        print("\n".join(problems) or f"{PAGE.name}: the outputs have the form the code prints")
        return 1 if problems else 0
    if args.quick:
        parser.error("--quick writes outputs of undertrained examples: use it with --check")
    PAGE.write_text(render(text, printed))
    print(f"wrote the outputs of {sum(1 for _, r in layout(text) if r is not None)} examples into {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
