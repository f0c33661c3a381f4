"""The package is built in floors: a module imports only from floors below its own (or from inside its own
package), so MATH data and grading never reach up into words, sessions or the command line, and the engine
never depends on what trains it. The import graph is read from the source, not from a running interpreter."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rosa2_dspy"

FLOORS = {
    "faults": 0, "fsutil": 0, "memory": 0, "progress": 0,
    "models": 1, "math": 1, "signatures": 1,
    "engine": 2, "adapters": 2, "artifacts": 2, "program_loader": 2, "provenance": 2,
    "evaluation": 3, "weights": 3, "words": 3, "bench": 3,
    "report": 4, "coadapt": 4, "teleprompt": 4, "bench_update": 4,
    "recipes": 5,
    "experiments": 6,
    "distributed": 7,
    "cli": 8,
}


def imports_of(path: Path) -> set[str]:
    """The rosa2_dspy modules (by their top-level name) that a source file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rosa2_dspy":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rosa2_dspy.")}
    return found


def test_every_module_has_a_floor_and_imports_only_from_below():
    wrong = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts == ("__init__",):  # the package's lazy public API names everything
            continue
        top = parts[0]
        assert top in FLOORS, f"{path}: give the new module a floor in tests/test_layers.py"
        for name in imports_of(path) - {top}:
            if FLOORS.get(name, 99) >= FLOORS[top]:
                wrong.append(f"{path.relative_to(ROOT)} (floor {FLOORS[top]}) imports {name} "
                             f"(floor {FLOORS.get(name)})")
    assert not wrong, "\n".join(wrong)


def test_math_reaches_nothing_above_it():
    for path in (ROOT / "math").rglob("*.py"):
        assert imports_of(path) <= {"math", "faults", "fsutil"}, path
