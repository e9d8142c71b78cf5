"""The package's shape, as ARCHITECTURE.md asks: no import cycles, no module over ~400 lines, the
seams (codecs, deltas) free of torch at import, and ``streammerge --help`` without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import streammerge

PACKAGE = Path(streammerge.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package imported when ``path`` is imported (module level, not TYPE_CHECKING)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in [node]:
            if isinstance(sub, ast.ImportFrom) and sub.level:
                base = package.split(".")
                base = base[: len(base) - sub.level + 1]
                target = ".".join(base + ([sub.module] if sub.module else []))
                found.add(target)
                found.update(f"{target}.{a.name}" for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("streammerge"):
                found.add(sub.module)
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith("streammerge"))
    return found


def _with_packages(name: str, imported: set[str]) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first: edges to those packages too,
    except to the importing module's own packages (already being imported when it runs)."""
    own = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    out = set(imported)
    for m in imported:
        out.update(p for p in (m.rsplit(".", i)[0] for i in range(1, m.count(".") + 1)) if p not in own)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _with_packages(name, _imports(path)) if m in files and m != name}
            for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles() -> None:
    # a package imports its own submodules in __init__; only cycles through other modules count
    graph = _graph()
    for name, deps in graph.items():
        deps.discard(name.rpartition(".")[0])  # a submodule importing its package's __init__ is the package's own
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    # x.y imports p.q: p/__init__ runs first, and it imports x.y back
    graph = {"x.y": _with_packages("x.y", {"p.q"}), "p": {"x.y"}, "p.q": set(), "x": set()}
    assert _cycle(graph) is not None


def test_no_module_over_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := p.read_text().count("\n")) > 400}
    assert not long


def test_help_and_the_seams_load_no_torch() -> None:
    code = ("import sys; import streammerge.codecs, streammerge.deltas, streammerge.plan, streammerge.events, "
            "streammerge.options; from streammerge.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
