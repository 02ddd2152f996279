"""slime's import structure, read from the source with `ast` (nothing is imported): which module imports which,
the circles among them, and the imports that run from a lower floor up to a higher one.

Every `import slime...` counts wherever it stands: at the top of a file, inside a function (a lazy import is
still knowledge of the other module) or under `if TYPE_CHECKING:`. `from slime.a import b` is an arrow to the
module `slime.a.b` when that is a module, else to `slime.a`.

A *room* is a top-level folder of slime/ or a module at slime/'s top (the package itself is the room `slime`);
the GPU check (`slime.backends.<hardware>.gpu_check`) is a room of its own: it is a program (scripts/gpu_check.sh
runs it) that lives under backends/ only because hardware names stay there. A `*` in a room's name stands for
any one part of a module's name. FLOORS stacks the rooms, bottom first: a room may
import its own floor and the floors below. An import from a room to a higher floor is a *back-arrow*.

A *circle* is a set of modules that reach each other through imports (a strongly connected component of more
than one module). A circle whose modules sit in different folders ties those folders together; one inside a
folder (a registry and its own implementations) does not.

    python -m slime.testing.import_structure     # the numbers, every cross-folder circle and every back-arrow
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # slime/

FLOORS: tuple[tuple[str, ...], ...] = (
    # what everything may use: errors as types, the Sample, addresses, flag ranges, run invariants, core budgets
    ("slime", "slime.errors", "slime.types", "slime.net", "slime.flag_ranges", "slime.invariants", "slime.cores"),
    ("slime.plugin_failures",),
    ("slime.backends",),  # the hardware layer
    ("slime.kernels",),  # op registry over the backends' implementations
    ("slime.models",),  # HF <-> Megatron / JAX weights per model family
    ("slime.training", "slime.rollout"),  # trainer families; data, generation, rewards, engines
    ("slime.ray",),  # placement, worker actors, rollout manager, weight sync
    # the run config, its one mapping onto each part's settings, user plugins, the run's records
    (
        "slime.config",
        "slime.config_lora",
        "slime.config_async",
        "slime.settings",
        "slime.plugins",
        "slime.profiling",
        "slime.run_log",
    ),
    ("slime.preflight", "slime.loop_steps"),  # the start-up check; the loop's steps
    ("slime.loop",),
    # programs: the command line, the quickstart, the environment report, the GPU check, test tooling
    (
        "slime.train_cli",
        "slime.cli",
        "slime.quickstart",
        "slime.env_report",
        "slime.backends.*.gpu_check",
        "slime.testing",
    ),
)


@dataclass(frozen=True)
class Arrow:
    source: str  # module
    target: str  # module
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line})"


def modules(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported_names(tree: ast.AST, package: str) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of every import in `tree`; `package`: the package relative imports start from."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            yield base, node.lineno
            yield from ((f"{base}.{alias.name}", node.lineno) for alias in node.names)


def arrows(found: dict[str, Path]) -> list[Arrow]:
    """One arrow per (importing module, imported module), at its first line."""
    first: dict[tuple[str, str], int] = {}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        wanted = list(_imported_names(ast.parse(path.read_text(), filename=str(path)), package))
        for dotted, line in wanted:
            if dotted not in found or dotted == name:
                continue
            # `from slime.a import b` yields both slime.a and slime.a.b: keep the module b when it is one
            if any(other.startswith(dotted + ".") and other in found and ln == line for other, ln in wanted):
                continue
            first.setdefault((name, dotted), line)
    return [Arrow(source, target, line) for (source, target), line in sorted(first.items())]


def circles(found: dict[str, Path], edges: list[Arrow]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted, in name order."""
    graph: dict[str, list[str]] = {name: [] for name in found}
    for arrow in edges:
        graph[arrow.source].append(arrow.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for name in sorted(graph):
            if name not in index:
                visit(name)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(components)


def folder(found: dict[str, Path], name: str) -> Path:
    return found[name].parent


def top_folder(found: dict[str, Path], name: str, root: Path = PACKAGE_ROOT) -> str:
    """The top-level folder of the package at `root` a module sits in ("" for a module at the package's top)."""
    relative = found[name].relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else ""


def _within(name: str, room_name: str) -> bool:
    """Whether the module `name` is the room `room_name` or inside it (`*`: any one part)."""
    parts, pattern = name.split("."), room_name.split(".")
    if len(pattern) == 1:  # the package's own room holds its __init__ alone
        return name == room_name
    return len(parts) >= len(pattern) and all(p in ("*", q) for p, q in zip(pattern, parts))


def room(name: str) -> str:
    """The room of a module: the longest name in FLOORS that is the module or a package above it."""
    rooms = [r for floor in FLOORS for r in floor if _within(name, r)]
    if not rooms:
        raise KeyError(f"{name}: in no room of slime.testing.import_structure.FLOORS (add it to a floor)")
    return max(rooms, key=len)


def floor_of(room_name: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if room_name in floor)


def back_arrows(edges: list[Arrow]) -> list[Arrow]:
    """The arrows from a room to a room on a higher floor."""
    return [a for a in edges if floor_of(room(a.target)) > floor_of(room(a.source))]


@dataclass
class Report:
    rooms: int
    modules: int
    arrows: int
    circles: list[list[str]]  # every circle
    cross_folder_circles: list[list[str]]  # circles whose modules sit in more than one folder
    cross_top_folder_circles: list[list[str]]  # ... in more than one top-level folder of slime/ (or its top)
    back_arrows: list[Arrow]
    edges: list[Arrow]  # every arrow

    def summary(self) -> str:
        pairs = {(room(a.source), room(a.target)) for a in self.back_arrows}
        return (
            f"{self.rooms} rooms, {self.modules} modules, {self.arrows} arrows; circles: {len(self.circles)} "
            f"({len(self.cross_folder_circles)} across folders, {len(self.cross_top_folder_circles)} across "
            f"top-level folders); back-arrows: {len(self.back_arrows)} module imports between {len(pairs)} room pairs"
        )


def measure(root: Path = PACKAGE_ROOT) -> Report:
    found = modules(root)
    edges = arrows(found)
    every = circles(found, edges)
    return Report(
        rooms=len({room(name) for name in found}),
        modules=len(found),
        arrows=len(edges),
        circles=every,
        cross_folder_circles=[c for c in every if len({folder(found, m) for m in c}) > 1],
        cross_top_folder_circles=[c for c in every if len({top_folder(found, m, root) for m in c}) > 1],
        back_arrows=back_arrows(edges),
        edges=edges,
    )


def main() -> None:
    report = measure()
    print(report.summary())
    for circle in report.cross_folder_circles:
        print("circle across folders:", " <-> ".join(circle))
    for arrow in report.back_arrows:
        print(f"back-arrow {room(arrow.source)} (floor {floor_of(room(arrow.source))}) -> {room(arrow.target)} "
              f"(floor {floor_of(room(arrow.target))}): {arrow}")  # fmt: skip


if __name__ == "__main__":
    main()
