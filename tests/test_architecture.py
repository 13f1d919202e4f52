"""The layout holds: no import cycle inside `distill`, the library never imports the CLI or the service, no function
is too long to read at once, and the command line starts without loading torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "distill"
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS: dict[str, str] = {}  # "module:function" -> why it stays long


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in SOURCE.rglob("*.py")}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The distill modules `path` imports, anywhere in it (inside functions too): `from x import y` counts as x.y
    when that is a module, else x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {target for target in found if target in known and target != name}


def graph() -> dict[str, set[str]]:
    table = modules()
    return {name: imports(path, name, set(table)) for name, path in table.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_inside_distill():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_library_never_imports_the_cli_or_the_service():
    outside = ("distill.cli", "distill.service")
    for name, targets in graph().items():
        if name.startswith(outside):
            continue
        wrong = sorted(t for t in targets if t.startswith(outside))
        assert not wrong, f"{name} imports {wrong}"


def test_no_function_is_over_80_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES and f"{name}:{node.name}" not in LONG_FUNCTIONS:
                    long.append(f"{name}:{node.name} ({lines} lines)")
    assert not long, ", ".join(sorted(long))


def _imported_by(*args: str) -> set[str]:
    code = "import sys, runpy; sys.argv = ['distill', *sys.argv[1:]]\ntry:\n    runpy.run_module('distill.cli', run_name='__main__')\nexcept SystemExit:\n    pass\nprint(' '.join(sorted(sys.modules)), file=sys.stderr)"
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return set(done.stderr.split()[-2000:])


def test_help_and_key_creation_do_not_load_torch(tmp_path):
    for args in (
        ["--help"],
        ["run", "--help"],
        ["service", "keys", "create", "--scopes", "read", "--data-dir", str(tmp_path)],
    ):
        loaded = _imported_by(*args)
        assert "distill.cli" in loaded and "torch" not in loaded, args
