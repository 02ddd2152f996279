"""User mistakes, as types: the CLI turns any `UserError` into one line on stderr and exit code 2.

A worker (trainer, rollout manager, engine) raises these as well; Ray hands them back wrapped, and
`user_error_in` finds the original by type. Anything that is not a `UserError` is a bug in slime and keeps
its traceback. Each subtype says what the user has to look at:

    FlagError       a flag or a combination of flags (the message names the flag(s))
    DataError       a data file, usually one row of it (`file`, `line`; the message starts with file[:line])
    ModelError      the model folder given to --hf-checkpoint (config, weights, tokenizer, family, shapes)
    MissingPackage  a package to install (the message says which, and how)
"""

from __future__ import annotations

from typing import TypeVar


class UserError(ValueError):
    """A mistake in what the user gave slime; its message is one line that says what to change."""


class FlagError(UserError):
    """A flag, or a combination of flags, that cannot work; the message names the flag(s) and the numbers."""


class DataError(UserError):
    """A malformed data file or row; the message starts with `file[:line]`."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None):
        super().__init__(message)
        self.file = file
        self.line = line

    def __reduce__(self):  # crosses process boundaries (Ray) with its location
        return (type(self), (str(self), self.file, self.line))


class ModelError(UserError):
    """The model folder cannot be used as given: the message names the folder and what is wrong."""


class MissingPackage(UserError):
    """An optional package the run needs is not installed; the message says what to install."""


class RunFault(RuntimeError):
    """Not a mistake of the user's and not a bug: the run lost something it cannot go on without (a trainer's
    host). Its message is one line that names what was lost and where to resume from; the CLI exits 4."""


class TrainerLost(RunFault):
    """A trainer rank's process is gone (its host went down, or it was killed)."""


_MAX_WRAPPERS = 8
E = TypeVar("E", bound=BaseException)


def unwrap(error: BaseException) -> BaseException:
    """The exception a Ray worker raised, out of Ray's wrappers: RayTaskError carries it as `.cause`
    (Ray's `as_instanceof_cause` copy is also an instance of the original type, but its message is Ray's)."""
    for _ in range(_MAX_WRAPPERS):
        cause = error.__dict__.get("cause") if hasattr(error, "__dict__") else None
        if isinstance(cause, BaseException):
            error = cause
            continue
        break
    return error


def error_in(error: BaseException, kind: type[E]) -> E | None:
    """The `kind` error behind `error`: itself, what a Ray wrapper carries (its message is Ray's, so the original
    is taken, never the wrapper), or what an explicit `raise ... from` chained to it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        inner = unwrap(current)
        if isinstance(inner, kind):
            return inner
        current = inner.__cause__
    return None


def user_error_in(error: BaseException) -> UserError | None:
    return error_in(error, UserError)


def one_line(error: BaseException) -> str:
    """The first line of an error's message (user errors are written as one line; this guards the rest)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
