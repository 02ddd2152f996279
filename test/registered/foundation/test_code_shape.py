"""Code stays readable in one sitting: no function in slime/, release/, benchmarks/ or the suite runner longer than
a screen (80 lines), no source file longer than 600 lines. Split along jobs rather than raising the limits."""

import ast
from pathlib import Path

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=3, suite="base-a-test-cpu")

REPO = Path(__file__).resolve().parents[3]
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600


def sources() -> list[Path]:
    files = [path for folder in ("slime", "release", "benchmarks") for path in sorted((REPO / folder).rglob("*.py"))]
    return [*files, REPO / "test" / "run_suite.py"]


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_sources_are_found():
    assert len(sources()) > 50


def test_no_function_longer_than_a_screen():
    offenders = [line for path in sources() for line in long_functions(path)]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_no_source_file_longer_than_600_lines():
    offenders = [
        f"{p.relative_to(REPO)} ({n} lines)"
        for p in sources()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not offenders, "files over 600 lines:\n" + "\n".join(offenders)
