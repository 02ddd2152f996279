"""The valid range of a numeric flag. Each range is declared once, beside its flag (`opt(..., valid=...)` in
slime/config.py); the start-up check refuses a value outside it with one line naming the flag, the value and
the range, and `--help` prints it after the flag's help text.

A float is in a range only when it is finite as well: `--lr nan` or `--lr inf` is refused like `--lr -1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is outside
    high_open: bool = False
    special: tuple[tuple[float, str], ...] = ()  # values allowed outside [low, high], with what they mean

    def __contains__(self, value: float) -> bool:
        if any(value == allowed for allowed, _ in self.special):
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = (
                f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = "a finite number"
        return " or ".join([*(f"{_num(v)} ({meaning})" for v, meaning in self.special), text])


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float) -> Range:
    return Range(low=low, low_open=True)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Range:
    return Range(low, high, low_open, high_open)


FINITE = Range()  # any finite number (a float flag with no natural bound: nan and inf are still refused)
POS = at_least(1)  # counts, sizes, lengths, intervals

# Megatron-core fields passed through as flags (slime.config), with the range slime holds them to; megatron's own
# checks cover the rest.
MEGATRON_RANGES: dict[str, Range] = {
    "hidden_dropout": between(0, 1, high_open=True),
    "attention_dropout": between(0, 1, high_open=True),
    "adam_eps": above(0),
    "expert_model_parallel_size": POS,
}


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def describe(flag: str, value: float, valid: Range) -> str | None:
    """The one line for a value outside its range, or None when it is inside."""
    return None if value in valid else f"{flag} must be {valid}, got {_num(value)}"
