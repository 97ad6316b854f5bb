"""The layering, size and writing rules of the code base, checked on the source: jigsaw_ext knows
nothing of weather, weathermixer's stages import only downwards (config <- data <- model <- train /
inference <- evaluation), no function longer than 80 lines, no module longer than 500 (see README "Layout
of the code"), and no development diary in the project's text. Cheap scans; each fails by naming the
offender."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
    bad = [
        f"{f.relative_to(ROOT)} imports {m}"
        for f in _modules("jigsaw_ext")
        for m in _imported(ast.parse(f.read_text()))
        if m.split(".")[0] == "weathermixer"
    ]
    assert not bad, bad


# The stages of weathermixer, lowest first: a module imports only from its own stage or a lower one, so
# config <- data <- model <- train / inference <- evaluation, with train and inference side by side (neither
# imports the other). The floor holds what every stage shares: the typed configuration, the grid's
# geometry and latitude weights, the process setup of a rank. The commands on top (`python -m
# weathermixer.plan`, ...) may import any stage.
FLOOR = ("__init__", "config", "grid", "latitudes", "runtime", "progress")
SUBPACKAGE_STAGES = {"data": 1, "model": 2, "train": 3, "inference": 3, "evaluation": 4}
# top-level tools that may import any stage: the commands, the planner's validation against
# measurements and the training steps the benchmarks measure (weathermixer.baselines)
COMMANDS = ("plan", "plan_validation", "selfcheck", "size", "evaluate", "forecast", "scorecard", "baselines")


def _stage(dotted: str) -> tuple[str, int] | None:
    """(stage name, rank) of a weathermixer module, None for a module the table does not place."""
    parts = dotted.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top in SUBPACKAGE_STAGES:
        return top, SUBPACKAGE_STAGES[top]
    if top in FLOOR:
        return "floor", 0
    if top in COMMANDS:
        return "commands", 9
    return None


def _module_name(f: Path) -> str:
    parts = list(f.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_with_lines(f: Path):
    """(line, absolute module name) of every import in the file: module level, inside functions and under
    TYPE_CHECKING, absolute and relative (`from . import x` yields the submodule `<package>.x`)."""
    name = _module_name(f)
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if node.module:
                yield node.lineno, base
            else:
                for alias in node.names:
                    yield node.lineno, f"{base}.{alias.name}"


def test_weathermixer_stages_import_only_their_own_stage_or_below():
    bad = []
    for f in _modules("weathermixer"):
        here = _stage(_module_name(f))
        if here is None:
            bad.append(f"{f.relative_to(ROOT)}: not placed in a stage (add it to FLOOR, SUBPACKAGE_STAGES or COMMANDS)")
            continue
        for line, target in _imports_with_lines(f):
            if target.split(".")[0] != "weathermixer" or here[0] == "commands":
                continue
            there = _stage(target)
            if there is None or (there[0] != here[0] and there[1] >= here[1]):
                placed = f"{there[0]} stage" if there else "no stage"
                bad.append(f"{f.relative_to(ROOT)}:{line} ({here[0]}) imports {target} ({placed})")
    assert not bad, "\n".join(bad)


def test_no_long_functions_or_modules():
    long_functions, long_modules = [], []
    for package in PACKAGES:
        for f in _modules(package):
            text = f.read_text()
            if text.count("\n") > 500:
                long_modules.append(f"{f.relative_to(ROOT)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    long_functions.append(
                        f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                    )
    assert not long_functions and not long_modules, long_functions + long_modules


def test_readme_layout_names_only_paths_that_exist():
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout of the code")
    section = text[start : text.index("\n## ", start + 1)]
    paths = [
        cell.strip("`")
        for line in section.splitlines()
        if line.startswith("| `")
        for cell in [line.split("|")[1].strip()]
    ]
    missing = [p for p in paths if "{" not in p and not (ROOT / p).exists()]
    assert paths and not missing, missing


# History lives in git and CHANGELOG.md; the project's text describes what is. Each pattern names a
# diary habit: the word for a stretch of work (spelled in two pieces below, so this file passes its own
# test), tracker numbers, and "X before / was X" narration of a change.
DIARY = {
    "a stretch of work": re.compile(r"\bsess" r"ions?\b", re.I),
    "an issue number": re.compile(r"\bissues? #?\d+|\bthe issue's\b|\bthis issue\b", re.I),
    "a value as it was": re.compile(r"\(was [^)]{1,40}\)|\b(?:was|were) [\d.]+\S* before\b", re.I),
    "a change narrated": re.compile(
        r"\bbefore this (?:work|change|commit|fix)\b|\bpreviously\b"
        r"|\bthe previous job file\b|\ba follow-up\b",
        re.I,
    ),
    "a verdict instead of a result": re.compile(r"\btarget (?:still )?missed\b", re.I),
    "a format without its name": re.compile(r"\b(?:earlier|older|old) [\w -]{0,30}format\b", re.I),
}
DIARY_PLACES = (
    "README.md",
    "CONTRIBUTING.md",
    "train.py",
    "pyproject.toml",
    ".pre-commit-config.yaml",
    "docs",
    "benchmarks",
    "jigsaw_ext",
    "weathermixer",
    "tests",
    "deepspeed_configs",
    "launchers",
    ".ci",
)
DIARY_SUFFIXES = {".md", ".py", ".json", ".sh", ".sbatch", ".toml", ".yaml", ".txt", ""}
# (path, phrase) pairs where a pattern's words mean something else, each with its reason. Empty: none
# of the project's text needs one yet (the patterns are narrow enough).
DIARY_ALLOWED: set[tuple[str, str]] = set()


def _diary_files():
    for place in DIARY_PLACES:
        path = ROOT / place
        found = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for f in found:
            if f.is_file() and f.suffix in DIARY_SUFFIXES and "__pycache__" not in f.parts and f != Path(__file__):
                yield f


def test_no_development_diary():
    hits = []
    for f in _diary_files():
        rel = str(f.relative_to(ROOT))
        for number, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for habit, pattern in DIARY.items():
                m = pattern.search(line)
                if m and (rel, m.group(0).lower()) not in DIARY_ALLOWED:
                    hits.append(f"{rel}:{number}: {habit}: {m.group(0)!r}")
    assert not hits, "\n".join(hits)


# Private members are a module's own business: `obj._name` on anything but self/cls, where `_name`
# is defined in another module of the project, reaches into that module's internals. Collaborators
# get what they need as explicit, public inputs instead (e.g. the trainer's Validator). Private names
# of third-party libraries (DeepSpeed's, torch's) are not defined here and are not this test's concern.
# (module, attribute) pairs allowed, each with its reason.
PRIVATE_REACH_ALLOWED: dict[tuple[str, str], str] = {
    ("jigsaw_ext/chunked.py", "_rank"): "collectives._rank is looked up at call time on purpose: the planner's "
    "tracer swaps that one function to give the dry run its ranks (a transport seam would replace both)",
}


def _private_definitions(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, module/class assignments, self._x / cls._x."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for t in targets:
            for leaf in ast.walk(t):
                if isinstance(leaf, ast.Name):
                    names.add(leaf.id)
                elif (
                    isinstance(leaf, ast.Attribute)
                    and isinstance(leaf.value, ast.Name)
                    and leaf.value.id in ("self", "cls")
                ):
                    names.add(leaf.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _private_reaches(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                yield node


def test_no_reach_into_another_modules_private_members():
    trees = {str(f.relative_to(ROOT)): ast.parse(f.read_text()) for p in PACKAGES for f in _modules(p)}
    defined = {rel: _private_definitions(tree) for rel, tree in trees.items()}
    everywhere = set().union(*defined.values())
    bad = [
        f"{rel}:{node.lineno} {ast.unparse(node)}"
        for rel, tree in trees.items()
        for node in _private_reaches(tree)
        if node.attr in everywhere and node.attr not in defined[rel] and (rel, node.attr) not in PRIVATE_REACH_ALLOWED
    ]
    assert not bad, "\n".join(bad)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST):
    """Every import statement executed at run time, at module or function level (imports under
    `if TYPE_CHECKING:` only feed the type checker and are skipped)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def _import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}. `from pkg import name` points at pkg.name when that
    is a module, else at pkg's __init__; `import a.b` points at a.b alone: a package __init__ that
    re-exports its submodules closes a circle only when a submodule imports the __init__ itself."""
    files = {_module_name(f): f for p in PACKAGES for f in _modules(p)}
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in _runtime_imports(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
                continue
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target)
        edges &= files.keys()
        edges.discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _import_graph()
    cycles = [
        " <-> ".join(c) + ": " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a] & set(c)))
        for c in _cycles(graph)
    ]
    assert not cycles, cycles
