"""The SDK imports only the standard library, httpx and msgspec (and itself): it can ship on its own."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SDK = Path(__file__).resolve().parents[2] / "meter_platform" / "sdk"
ALLOWED = {"httpx", "msgspec"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of a file, wherever it is (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append((node.lineno, node.module))
            elif node.level > 1:  # relative beyond the package: leaves the SDK
                found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_the_sdk_imports_nothing_of_the_platform():
    files = sorted(SDK.glob("**/*.py"))
    assert len(files) >= 5
    bad = []
    for path in files:
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            own = module == "meter_platform.sdk" or module.startswith("meter_platform.sdk.")
            if not (own or top in ALLOWED or top in sys.stdlib_module_names or top == "__future__"):
                bad.append(f"{path.relative_to(SDK.parent.parent)}:{line} imports {module}")
    assert bad == []


def test_the_check_sees_a_forbidden_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from meter_platform.config import load_settings\n    import psycopg\n")
    assert [m for _, m in imported_modules(sample)] == ["meter_platform.config", "psycopg"]
