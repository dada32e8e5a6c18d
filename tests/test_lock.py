"""The environment is the lock: `.venv` holds exactly requirements-lock.txt's packages at its
versions, the lock satisfies every range pyproject.toml names, and the runtime subset the Docker
image installs pins the same versions. A pyproject.toml edited without `make lock`, or a venv that
drifted (a package upgraded or added by hand), fails here rather than on a newcomer's machine."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-lock.txt"
RUNTIME = ROOT / "requirements-runtime.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Installed by `python -m venv` itself, not by the lock; edge is the project, installed editable.
BOOTSTRAP = {"pip", "edge"}


def pins(path: Path) -> dict[str, tuple[str, str]]:
    """name -> (version, marker) for each entry of a uv-compiled requirements file that applies to
    this interpreter and platform."""
    out: dict[str, tuple[str, str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, _hashes = line.partition(" --hash")
        requirement, _, marker = spec.partition(";")
        name, _, version = requirement.strip().partition("==")
        assert version, f"{path.name}: {line[:60]!r} is not pinned with =="
        assert "--hash=sha256:" in line, f"{path.name}: {name} has no hash"
        if not marker.strip() or Marker(marker.strip()).evaluate():
            out[canonicalize_name(name)] = (version, marker.strip())
    return out


def installed() -> dict[str, str]:
    return {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions(path=sys.path)
    }


def declared() -> list[Requirement]:
    project = PYPROJECT["project"]
    names = [*project["dependencies"], *PYPROJECT["build-system"]["requires"]]
    for extra in project["optional-dependencies"].values():
        names += extra
    return [Requirement(n) for n in names]


def test_the_venv_holds_exactly_the_locked_versions() -> None:
    if sys.prefix == sys.base_prefix:
        pytest.fail("the tests run in .venv (make test), whose packages the lock defines")
    locked = {name: version for name, (version, _) in pins(LOCK).items()}
    have = installed()
    wrong = {n: (have.get(n), v) for n, v in locked.items() if have.get(n) != v}
    assert not wrong, f"installed versions differ from the lock (installed, locked): {wrong}"
    extra = sorted(set(have) - set(locked) - BOOTSTRAP)
    assert not extra, f"installed but not in the lock: {extra} (make rebuilds .venv from it)"


def test_the_lock_satisfies_every_range_in_pyproject() -> None:
    locked = pins(LOCK)
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in the lock: run `make lock`"
        version = locked[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"the lock has {name}=={version}, outside {requirement}: run `make lock`"
        )


def test_the_runtime_subset_pins_the_same_versions_as_the_lock() -> None:
    locked, runtime = pins(LOCK), pins(RUNTIME)
    for requirement in PYPROJECT["project"]["dependencies"]:
        assert canonicalize_name(Requirement(requirement).name) in runtime, requirement
    different = {n: (v, locked.get(n, ("-",))[0]) for n, (v, _) in runtime.items()
                 if locked.get(n, ("",))[0] != v}  # fmt: skip
    assert not different, f"requirements-runtime.txt differs from the lock: {different}"
    test_only = {"pytest", "openai", "anthropic", "locust", "mypy", "uv"}
    assert not test_only & set(runtime), "the image's subset holds test or build tools"
