"""environment.yml (conda, Binder, JupyterHub) and pyproject.toml (./kit, pip) describe one environment.

pyproject.toml is the source of truth: its ``dependencies`` plus the ``test`` extra. environment.yml must
list the same packages, and every version it allows must be one pyproject.toml allows too (it may pin
tighter, as it does for torch). The checks run on the files as text, so they need no conda.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml  # PyYAML comes with JupyterLab (jupyter_server -> jupyter_events)
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CONDA_ONLY = {"python", "pip"}  # the interpreter and installer, not packages of lora_lab


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _environment():
    return yaml.safe_load((REPO / "environment.yml").read_text(encoding="utf-8"))


def _pip_lines(env) -> list[str]:
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml should have exactly one pip: section"
    return [str(line).strip() for line in sections[0]]


def _conda_specs(env) -> dict[str, str]:
    """Conda-style ``name=1.2`` / ``name>=1.2`` strings, by canonical name."""
    specs = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            name = re.split(r"[=<>!~ ]", dep, maxsplit=1)[0]
            specs[canonicalize_name(name)] = dep[len(name):].strip()
    return specs


def _requirements(lines) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs}


def _pyproject_requirements() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    return _requirements(project["dependencies"] + project["optional-dependencies"]["test"])


def _environment_requirements() -> dict[str, Requirement]:
    lines = [line for line in _pip_lines(_environment()) if not line.startswith("-")]  # options, -e .
    pip = _requirements(lines)
    conda = {name: Requirement(f"{name}{spec.replace('=', '==') if re.fullmatch(r'=[^=].*', spec) else spec}")
             for name, spec in _conda_specs(_environment()).items() if name not in CONDA_ONLY}
    overlap = pip.keys() & conda.keys()
    assert not overlap, f"listed both as conda and pip packages in environment.yml: {sorted(overlap)}"
    return pip | conda


def _probe_versions(*specs: SpecifierSet) -> list[Version]:
    """Every version named in the specifiers, its neighbours in the last release digit, 0 and a huge one:
    where two version ranges differ, one of these points tells them apart."""
    probes = {Version("0"), Version("9999")}
    for spec in specs:
        for s in spec:
            v = Version(s.version.replace(".*", ""))
            *head, last = v.release
            probes.update({v, Version(".".join(map(str, [*head, last + 1])))})
            if last > 0:
                probes.add(Version(".".join(map(str, [*head, last - 1]))))
    return sorted(probes)


def test_environment_lists_exactly_the_pyproject_packages():
    ours, theirs = _pyproject_requirements().keys(), _environment_requirements().keys()
    assert sorted(ours - theirs) == [], "in pyproject.toml (dependencies + test extra) but not in environment.yml"
    assert sorted(theirs - ours) == [], "in environment.yml but not in pyproject.toml"


@pytest.mark.parametrize("name", sorted(_pyproject_requirements()))
def test_environment_versions_are_allowed_by_pyproject(name):
    wanted = _pyproject_requirements()[name].specifier
    env = _environment_requirements().get(name)
    if env is None:
        pytest.fail(f"{name} is missing from environment.yml")
    probes = _probe_versions(wanted, env.specifier)
    outside = [str(v) for v in probes if env.specifier.contains(v, prereleases=True)
               and not wanted.contains(v, prereleases=True)]
    assert outside == [], f"environment.yml allows {name} {outside}, which pyproject.toml ({wanted}) excludes"


def test_environment_python_satisfies_requires_python():
    python = _conda_specs(_environment())["python"].lstrip("=")
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert Version(python) in requires, f"environment.yml's python={python} is outside requires-python {requires}"


def test_environment_torch_pin_matches_kit():
    # ./kit installs torch itself (CPU or CUDA build); conda/Binder must get the same version.
    kit_version = re.search(r'^TORCH_VERSION="([^"]+)"', (REPO / "kit").read_text(), re.M).group(1)
    torch = _environment_requirements()["torch"]
    assert str(torch.specifier) == f"=={kit_version}"


def test_environment_installs_the_package_itself():
    # repo2docker (Binder, JupyterHub images) sees the local requirement and installs after copying the repo,
    # so `import lora_lab` works in the notebooks.
    assert "-e ." in _pip_lines(_environment())
