"""`slime env`: what hardware is here, which backend would run, what is installed, which extras are met."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement

from slime import DISTRIBUTION, __version__
from slime.backends import BackendUnavailable, SystemView, backend_names, get_backend_class, select_backend
from slime.backends.pinned_source import pinned_source_verdict

# Distributions whose versions matter when reading a bug report.
REPORTED_PACKAGES = (
    "torch",
    "megatron-core",
    "transformers",
    "sglang",
    "sglang-router",
    "sglang-jax",
    "jax",
    "optax",
    "ray",
    "triton",
    "deep_ep",
)


# A Python newer than any supported one: a requirement whose marker holds there but not here is left out only
# because this Python is too old for it.
_NEWER_PYTHON = {"python_version": "3.99", "python_full_version": "3.99.0"}


def _requirement_problem(req: Requirement, system: SystemView) -> str | None:
    installed = system.dist_version(req.name)
    if installed is None:
        return f"{req.name} not installed"
    if req.specifier and not req.specifier.contains(installed, prereleases=True):
        return f"{req.name} {installed} does not satisfy {req.specifier}"
    return None


def extras_status(
    system: SystemView, requires: list[str] | None = None, base_env: dict[str, str] | None = None
) -> dict[str, dict[str, object]]:
    """For each extra of the installed slime (or of `requires`): satisfied or the requirements that are missing /
    too old, and the ones its markers leave out on this Python (`base_env`: the marker environment)."""
    if requires is None:
        try:
            requires = importlib.metadata.requires(DISTRIBUTION) or []
        except importlib.metadata.PackageNotFoundError:
            return {}
    status: dict[str, dict[str, object]] = {}
    too_old: dict[str, list[str]] = {}
    active: dict[str, set[str]] = {}  # names that apply on this Python (a newer Python may pin them differently)
    base_env = base_env or default_environment()
    includes: dict[str, set[str]] = {}  # an extra made of our own extras (a hardware's = its stack + its runtime)
    # <hardware>-stack: a hardware's stack without its accelerator runtime (CI runs it on a CPU)
    stack_extras = [f"{name}-stack" for name in backend_names()]
    for line in requires:
        req = Requirement(line)
        if req.marker is None or "extra" not in str(req.marker):
            continue
        for extra in ("cpu", *backend_names(), *stack_extras, "test", "release"):
            here = dict(base_env, extra=extra)
            if req.name == DISTRIBUTION and req.marker.evaluate(here):
                includes.setdefault(extra, set()).update(req.extras)
            elif req.marker.evaluate(here):
                active.setdefault(extra, set()).add(req.name)
                entry = status.setdefault(extra, {"satisfied": True, "problems": []})
                problem = _requirement_problem(req, system)
                if problem:
                    entry["problems"].append(problem)
            elif req.marker.evaluate(dict(here, **_NEWER_PYTHON)):
                status.setdefault(extra, {"satisfied": True, "problems": []})
                too_old.setdefault(extra, []).append(req.name)
    for extra, inner in includes.items():
        for name in inner:
            active.setdefault(extra, set()).update(active.get(name, set()))
            known = too_old.setdefault(extra, [])
            known.extend(n for n in too_old.get(name, []) if n not in known)
            entry = status.setdefault(extra, {"satisfied": True, "problems": []})
            entry["problems"].extend(status.get(name, {}).get("problems", []))
    for extra, names in too_old.items():
        names = [n for n in names if n not in active.get(extra, set())]
        if names:
            python = base_env["python_version"]
            status[extra]["problems"].insert(
                0, f"Python {python} is too old for this stack ({', '.join(names)} left out)"
            )
    for entry in status.values():
        entry["satisfied"] = not entry["problems"]
    return dict(sorted(status.items()))


def pinned_sources_status(system: SystemView) -> list[dict[str, object]]:
    """Each backend's packages that run from a known-good commit: what is installed, and whether it is that one."""
    entries = []
    for name in backend_names():
        for source in get_backend_class(name).pinned_sources:
            verdict = pinned_source_verdict(
                source, system.dist_version(source.dist), system.dist_direct_url(source.dist)
            )
            entries.append(
                {
                    "backend": name,
                    "package": source.dist,
                    "version": verdict.version,
                    "known_good_commit": source.commit,
                    "known_good": verdict.known_good,
                    "summary": verdict.summary,
                    "install": source.install_command,
                }
            )
    return entries


def collect_report(hardware: str = "auto", system: SystemView | None = None) -> dict[str, object]:
    system = system or SystemView.real()
    backends = []
    for name in backend_names():
        backend = get_backend_class(name)(system)
        probe = backend.probe()
        backends.append(
            {
                "name": name,
                "available": probe.available,
                "reason": probe.reason,
                "devices": probe.devices,
                "missing": list(probe.missing),
                "optional_missing": [{"package": r.dist, "note": r.note} for r in backend.missing_optional()],
                **backend.describe(),
            }
        )
    try:
        selected = select_backend(hardware, system).name
        selection_error = ""
    except BackendUnavailable as exc:
        selected, selection_error = None, str(exc)
    return {
        "slime": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "requested": hardware,
        "selected": selected,
        "selection_error": selection_error,
        "backends": backends,
        "packages": {name: system.dist_version(name) for name in REPORTED_PACKAGES},
        "pinned_sources": pinned_sources_status(system),
        "extras": extras_status(system),
    }


def format_report(report: dict[str, object]) -> str:
    lines = [f"slime {report['slime']}  python {report['python']}  {report['platform']}"]
    if report["selected"]:
        lines.append(f"hardware: {report['selected']} (requested {report['requested']})")
    else:
        lines.append(f"hardware: none usable: {report['selection_error']}")
    lines.append("backends:")
    for b in report["backends"]:
        state = f"available ({b['devices']} devices)" if b["available"] else f"unavailable: {b['reason']}"
        lines.append(f"  {b['name']:<5} {state}")
        if b["available"]:
            lines.append(
                f"        engine={b['rollout_engine']} kernels={b['kernel_impl']} dist={b['dist_backend']} "
                f"moe={b['moe_dispatcher']} trainers={','.join(b['capabilities']['trainer_families'])}"
            )
        for opt in b["optional_missing"]:
            if b["available"]:
                lines.append(f"        optional {opt['package']} absent{': ' + opt['note'] if opt['note'] else ''}")
    lines.append("packages:")
    pinned = {entry["package"]: entry["summary"] for entry in report.get("pinned_sources", [])}
    for name, version in report["packages"].items():
        lines.append(f"  {name:<14} {version or '-'}" + (f"  {pinned[name]}" if name in pinned else ""))
    if report["extras"]:
        lines.append("extras:")
        width = max(8, *map(len, report["extras"]))
        for extra, entry in report["extras"].items():
            state = "satisfied" if entry["satisfied"] else "; ".join(entry["problems"])
            lines.append(f"  {extra:<{width}} {state}")
    return "\n".join(lines)


def main(hardware: str, as_json: bool) -> int:
    report = collect_report(hardware)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0 if report["selected"] else 1
