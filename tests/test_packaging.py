"""What the package declares: minimum safe versions that this environment meets, and README commands that exist."""

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    requirements = [
        Requirement(r)
        for r in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    ]
    return {r.name.lower(): r for r in requirements}


def test_the_safety_minimums_are_declared():
    """N4: pyproject.toml declares the minimum safe versions."""
    requirements = declared()
    floors = {
        "torch": "2.6",
        "pillow": "11.0",
        "python-multipart": "0.0.18",
        "starlette": "0.40",
        "fastapi": "0.115",
        "safetensors": "0.4",
    }
    for name, floor in floors.items():
        assert name in requirements, f"{name} is not declared"
        assert not requirements[name].specifier.contains(_below(floor)), f"{name} allows versions below {floor}"
    assert requirements["ray"].specifier == Requirement("ray==2.60.*").specifier  # token auth on by default


def _below(floor: str) -> str:
    """A version just under ``floor`` (2.6 -> 2.5.999)."""
    parts = [int(p) for p in floor.split(".")]
    return (
        ".".join(map(str, parts[:-1] + [parts[-1] - 1, 999]))
        if parts[-1]
        else ".".join(map(str, parts[:-2] + [parts[-2] - 1, 999]))
    )


def test_the_installed_versions_meet_what_is_declared():
    """N4: the installed versions meet what pyproject.toml declares."""
    for name, requirement in declared().items():
        try:
            installed = version(name)
        except PackageNotFoundError:  # an extra that is not installed here
            continue
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{name} {installed} does not meet {requirement}"
        )


def readme_commands() -> dict[str, set[str]]:
    """Return each `python -m MODULE` and `python bench/NAME.py` the README shows, with every flag it shows them
    with."""
    readme = (ROOT / "README.md").read_text()
    commands: dict[str, set[str]] = {}
    for match in re.finditer(r"python (-m [\w.]+|bench/[\w<>]+\.py)([^`\n|]*)", readme):
        target, rest = match.group(1), match.group(2)
        if "<" in target:
            continue
        commands.setdefault(target, set()).update(re.findall(r"(--[a-z][a-z0-9-]*)", rest))
    return commands


def test_every_readme_command_and_flag_exists():
    """Every command the README shows answers --help, and every flag it shows it with is one of its flags."""
    commands = readme_commands()
    assert {"-m tune.search", "-m polycolor.train", "-m polycolor.serve", "-m polycolor.predict"} <= set(commands)
    for target, flags in commands.items():
        argv = [sys.executable, *target.split()] if target.startswith("-m") else [sys.executable, str(ROOT / target)]
        done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, (target, done.stderr[-1000:])
        missing = [flag for flag in flags if flag not in done.stdout]
        assert not missing, (target, missing)
