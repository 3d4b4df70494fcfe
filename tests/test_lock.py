"""The lock files pin every dependency and extra of pyproject.toml inside its range, and the install commands
use them: a fresh machine installs exactly what CI tested (constraints/refresh.sh writes them)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints"
REFRESH = CONSTRAINTS / "refresh.sh"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)$")


def lock_extras() -> dict[str, list[str]]:
    """The extras each lock is resolved with, as refresh.sh states them (EXTRAS_MAIN=..., EXTRAS_IPEX=...)."""
    found = re.findall(r"^EXTRAS_([A-Z]+)=(\S+)$", REFRESH.read_text(), flags=re.MULTILINE)
    return {name.lower(): extras.split(",") for name, extras in found}


LOCKS = lock_extras()


def read_pins(text: str) -> dict[str, Version]:
    """One `name==version` per line besides comments; any other line, or a name twice, is an error."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            raise ValueError(f"line {number}: {line!r} is not an exact pin `name==version`")
        name = canonicalize_name(match["name"])
        if name in pins:
            raise ValueError(f"line {number}: {match['name']} is pinned twice")
        try:
            pins[name] = Version(match["version"])
        except InvalidVersion as error:
            raise ValueError(f"line {number}: {error}") from None
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(project: dict, extras: list[str]) -> list[Requirement]:
    """The base dependencies and those of the given extras that apply on this interpreter."""
    wanted = [(Requirement(spec), "") for spec in project["dependencies"]]
    wanted += [
        (Requirement(spec), extra) for extra in extras for spec in project["optional-dependencies"][extra]
    ]
    return [req for req, extra in wanted if req.marker is None or req.marker.evaluate({"extra": extra})]


def lock_problems(pins: dict[str, Version], wanted: list[Requirement]) -> list[str]:
    """Each requirement that the pins leave out or pin outside its range, in words."""
    problems = []
    for req in wanted:
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req} is not pinned")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req} but the lock pins {pinned}")
    return problems


def test_refresh_script_locks_every_extra():
    assert set(LOCKS) == {"main", "ipex"}
    every_extra = set(pyproject()["optional-dependencies"])
    assert set(LOCKS["ipex"]) == every_extra, "the IPEX environment holds every extra"
    assert set(LOCKS["main"]) == every_extra - {"ipex"}, "the main environment holds every extra but ipex"


@pytest.mark.parametrize("lock", ["main", "ipex"])
def test_lock_pins_every_requirement_inside_its_range(lock: str):
    pins = read_pins((CONSTRAINTS / f"{lock}.txt").read_text())
    problems = lock_problems(pins, requirements(pyproject(), LOCKS[lock]))
    assert not problems, f"constraints/{lock}.txt is stale; run `bash constraints/refresh.sh`: " + "; ".join(
        problems
    )


def test_locks_keep_their_environments_apart():
    """The point of two locks: torch 2.13 in the main environment, IPEX's torch 2.8 and an importable
    transformers in its own."""
    main, ipex = (read_pins((CONSTRAINTS / f"{lock}.txt").read_text()) for lock in ("main", "ipex"))
    assert "intel-extension-for-pytorch" not in main
    assert main["torch"].release[:2] > (2, 8) and ipex["torch"].release[:2] == (2, 8)
    assert ipex["transformers"] < Version("5.24")


def test_lock_check_finds_a_missing_or_out_of_range_pin():
    project = {
        "dependencies": ["optuna>=5.0,<6", "numpy>=1.26"],
        "optional-dependencies": {
            "dev": ["mlflow>=3.13", "tomli>=2; python_version < '3.0'"],
            "gpu": ["cupy"],
        },
    }
    wanted = requirements(project, ["dev"])
    assert [req.name for req in wanted] == ["optuna", "numpy", "mlflow"]  # not tomli (marker), nor gpu
    pins = read_pins("# header\noptuna==4.9.0\nnumpy==2.0.0\n")
    assert lock_problems(pins, wanted) == [
        "optuna<6,>=5.0 but the lock pins 4.9.0",
        "mlflow>=3.13 is not pinned",
    ]


@pytest.mark.parametrize(
    "text, error",
    [
        ("torch>=2.8\n", "not an exact pin"),
        ("torch==2.8.0\nTorch==2.8.0\n", "pinned twice"),
        ("a==not.a.version\n", "Invalid version"),
    ],
)
def test_lock_files_hold_exact_pins_only(text: str, error: str):
    with pytest.raises(ValueError, match=error):
        read_pins(text)


@pytest.mark.parametrize("path", ["README.md", ".ci/run"])
def test_install_commands_use_the_locks(path: str):
    text = (ROOT / path).read_text()
    installs = [line for line in text.splitlines() if re.search(r"\bpip install\b", line) and "-e " in line]
    assert installs, f"{path} has no `pip install -e` command"
    for line in installs:
        assert re.search(r"-c constraints/(main|ipex)\.txt\b", line), (
            f"{path}: {line.strip()!r} installs unlocked"
        )
    assert "-c constraints/main.txt" in text and "-c constraints/ipex.txt" in text


@pytest.mark.skipif(
    "FASTCPU_LOCK" not in os.environ,
    reason="FASTCPU_LOCK=main|ipex names the lock this environment was installed from (.ci/run sets it)",
)
def test_this_environment_is_exactly_its_lock():
    """What CI tests is what the lock says, no more and no less (fastcpu itself and pip aside)."""
    lock = os.environ["FASTCPU_LOCK"]
    pins = read_pins((CONSTRAINTS / f"{lock}.txt").read_text())
    # Only what pip installed here: setuptools puts its vendored packages on sys.path once imported.
    site_packages = list(dict.fromkeys(sysconfig.get_path(name) for name in ("purelib", "platlib")))
    installed = {
        canonicalize_name(dist.metadata["Name"]): Version(dist.version).public
        for dist in importlib.metadata.distributions(path=site_packages)
    }
    for own in ("fastcpu", "pip"):
        installed.pop(own, None)
    assert installed == {name: str(version) for name, version in pins.items()}
