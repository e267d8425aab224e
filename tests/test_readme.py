"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})  # noqa: S102 - our own documentation


def test_readme_test_command_is_the_ci_command():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()
    assert "python -m pytest -q" in README.read_text()
    assert ci[-1] == "python -m pytest -q"
