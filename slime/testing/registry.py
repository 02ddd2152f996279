"""Collect registrations from test files with `ast`, strictly.

Suite names encode stage and hardware:  base-{a,b,c}-test-<target>  and  nightly-<kind>-<target>.
The hardware of a suite is read from its last word (see `suite_hardware`), so a registration that
puts a GPU suite under register_cpu_ci is caught at collection time.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from slime.testing.ci_register import ALLOWED_KEYWORDS, REGISTER_FUNCTIONS

SUITE_PATTERN = re.compile(r"^(base-[abc]-test|nightly-[a-z0-9]+)-[a-z0-9-]+$")


class RegistrationError(ValueError):
    """A registration problem; the message starts with file:line."""


@dataclass(frozen=True)
class Registration:
    path: str  # relative to the scanned root's parent (e.g. test/registered/foo/test_x.py)
    line: int
    hw: str
    suite: str
    est_time: float
    nightly: bool = False
    disabled: str | None = None


def suite_hardware(suite: str) -> str | None:
    """The hardware a suite name targets, from its last word: cpu, tpu, amd/rocm -> rocm, gpu/cuda -> cuda."""
    last = suite.rsplit("-", 1)[-1]
    return {"cpu": "cpu", "tpu": "tpu", "amd": "rocm", "rocm": "rocm", "gpu": "cuda", "cuda": "cuda"}.get(last)


def suite_stage(suite: str) -> str:
    """'A', 'B', 'C' for base-{a,b,c}-... suites, 'nightly' for nightly-... suites."""
    if suite.startswith("nightly-"):
        return "nightly"
    match = re.match(r"^base-([abc])-", suite)
    if not match:
        raise ValueError(f"suite {suite!r} does not follow base-{{a,b,c}}-test-<target> or nightly-<kind>-<target>")
    return match.group(1).upper()


# A suite named base-<stage>-test-<stack>-stack-<hardware> runs in that stack's own environment, e.g.
# base-c-test-tpu-stack-cpu: the TPU stack (Python 3.12, JAX, sglang-jax) on the CPU; the runner starts its files
# with that environment's interpreter.
STACK_PATTERN = re.compile(r"-test-([a-z0-9]+)-stack-[a-z0-9]+$")


def suite_stack(suite: str) -> str:
    """The software stack a suite's files run in: "default", or the name of a hardware stack ("tpu")."""
    match = STACK_PATTERN.search(suite)
    return match.group(1) if match else "default"


def _literal(node: ast.expr, where: str, key: str) -> object:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise RegistrationError(f"{where}: {key}= must be a literal, got `{ast.unparse(node)}`") from None


def _call_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def parse_registrations(path: Path, display: str | None = None) -> list[Registration]:
    """All registrations in one file. Raises RegistrationError naming file:line on any problem."""
    display = display or str(path)
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=display)
    except SyntaxError as exc:
        raise RegistrationError(f"{display}:{exc.lineno}: syntax error: {exc.msg}") from None
    found: list[Registration] = []
    for node in tree.body:  # top level only: a call inside a function would never be seen by the runner
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
            continue
        call = node.value
        name = _call_name(call)
        if name not in REGISTER_FUNCTIONS:
            continue
        where = f"{display}:{node.lineno}"
        hw = REGISTER_FUNCTIONS[name]
        if call.args:
            raise RegistrationError(f"{where}: {name} takes keyword arguments only")
        kwargs: dict[str, object] = {}
        for kw in call.keywords:
            if kw.arg is None:
                raise RegistrationError(f"{where}: {name}(**...) is not allowed; write the keywords out")
            if kw.arg not in ALLOWED_KEYWORDS:
                raise RegistrationError(
                    f"{where}: unknown keyword {kw.arg!r} for {name}; allowed: {', '.join(ALLOWED_KEYWORDS)}"
                )
            kwargs[kw.arg] = _literal(kw.value, where, kw.arg)
        for required in ("est_time", "suite"):
            if required not in kwargs:
                raise RegistrationError(f"{where}: {name} needs {required}=")
        est_time, suite = kwargs["est_time"], kwargs["suite"]
        if isinstance(est_time, bool) or not isinstance(est_time, (int, float)) or est_time <= 0:
            raise RegistrationError(f"{where}: est_time= must be a positive number of seconds, got {est_time!r}")
        if not isinstance(suite, str) or not SUITE_PATTERN.match(suite):
            raise RegistrationError(
                f"{where}: suite {suite!r} must look like base-{{a,b,c}}-test-<target> or nightly-<kind>-<target>"
            )
        suite_hw = suite_hardware(suite)
        if suite_hw != hw:
            raise RegistrationError(
                f"{where}: suite {suite!r} targets {suite_hw or 'unknown hardware'}, but is registered with {name}"
            )
        nightly = kwargs.get("nightly", False)
        if not isinstance(nightly, bool):
            raise RegistrationError(f"{where}: nightly= must be True or False")
        if nightly != suite.startswith("nightly-"):
            raise RegistrationError(f"{where}: nightly={nightly} does not match suite {suite!r}")
        disabled = kwargs.get("disabled")
        if disabled is not None and (not isinstance(disabled, str) or not disabled.strip()):
            raise RegistrationError(f"{where}: disabled= must be a non-empty reason string")
        found.append(Registration(display, node.lineno, hw, suite, float(est_time), nightly, disabled))
    return found


def collect(root: Path, base: Path | None = None) -> list[Registration]:
    """Every registration under `root` (recursively, test_*.py). A file with none is an error."""
    base = base or root.parent
    registrations: list[Registration] = []
    for path in sorted(root.rglob("test_*.py")):
        display = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
        found = parse_registrations(path, display)
        if not found:
            raise RegistrationError(
                f"{display}:1: no register_*_ci(...) call; every registered test declares its suite"
            )
        registrations.extend(found)
    return registrations


def select(registrations: list[Registration], hw: str, suites: list[str], nightly: bool) -> list[Registration]:
    """The registrations of `suites` on `hw`. Unknown suite -> ValueError listing the known ones."""
    known = sorted({r.suite for r in registrations if r.hw == hw})
    unknown = [s for s in suites if s not in known]
    if unknown:
        listing = ", ".join(known) if known else "(none registered)"
        raise ValueError(f"unknown suite {', '.join(unknown)} for --hw {hw}; known suites: {listing}")
    return [r for r in registrations if r.hw == hw and r.suite in suites and (nightly or not r.nightly)]
