"""A user's plugin that fails at run time, named: the exception a plugin raised, or a value it returned that its
contract forbids (a reward that is not a finite number), becomes a `PluginFailure` whose one line names the
plugin (flag and dotted path), what went wrong, the sample (index, group, head of the prompt) and the rollout.

`slime train` prints the plugin's own traceback (it is the user's code) and then that line, and exits 1. The
failure crosses Ray intact (it pickles with its parts), and a rollout id is added where the rollout is known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

PROMPT_HEAD = 40  # characters of a prompt shown in the line
SLIME_DIR = str(Path(__file__).resolve().parent) + os.sep


@dataclasses.dataclass(eq=False)  # compared and hashed by identity, as exceptions are
class PluginFailure(Exception):
    plugin: str  # "--custom-rm-path my_pkg.rewards.score"
    problem: str  # "raised ValueError: reward service returned 503", "returned nan, not a finite number"
    where: str = ""  # "sample 5 of group 1, prompt '12+3='"
    rollout: str = ""  # "rollout 0", "evaluation set test"
    hint: str = ""  # what the user can do about it
    user_traceback: str = ""  # the plugin's own traceback, printed above the line

    def __post_init__(self):
        super().__init__(self.line())

    def __str__(self) -> str:
        return self.line()

    def line(self) -> str:
        context = ", ".join(part for part in (self.where, self.rollout) if part)
        return (
            f"{self.plugin} {self.problem}"
            + (f" ({context})" if context else "")
            + (f"; {self.hint}" if self.hint else "")
        )

    def __reduce__(self):  # crosses process boundaries (Ray) with its parts
        return (type(self), dataclasses.astuple(self))

    def in_rollout(self, rollout: str) -> PluginFailure:
        return self if self.rollout else dataclasses.replace(self, rollout=rollout)


def plugin_name(flag: str, fn: Callable) -> str:
    """The flag and the dotted path it named (module and qualified name of the loaded function)."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{flag} {module}.{name}" if module and name else f"{flag} {fn!r}"


def _prompt_head(prompt: Any) -> str:
    if isinstance(prompt, list):  # chat messages: the last one's content
        prompt = prompt[-1].get("content", "") if prompt and isinstance(prompt[-1], dict) else str(prompt)
    text = str(prompt)
    return repr(text if len(text) <= PROMPT_HEAD else text[:PROMPT_HEAD] + "...")


def describe_samples(samples: Sequence[Any]) -> str:
    """'sample 5 of group 1, prompt ...' for one sample; 'group 1 (samples 4-7), prompt ...' for a group."""
    if not samples:
        return ""
    first = samples[0]
    prompt = f"prompt {_prompt_head(first.prompt)}"
    if len(samples) == 1:
        return f"sample {first.index} of group {first.group_index}, {prompt}"
    indices = [s.index for s in samples if s.index is not None]
    span = f" (samples {min(indices)}-{max(indices)})" if indices else ""
    return f"group {first.group_index}{span}, {prompt}"


def failure_from(
    error: BaseException, plugin: str, samples: Sequence[Any] = (), user_code: bool = True
) -> PluginFailure:
    """The failure for an exception a plugin raised; its traceback starts at the plugin's own frame."""
    message = str(error).strip().splitlines()
    problem = f"raised {type(error).__name__}" + (f": {message[0]}" if message else "")
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename.startswith(SLIME_DIR):
        tb = tb.tb_next  # slime's frames that called the plugin: the traceback starts at the plugin's own
    shown = "".join(traceback.format_exception(type(error), error, tb)) if user_code else ""
    return PluginFailure(plugin, problem, describe_samples(samples), user_traceback=shown)


@contextlib.contextmanager
def plugin_call(
    plugin: str, samples: Sequence[Any] = (), passthrough: tuple[type[BaseException], ...] = (), user_code: bool = True
) -> Iterator[None]:
    """Around one call of a plugin (`plugin`: its flag and dotted path, see plugin_name): an exception from it
    becomes a PluginFailure naming it and `samples`. `passthrough`: exceptions slime itself handles (an engine
    gone: retried); `user_code` False for built-in functions behind a flag (their traceback is slime's)."""
    from slime.errors import UserError

    try:
        yield
    except (PluginFailure, UserError, *passthrough):
        raise
    except Exception as error:
        raise failure_from(error, plugin, samples, user_code) from None


@contextlib.contextmanager
def naming_rollout(rollout: str) -> Iterator[None]:
    """A PluginFailure passing through is told which rollout (or evaluation) it ended."""
    try:
        yield
    except PluginFailure as failure:
        raise failure.in_rollout(rollout) from None


def plugin_failure_in(error: BaseException) -> PluginFailure | None:
    """The PluginFailure behind `error`: itself or what a Ray wrapper (or a `raise ... from`) carries."""
    from slime.errors import error_in

    return error_in(error, PluginFailure)
