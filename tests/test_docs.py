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
        if page.name == "index.md":
            continue
        entry = str(page.relative_to(ROOT / "docs").with_suffix(""))
        assert re.search(rf"^{re.escape(entry)}$", index_text, re.M), f"{entry} is not listed in a toctree"
