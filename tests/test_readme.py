"""The Python examples of README.md and docs/ run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(document):
    blocks = re.findall(r"```python\n(.*?)```", document.read_text(), flags=re.DOTALL)
    namespace: dict = {}
    for block in blocks:  # blocks of one document share a namespace, as a reader's session would
        exec(compile(block, str(document), "exec"), namespace)


def test_readme_test_command_is_the_ci_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert "python -m pytest -q" in (ROOT / "README.md").read_text()
    assert ci[-1] == "python -m pytest -q"
