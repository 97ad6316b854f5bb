"""The test suite's own layout: two tiers and nothing else, and no test that reaches into benchmarks/
(a benchmark is tested through its command line; code both need lives in the package)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"benchmarks(\.\w+)+", node.value)
        ):
            names.add(node.value)  # a module named to run_workers(preload=...) is imported in the ranks
    return names


def test_no_test_imports_from_benchmarks():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imported_modules(path) if m.split(".")[0] == "benchmarks")
        for path in sorted(TESTS.rglob("*.py"))
    }
    offenders = {path: mods for path, mods in offenders.items() if mods}
    assert not offenders, f"tests import from benchmarks/ (move the shared code into the package): {offenders}"


def test_every_test_file_is_in_a_tier():
    loose = sorted(
        str(p.relative_to(ROOT)) for p in TESTS.rglob("test_*.py") if p.parent.name not in ("unit", "integration")
    )
    assert not loose, f"test files outside tests/unit and tests/integration: {loose}"
