"""A small, deterministic YAML writer for the generated workflows.

Only what workflows need: mappings (insertion order kept), sequences, strings, bools, ints. Strings that YAML
could read as something else are double-quoted; multi-line strings become literal blocks, so `run:` scripts
read in the YAML exactly as they run.
"""

from __future__ import annotations

import json
import re

_PLAIN = re.compile(r"^[A-Za-z0-9_./@$][A-Za-z0-9_ ./@:=,+()*$'-]*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "~", "y", "n"}


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    risky = (
        not _PLAIN.match(text)
        or text.lower() in _RESERVED
        or text.endswith((" ", ":"))
        or ": " in text
        or " #" in text
        or re.fullmatch(r"[0-9.eE+-]+", text) is not None
    )
    return json.dumps(text) if risky else text


def _emit(value: object, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            key_text = _scalar(key) if key != "on" else "on"
            if isinstance(item, (dict, list)) and item:
                out.append(f"{pad}{key_text}:")
                _emit(item, indent + 2, out)
            elif isinstance(item, str) and "\n" in item:
                out.append(f"{pad}{key_text}: |")
                out.extend(f"{pad}  {line}" if line else "" for line in item.rstrip("\n").split("\n"))
            else:
                out.append(f"{pad}{key_text}: {_inline(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                nested: list[str] = []
                _emit(item, indent + 2, nested)
                out.append(f"{pad}- {nested[0].lstrip()}")
                out.extend(nested[1:])
            elif isinstance(item, list) and item:
                out.append(f"{pad}-")
                _emit(item, indent + 2, out)
            else:
                out.append(f"{pad}- {_inline(item)}")
    else:
        out.append(f"{pad}{_inline(value)}")


def _inline(value: object) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return _scalar(value)


def dump(document: dict, header: str = "") -> str:
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    _emit(document, 0, out)
    return "\n".join(out) + "\n"
