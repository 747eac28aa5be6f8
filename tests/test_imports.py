"""The package's shape: no import circle among its modules, and a light `import hermes`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hermes"


def import_graph() -> dict[str, set[str]]:
    """Module -> the hermes modules it imports, at any depth of the file (function-level imports
    included: they are dependencies too)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hermes":
                parts = node.module.split(".")
                deps |= {parts[1]} if len(parts) > 1 else {a.name if a.name in modules else "__init__"
                                                          for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hermes.")}
        graph[name] = (deps & modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first search)."""
    found, state = [], {}

    def visit(v, path):
        state[v] = "open"
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                found.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    return found


def test_no_import_circle_among_hermes_modules():
    assert cycles(import_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_import_hermes_and_help_load_neither_numpy_nor_pyarrow():
    code = ("import sys, hermes\n"
            "from hermes.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('numpy', 'pyarrow', 'duckdb', 'torch') if m in sys.modules]\n"
            "print(','.join(heavy), file=sys.stderr)\n"
            "assert callable(hermes.run) and 'numpy' in sys.modules   # the API loads on first use\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ""


def test_every_name_the_scripts_import_from_hermes_exists():
    """The benchmark scripts import hermes names inside functions, where only running them would
    show a name that moved or was removed."""
    import importlib

    missing = []
    for script in sorted((PACKAGE.parent / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hermes":
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and not (node.module == "hermes" and
                                                                    (PACKAGE / f"{a.name}.py").is_file())]
    assert not missing
