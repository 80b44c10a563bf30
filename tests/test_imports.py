"""The dependency rules of the layout, checked on the source: no import cycle between any two
modules of minimind_core/, backends/ and converters/ (every import statement counts: inside
functions, under TYPE_CHECKING, ``importlib.import_module("...")`` strings and registry strings that
name a project module), and ``import minimind_core`` pulls in no framework."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minimind_core", "backends", "converters")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` (dotted) is or lies in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``module`` imports, by any statement or module-name string.
    ``from pkg.sub import x`` counts as importing ``pkg.sub``; ``from pkg import x`` as importing
    ``pkg`` itself (its ``__init__``), unless ``x`` is a submodule."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    targets: set[str] = set()

    def add(name: str) -> None:
        found = _resolve(name, modules)
        if found is not None:
            targets.add(found)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:  # ``from pkg import submodule`` or a name of pkg
                add(f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem)
    for text in _module_strings(tree):
        if text.split(".")[0] in PACKAGES and text in modules:
            add(text)
    targets.discard(module)
    return targets


def _module_strings(tree: ast.Module) -> list[str]:
    """Strings that name modules to import: arguments of ``import_module`` / ``__import__`` /
    ``find_spec`` calls, and every string in a module-level dict, list, tuple or set (registries)."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__", "find_spec"):
                found += [a.value for a in node.args if isinstance(a, ast.Constant)
                          and isinstance(a.value, str)]
    for stmt in tree.body:
        value = getattr(stmt, "value", None) if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, (ast.Dict, ast.List, ast.Tuple, ast.Set)):
            found += [n.value for n in ast.walk(value) if isinstance(n, ast.Constant)
                      and isinstance(n.value, str)]
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in color:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = 2
        return None

    for node in sorted(graph):
        if node not in color:
            found = visit(node)
            if found:
                return found
    return None


def test_walker_sees_every_kind_of_import(tmp_path):
    # the checker itself must be able to fail: a TYPE_CHECKING import, a lazy one and a string
    modules = {"backends": tmp_path / "a.py", "backends.x": tmp_path / "b.py",
               "backends.y": tmp_path / "c.py"}
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from .y import Y\n")
    (tmp_path / "c.py").write_text("def f():\n    import importlib\n"
                                   "    return importlib.import_module('backends.x')\n")
    graph = {m: imports_of(m, p, modules) for m, p in modules.items() if p.exists()}
    assert graph["backends.x"] == {"backends.y"}
    assert "backends.x" in graph["backends.y"]
    assert find_cycle(graph) is not None


def test_no_import_cycles():
    modules = module_files()
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_one_way():
    """backends never import converters, cli or server; the core never imports cli or server."""
    modules = module_files()
    for module, path in modules.items():
        deps = imports_of(module, path, modules)
        if module.startswith("backends"):
            bad = {d for d in deps if d.startswith(("converters", "minimind_core.cli",
                                                   "minimind_core.server"))}
            bad |= {d for d in deps if d == "minimind_core"}
            assert not bad, f"{module} imports {sorted(bad)}"
        if module.startswith("converters"):
            assert "minimind_core" not in deps, f"{module}: import from the submodule, not the package"
        core = module.startswith("minimind_core") and not module.startswith(
            ("minimind_core.cli", "minimind_core.server"))
        if core and module != "minimind_core.__main__":
            bad = {d for d in deps if d.startswith(("minimind_core.cli", "minimind_core.server"))}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_web_frameworks_only_in_server():
    for module, path in module_files().items():
        if module.startswith("minimind_core.server"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("fastapi", "uvicorn", "starlette"), (
                    f"{module} imports {name}")


def test_layout_has_no_server_or_cli_modules_at_the_top():
    banned = {"server", "serve", "routes", "worker", "schema", "openai_schema", "app",
              "scheduler", "web", "cli", "commands"}
    for entry in (ROOT / "minimind_core").iterdir():
        if entry.stem in banned:
            assert entry.is_dir() and entry.stem in ("server", "cli"), f"{entry} belongs in a package"
        assert not any(w in entry.stem for w in ("corpus", "train", "dataset")), entry


def test_import_minimind_core_pulls_in_no_framework():
    code = ("import sys, minimind_core, minimind_core.engine, minimind_core.chat\n"
            "heavy = [m for m in ('torch', 'mlx', 'fastapi', 'uvicorn', 'transformers', 'starlette')"
            " if m in sys.modules]\nprint(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == ""
