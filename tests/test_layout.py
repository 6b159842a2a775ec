"""The layout of docs/architecture.md holds: every import points down the stages, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "rankwise"
STAGES = [
    "core", "model", "data", "methods", "calibration", "allocation", "storage", "pipeline",
    "recovery", "evaluation", "analysis", "report", "cli",
]  # fmt: skip
LIMIT_LINES = 420  # "files under ~400 lines"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("rankwise", *parts)).removesuffix(".__init__")


def imports(path: Path, known: set[str]) -> set[str]:
    """Modules of rankwise that `path` imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rankwise"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rankwise.")}
    return {m for m in found if m in known and m != "rankwise"}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else None


def test_every_module_sits_in_a_stage() -> None:
    top = [m for m in graph() if m.count(".") == 1]
    loose = [m for m in top if m.split(".")[1] not in (*STAGES, "__main__")]
    assert loose == [], "modules outside the stage packages"


def test_imports_point_down_the_stages() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target in targets
        if stage(module) and stage(target)
        and STAGES.index(stage(target)) > STAGES.index(stage(module))
    ]  # fmt: skip
    assert upward == []


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_files_stay_short() -> None:
    long = {
        module_name(p): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > LIMIT_LINES
    }
    assert long == {}
