"""The package's layering: no import cycles, and the kernels below nn.

Read from the source with ``ast`` (no imports run): module-level imports, ``TYPE_CHECKING`` blocks
included (a cycle there still ties two modules together for a reader); imports inside functions
(deliberately lazy ones) do not count for cycles, but do for the kernels rule.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rnorm"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(body: list[ast.stmt], modules: dict[str, Path], nested: bool) -> set[str]:
    found = set()
    for node in body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.If):
            found |= _imports(node.body, modules, nested)
        elif nested and hasattr(node, "body"):
            found |= _imports(node.body, modules, nested)  # functions, classes, with, try ...
    return {name for name in found if name in modules}


def test_no_import_cycles():
    modules = _modules()
    graph = defaultdict(set)
    for name, path in modules.items():
        graph[name] = _imports(ast.parse(path.read_text()).body, modules, nested=False) - {name}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_kernels_never_import_nn():
    """rnorm.kernels receives a layer description and never reaches up into rnorm.nn (not even lazily)."""
    modules = _modules()
    offenders = {
        name: sorted(target for target in _imports(ast.parse(path.read_text()).body, modules, nested=True) if target.startswith("rnorm.nn"))
        for name, path in modules.items()
        if name.startswith("rnorm.kernels")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_check_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle test can fail: two modules importing each other are found."""
    package = tmp_path / "rnorm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from rnorm import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rnorm.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", package)
    try:
        test_no_import_cycles()
    except AssertionError as error:
        assert "rnorm.a" in str(error) and "rnorm.b" in str(error)
    else:
        raise AssertionError("the cycle was not found")
