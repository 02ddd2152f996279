"""Answer extraction and normalisation for math-style rewards (pure functions)."""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = ("degrees", "degree", "cm", "meters", "meter", "units", "unit", "dollars", "inches", "feet", "mph", "\\%", "%")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces handled."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        # "\\boxed 5" form
        match = re.match(r"\\boxed\s+([^\s$]+)", text[start:])
        return match.group(1) if match else None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None


def final_answer(text: str) -> str | None:
    """The answer a response commits to: \\boxed{} first, then 'answer is X' / 'Answer: X', then '#### X'."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (
        r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.|$)",
        r"Answer:\s*\$?([^\n$]+?)\$?\s*$",
        r"####\s*([^\n]+)",
    ):
        matches = re.findall(pattern, text, flags=re.IGNORECASE | re.MULTILINE)
        if matches:
            return matches[-1].strip()
    return None


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(mathrm|textbf|mathbf)\{([^}]*)\}", r"\2", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("^\\circ", "").replace("^{\\circ}", "")
    return s.strip()


def normalize_answer(answer: str) -> str:
    """Canonical string form: wrappers, units, spaces, trailing dots and thousands separators removed;
    numbers and simple fractions rendered canonically so 0.5, 1/2 and \\frac{1}{2} agree."""
    s = _strip_wrappers(answer)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    for unit in _UNITS:
        if s.endswith(unit):
            s = s[: -len(unit)].strip()
    s = s.rstrip(".").replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    frac = re.fullmatch(r"(-?)\\frac\{?(-?\d+)\}?\{?(\d+)\}?", s) or re.fullmatch(r"(-?)(-?\d+)/(\d+)", s)
    try:
        if frac:
            value = Fraction(int(frac.group(2)), int(frac.group(3)))
            value = -value if frac.group(1) else value
            return _render(value)
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            return _render(Fraction(s))
    except (ValueError, ZeroDivisionError):
        return s
    return s


def _render(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def answers_match(predicted: str | None, reference: str | int | float) -> bool:
    if predicted is None:
        return False
    return normalize_answer(predicted) == normalize_answer(str(reference))
