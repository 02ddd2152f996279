"""slime's imports keep their floors (slime.testing.import_structure): no circle ties two top-level folders together,
no circle spans folders except the backend registry, the imports from a lower floor up are exactly the known ones
(each with what removes it), and the parts below the run config never import it."""

from pathlib import Path

import pytest

from slime.testing import import_structure as structure
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=3, suite="base-a-test-cpu")

# Circles across folders that may stay, by their first module: why.
ALLOWED_CROSS_FOLDER_CIRCLES = {
    "slime.backends.base": "the backend registry imports its own implementations (backends/<hardware>/), which "
    "subclass its Backend",
}

# Imports from a lower floor up that are left, (importing module, imported module): what removes them.
KNOWN_BACK_ARROWS = {
    ("slime.models.lora", "slime.config_lora"): "the HF module names LoRA can target are declared once, beside the "
    "--lora-* flags (config_lora must not import torch, which models/ does)",
    ("slime.ray.actors", "slime.config"): "start_actors takes the whole Config: the loop should hand it the parts' "
    "settings (slime.settings) instead",
    ("slime.ray.actors", "slime.settings"): "start_actors builds the parts' settings itself: the loop should",
    ("slime.ray.rollout_manager", "slime.config"): "the rollout manager takes the whole Config (issue 32, item 2)",
    ("slime.ray.rollout_manager", "slime.plugins"): "the rollout manager loads the user's plugins from the Config",
}

# Rooms that take the settings of their own part, never the run config.
BELOW_THE_CONFIG = ("slime.backends", "slime.training", "slime.rollout", "slime.ray")
KNOWN_CONFIG_READERS = {"slime.ray.actors", "slime.ray.rollout_manager"}  # the back-arrows above


@pytest.fixture(scope="module")
def report() -> structure.Report:
    return structure.measure()


def test_every_module_has_a_room(report):
    assert report.modules > 100
    assert report.rooms == len({structure.room(name) for name in structure.modules()})


def test_no_circle_across_top_level_folders(report):
    assert report.cross_top_folder_circles == [], "\n".join(" <-> ".join(c) for c in report.cross_top_folder_circles)


def test_no_circle_across_folders_but_the_backend_registry(report):
    unexpected = [c for c in report.cross_folder_circles if c[0] not in ALLOWED_CROSS_FOLDER_CIRCLES]
    assert unexpected == [], "circles across folders:\n" + "\n".join(" <-> ".join(c) for c in unexpected)


def test_back_arrows_are_exactly_the_known_ones(report):
    found = {(a.source, a.target): a for a in report.back_arrows}
    new = [str(found[pair]) for pair in sorted(set(found) - set(KNOWN_BACK_ARROWS))]
    gone = sorted(set(KNOWN_BACK_ARROWS) - set(found))
    assert not new, "imports from a lower floor up (slime.testing.import_structure.FLOORS):\n" + "\n".join(new)
    assert not gone, f"gone (good): remove them from KNOWN_BACK_ARROWS: {gone}"
    assert len(found) <= 6


def test_the_parts_below_the_config_never_import_it(report):
    readers = {
        a.source for a in report.edges if a.target == "slime.config" and structure.room(a.source) in BELOW_THE_CONFIG
    }
    assert readers == KNOWN_CONFIG_READERS, sorted(readers)


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_circles_and_back_arrows_are_found_in_a_made_up_package(tmp_path):
    """Top-level, lazy, relative and `from package import module` imports all count."""
    root = tmp_path / "slime"
    write(root, "__init__.py", "")
    write(root, "errors.py", "")
    write(root, "ray/actors.py", "from slime.training import worker\n")
    write(root, "training/__init__.py", "")
    write(root, "training/worker.py", "from . import config\n\ndef f():\n    from slime.ray import actors\n")
    write(root, "training/config.py", "import slime.errors\n")
    found = structure.modules(root)
    assert sorted(found) == [
        "slime",
        "slime.errors",
        "slime.ray.actors",
        "slime.training",
        "slime.training.config",
        "slime.training.worker",
    ]
    made_up = structure.measure(root)
    assert made_up.arrows == 4
    assert made_up.cross_top_folder_circles == [["slime.ray.actors", "slime.training.worker"]]
    assert [(a.source, a.target, a.line) for a in made_up.back_arrows] == [
        ("slime.training.worker", "slime.ray.actors", 4)
    ]
