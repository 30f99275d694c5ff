"""The package's layering: only server/web/ speaks aiohttp; storage knows nothing of the web."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against `server`)."""
    package = list(path.relative_to(SERVER.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _modules(under: str = "") -> list[Path]:
    return sorted((SERVER / under).rglob("*.py"))


def test_only_the_web_package_imports_aiohttp() -> None:
    """aiohttp appears in server/web/ and the entry point only."""
    offenders = [
        str(p.relative_to(SERVER))
        for p in _modules()
        if not p.is_relative_to(SERVER / "web")
        and p.name != "__main__.py"
        and any(m == "aiohttp" or m.startswith("aiohttp.") for m in _imports(p))
    ]
    assert offenders == []


def test_store_and_broker_import_nothing_from_the_web() -> None:
    """Storage (and fan-out) sit below the web shell."""
    offenders = [
        str(p.relative_to(SERVER))
        for sub in ("store", "broker")
        if (SERVER / sub).is_dir()
        for p in _modules(sub)
        if any(m.startswith("server.web") for m in _imports(p))
    ]
    assert offenders == []


def test_nothing_below_the_web_imports_it() -> None:
    """The domain (tracker, hub, jobs, ...) never reaches up into server/web/."""
    offenders = [
        str(p.relative_to(SERVER))
        for p in _modules()
        if not p.is_relative_to(SERVER / "web")
        and p.name != "__main__.py"
        and any(m.startswith("server.web") for m in _imports(p))
    ]
    assert offenders == []
