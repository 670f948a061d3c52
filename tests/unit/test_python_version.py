"""The oldest Python the project declares (pyproject.toml's requires-python) is one its code runs on: vermin finds the
newest standard-library module, member, keyword argument or syntax the sources use, and none may need a newer Python.
Ruff's target, the Dockerfile's Python images and README's requirement name the same minimum."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import vermin

from tests.helpers import REPO
from tests.unit.test_dockerfile import base_images

SOURCES = ("cogvx_dist", "data_prep", "benchmarks", "tests")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# The python3 each Ubuntu release ships (packages.ubuntu.com, python3-defaults): what the runtime image's venv gets.
UBUNTU_PYTHON3 = {"20.04": (3, 8), "22.04": (3, 10), "24.04": (3, 12), "25.04": (3, 13)}


def declared() -> tuple[int, int]:
    """(3, N) from requires-python = ">=3.N"."""
    spec = PYPROJECT["project"]["requires-python"]
    match = re.fullmatch(r">=\s*3\.(\d+)", spec.strip())
    assert match, f"requires-python {spec!r}: this test reads only the form '>=3.N'"
    return 3, int(match[1])


def needed(files: list[Path]) -> dict[str, tuple[int, int] | None]:
    """Each file's minimum Python 3 per vermin (None: vermin finds it cannot run on any Python 3). A line marked
    `# novermin` (code behind a version check) is left out, as vermin's own command line does."""
    config = vermin.Config()
    result = {}
    for path in files:
        mins = vermin.detect(path.read_text(), config, str(path))
        result[str(path.relative_to(REPO))] = tuple(mins[1]) if mins[1] else mins[1]
    return result


def test_no_source_needs_a_newer_python_than_declared():
    minimum = declared()
    # vermin knows what the sources rely on, so a silent miss would not pass for "runs anywhere".
    assert tuple(vermin.detect("import tomllib\n", vermin.Config())[1]) == (3, 11)
    files = sorted(p for root in SOURCES for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 50, files
    versions = needed(files)
    too_new = {path: v for path, v in versions.items() if v is None or (v != 0 and v > minimum)}
    assert too_new == {}, f"requires-python is >={minimum[0]}.{minimum[1]}, but these files need (vermin): {too_new}"


def test_ruff_targets_the_declared_minimum():
    major, minor = declared()
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py{major}{minor}"


def test_the_image_builds_on_the_declared_minimum_and_runs_a_python_that_meets_it():
    """The wheel stage is the python:3.N image of the declared minimum; the runtime's venv is made by the CUDA
    base's python3 (Ubuntu's), which must not be older (an ubuntu22.04 CUDA base would give 3.10)."""
    minimum = declared()
    images = base_images()
    python_images = [image for image in images if image.startswith("python:")]
    assert python_images, images
    for image in python_images:
        assert re.match(rf"python:{minimum[0]}\.{minimum[1]}(-|$)", image), image
    ubuntu = [re.search(r"ubuntu(\d\d\.\d\d)", image) for image in images if not image.startswith("python:")]
    assert ubuntu and all(ubuntu), f"a runtime base other than Ubuntu: say here which python3 it has ({images})"
    for release in (m[1] for m in ubuntu):
        assert release in UBUNTU_PYTHON3, f"Ubuntu {release}: add its python3 version to UBUNTU_PYTHON3"
        assert UBUNTU_PYTHON3[release] >= minimum, f"Ubuntu {release}'s python3 is older than requires-python"


def test_the_readme_asks_for_the_declared_minimum():
    major, minor = declared()
    readme = (REPO / "README.md").read_text()
    assert f"Python {major}.{minor}+" in readme
    assert set(re.findall(r"Python (\d+\.\d+)\+", readme)) == {f"{major}.{minor}"}
