"""The house: snac_accel's modules import only downwards (no circles, function-level imports included)
and stay short enough to read, each with one job."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "snac_accel"
MAX_LINES = 400
# Modules over MAX_LINES, each with why its one job needs the length.
LONG_MODULES = {
    "snac_accel.trainer": "one run's objects built from its options and the loop's named steps (batch, step, log, "
                          "validate and keep the best, checkpoint, stop, roll back); the decisions themselves live in "
                          "step, control and resume",
    "snac_accel.encode": "the tokenization run: its options, sharding, resume and the encode loop, one CLI",
}
# Lowest first. A module imports modules of its own row or of lower rows, never of a higher one.
ROWS = [
    ["snac_accel.presets", "snac_accel.option_checks", "snac_accel.launch_configs", "snac_accel.demo_data",
     "snac_accel.demo_data.generate", "snac_accel.demo_data.real_speech"],
    ["snac_accel.config", "snac_accel.arguments"],
    ["snac_accel.model", "snac_accel.codebook", "snac_accel.discriminators", "snac_accel.losses", "snac_accel.perceptual",
     "snac_accel.data",
     "snac_accel.data.*", "snac_accel.tokenizer", "snac_accel.tokenizer.tokens", "snac_accel.tokenizer.chunks"],
    ["snac_accel.lock", "snac_accel.checkpoints", "snac_accel.progress", "snac_accel.compile", "snac_accel.control",
     "snac_accel.resume"],
    ["snac_accel.paper"],
    ["snac_accel.card"],
    ["snac_accel.hub"],
    ["snac_accel.evaluate"],
    ["snac_accel.export", "snac_accel.tokenizer.codes", "snac_accel.tokenizer.source_rows"],
    ["snac_accel.step", "snac_accel.validation"],
    ["snac_accel.trainer"],
    ["snac_accel", "snac_accel.train", "snac_accel.encode", "snac_accel.decode"],
]


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module and package of snac_accel."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The snac_accel modules that ``name`` imports anywhere in its file (module level, in functions, in
    ``if`` blocks): ``from . import x`` names module ``x`` when it is one, else the package it comes from."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return {target for target in found if target in modules and target != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as a path that ends where it starts, or [] when there is none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def row_of(name: str) -> int:
    rows = [i for i, patterns in enumerate(ROWS) if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    assert len(rows) == 1, f"{name} must be placed in exactly one row of ROWS (found {rows})"
    return rows[0]


def test_no_import_circle():
    graph = import_graph()
    assert graph["snac_accel.trainer"] >= {"snac_accel.step", "snac_accel.checkpoints", "snac_accel.export"}
    cycle = find_cycle(graph)
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_modules_import_only_their_row_or_lower_ones():
    graph = import_graph()
    for name in graph:
        row_of(name)  # every module has its place
    upward = [f"{name} (row {row_of(name)}) imports {target} (row {row_of(target)})"
              for name, targets in sorted(graph.items()) for target in sorted(targets) if row_of(target) > row_of(name)]
    assert not upward, "; ".join(upward)


def test_modules_stay_short_unless_their_one_job_needs_more():
    lengths = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES and name not in LONG_MODULES}
    assert not too_long, f"over {MAX_LINES} lines: {too_long}; split by job, or list in LONG_MODULES with why"
    stale = [name for name in LONG_MODULES if lengths.get(name, 0) <= MAX_LINES]
    assert not stale, f"LONG_MODULES lists modules that are no longer long (or gone): {stale}"


def test_the_walker_sees_function_level_imports_and_circles(tmp_path):
    """The checks above on a small package with a circle through a function-level relative import."""
    root = tmp_path / "snac_accel"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "low.py").write_text("def f():\n    from .sub import high\n    return high\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "high.py").write_text("from .. import low\nfrom ..low import f\n")
    graph = import_graph(root)
    assert graph == {"snac_accel": set(), "snac_accel.low": {"snac_accel.sub.high"}, "snac_accel.sub": set(),
                     "snac_accel.sub.high": {"snac_accel.low"}}
    assert find_cycle(graph) == ["snac_accel.low", "snac_accel.sub.high", "snac_accel.low"]
    (root / "low.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(root)) == []
