"""The layering rule as a folder rule: core ← methods ← app, no client imports a strategy, no circles between files.

- core: `fedpeft/` except `fedpeft/app/`; imports only core.
- methods: `strategies/` and `clients/` except `clients/app/`; import core and methods, and a client
  (trainer) never imports a strategy: what both halves share lives in the core (`fedpeft/methods/`).
- app: `fedpeft/app/`, `clients/app/` (the ClientApp) and the package root `fedpeft` (it re-exports the Python
  API, `fedpeft.app.api`); may import anything.

Every import counts, also inside functions and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedpeft", "strategies", "clients")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def _imports(mod: str) -> set[str]:
    """The project modules `mod` imports anywhere in its file."""
    path = MODULES[mod]
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target and target != mod:
                found.add(target)
    return found


def layer(mod: str) -> str:
    """core, methods or app: which folder the module sits in."""
    if mod == "fedpeft" or mod.startswith(("fedpeft.app", "clients.app")):
        return "app"
    return "core" if mod.startswith("fedpeft") else "methods"


def test_layers_point_one_way() -> None:
    """The core imports no method or app module; no method module imports the app; no client imports a strategy."""
    rank = {"core": 0, "methods": 1, "app": 2}
    bad = []
    for mod in MODULES:
        for target in _imports(mod):
            if rank[layer(target)] > rank[layer(mod)]:
                bad.append(f"{mod} ({layer(mod)}) imports {target} ({layer(target)})")
            elif layer(mod) == "methods" and mod.startswith("clients") and target.startswith("strategies"):
                bad.append(f"{mod} (a client) imports {target} (a strategy)")
    assert not bad, "layering broken:\n  " + "\n  ".join(sorted(bad))


def test_no_circles_between_files() -> None:
    """No module reaches itself through imports (package `__init__` re-exports of submodules aside)."""
    graph = {m: {t for t in _imports(m) if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))}
             for m in MODULES}
    seen: set[str] = set()
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in seen:
            return
        seen.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node])

    for mod in sorted(graph):
        visit(mod, [])
    assert not cycles, "import circles:\n  " + "\n  ".join(cycles)


def test_rule_sees_the_real_tree() -> None:
    """The rule above is checking something: each layer has modules, and imports are found."""
    layers = {layer(m) for m in MODULES}
    assert layers == {"core", "methods", "app"}
    assert "fedpeft.config" in _imports("fedpeft.app.cli")
