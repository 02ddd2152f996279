"""Which failures are worth retrying.

Retrying hides bugs, so the default is no: only a failed accuracy/performance threshold (noise on a
shared machine) or a known infrastructure hiccup may be retried. Code errors, crashes and timeouts never.
"""

from __future__ import annotations

import enum
import re


class FailureKind(str, enum.Enum):
    CODE_ERROR = "code_error"  # never retried
    CRASH = "crash"  # killed by a signal, OOM, segfault: never retried
    TIMEOUT = "timeout"  # never retried: a hang does not get better
    THRESHOLD = "threshold"  # accuracy/perf assertion: retryable
    INFRA = "infra"  # port clash, connection reset during startup: retryable
    UNKNOWN = "unknown"  # not retried


RETRYABLE = frozenset({FailureKind.THRESHOLD, FailureKind.INFRA})

_CODE_ERRORS = re.compile(
    r"\b(SyntaxError|IndentationError|ImportError|ModuleNotFoundError|NameError|TypeError|AttributeError|"
    r"KeyError|IndexError|UnboundLocalError|NotImplementedError|RecursionError|ZeroDivisionError)\b"
)
_CRASHES = re.compile(
    r"(out of memory|OutOfMemoryError|MemoryError|Segmentation fault|SIGSEGV|core dumped|Fatal Python error|"
    r"Killed|bus error)",
    re.IGNORECASE,
)
_THRESHOLD = re.compile(
    r"AssertionError.*\b(accuracy|throughput|tokens?/s|latency|speedup|perf(ormance)?|threshold|baseline)\b",
    re.IGNORECASE,
)
_INFRA = re.compile(r"(Address already in use|ConnectionResetError|Connection reset by peer|Temporary failure)")


def classify_failure(output: str, returncode: int | None, timed_out: bool) -> FailureKind:
    """Classify a failed test file from its combined output and exit status."""
    if timed_out:
        return FailureKind.TIMEOUT
    if returncode is not None and returncode < 0:  # killed by a signal
        return FailureKind.CRASH
    if returncode in (134, 137, 139):  # shells report signals as 128 + n
        return FailureKind.CRASH
    if _CRASHES.search(output):
        return FailureKind.CRASH
    if _CODE_ERRORS.search(output):
        return FailureKind.CODE_ERROR
    if _THRESHOLD.search(output):
        return FailureKind.THRESHOLD
    if _INFRA.search(output):
        return FailureKind.INFRA
    return FailureKind.UNKNOWN


def should_retry(kind: FailureKind, attempt: int, max_attempts: int) -> bool:
    return kind in RETRYABLE and attempt < max_attempts
