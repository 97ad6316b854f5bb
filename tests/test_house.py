"""The layering and size rules of the code base, checked on the source: jigsaw_ext knows nothing
of weather, no function longer than 80 lines, no module longer than 500 (see README "Layout of the
code"). Cheap AST scans; each fails by naming the offender."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jigsaw_ext", "weathermixer")


def _modules(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_jigsaw_ext_imports_nothing_from_weathermixer():
    bad = [f"{f.relative_to(ROOT)} imports {m}" for f in _modules("jigsaw_ext")
           for m in _imported(ast.parse(f.read_text())) if m.split(".")[0] == "weathermixer"]
    assert not bad, bad


def test_no_long_functions_or_modules():
    long_functions, long_modules = [], []
    for package in PACKAGES:
        for f in _modules(package):
            text = f.read_text()
            if text.count("\n") > 500:
                long_modules.append(f"{f.relative_to(ROOT)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    long_functions.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} "
                                          f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long_functions and not long_modules, long_functions + long_modules


def test_readme_layout_names_only_paths_that_exist():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout of the code"):text.index("## How the Jigsaw matmuls work here")]
    paths = [cell.strip("`") for line in section.splitlines() if line.startswith("| `")
             for cell in [line.split("|")[1].strip()]]
    missing = [p for p in paths if "{" not in p and not (ROOT / p).exists()]
    assert paths and not missing, missing
