"""Imports run downward: every project import goes to the same floor or a lower one.

The floors are the ones docs/architecture.md describes; a module is placed by the longest
prefix of its dotted name listed in FLOORS. Inside one floor, packages may import each
other but never in a cycle.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FOUNDATION, PARTS, MODEL, FEATURES, ENTRY = range(5)
FLOOR_NAMES = ["foundation", "parts", "model", "features", "entry points"]
FLOORS = {
    "config": FOUNDATION,
    "layers": PARTS, "input": PARTS, "checkpoint_utils": PARTS,
    "model": MODEL, "data": MODEL,
    # checkpoint files that build or size a model sit above it
    "checkpoint_utils.load": FEATURES, "checkpoint_utils.convert_hf": FEATURES,
    "checkpoint_utils.export_hf": FEATURES,
    "runtime": FEATURES, "generation": FEATURES, "fine_tuning": FEATURES, "serving": FEATURES,
    "run": ENTRY, "demo": ENTRY, "bench": ENTRY, "input.scripts": ENTRY, "checkpoint_utils.verify": ENTRY,
    "fine_tuning.abstractive_summarization.prepare": ENTRY,
    "fine_tuning.abstractive_summarization.evaluate": ENTRY,
    "fine_tuning.abstractive_summarization.demo": ENTRY,
    "serving.server": ENTRY, "serving.triton": ENTRY,
    "runtime.launch": ENTRY,
}
TOP_LEVEL = {name.split(".")[0] for name in FLOORS}


def floor_of(module: str) -> int:
    parts = module.split(".")
    for size in range(len(parts), 0, -1):
        prefix = ".".join(parts[:size])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise AssertionError(f"module {module} has no floor; add its package to FLOORS")


def project_modules() -> dict[str, str]:
    """{dotted module name: file path} of the project's own code (tests excluded)."""
    found = {}
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in ("tests", "demo_work", "runs",
                                                                               "build", "__pycache__")]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            if dotted.split(".")[0] in TOP_LEVEL:
                found[dotted] = path
    return found


def imports_of(path: str, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(name for name in names if name in known)
    return out


def test_no_import_runs_up_a_floor():
    modules = project_modules()
    known = set(modules)
    upward = []
    for module, path in sorted(modules.items()):
        for target in sorted(imports_of(path, known)):
            if floor_of(target) > floor_of(module):
                upward.append(f"{module} ({FLOOR_NAMES[floor_of(module)]}) imports {target} "
                              f"({FLOOR_NAMES[floor_of(target)]})")
    assert not upward, "imports that run up a floor:\n" + "\n".join(upward)


def test_packages_of_one_floor_do_not_import_each_other_in_a_cycle():
    modules = project_modules()
    known = set(modules)
    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        for target in imports_of(path, known):
            a, b = module.split(".")[0], target.split(".")[0]
            if a != b:
                edges.setdefault(a, set()).add(b)
    cycles = [(a, b) for a in edges for b in edges[a] if a in edges.get(b, set()) and a < b]
    assert not cycles, f"packages importing each other: {cycles}"


def test_the_check_sees_the_project_and_catches_an_upward_import(tmp_path):
    modules = project_modules()
    assert {"config.params", "model", "runtime.estimator", "layers.attention"} <= set(modules)
    upward = tmp_path / "x.py"
    upward.write_text("from runtime.estimator import Estimator\n")
    assert imports_of(str(upward), set(modules)) == {"runtime.estimator"}
    assert floor_of("runtime.estimator") > floor_of("layers.attention")
