"""The pinned stack of each hardware: requirements/constraints-<hw>.txt, one `name==version` a line.

Stdlib only: the image jobs read the pins on a bare runner before anything is installed. The extras in
pyproject.toml, the Dockerfiles' build args (release/images.py) and `python -m release resolve` follow these
files; test/registered/release/test_install_agreement.py fails when any of them disagree.
"""

from __future__ import annotations

import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements"
PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")


def canonical(name: str) -> str:
    """PEP 503 name normalization (what pip compares)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints_file(hardware: str, requirements: Path = REQUIREMENTS) -> Path:
    return requirements / f"constraints-{hardware}.txt"


def read_pins(path: Path) -> dict[str, str]:
    """Canonical name -> pinned version. Anything but `name==version`, a comment or a blank line is refused."""
    pins = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN_LINE.match(line)
        if not match:
            raise ValueError(f"{path}:{number}: a constraints line pins one exact version (name==X), got {line!r}")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def hardware_pins(hardware: str, requirements: Path = REQUIREMENTS) -> dict[str, str]:
    return read_pins(constraints_file(hardware, requirements))
