"""What users install is what was tested: uv.lock and the installed packages hold the versions that the GPU rows
and GPU tests ran on (pyproject.toml's [tool.tinyvlm.gpu-tested], the one place that names them)."""
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TESTED = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["tinyvlm"]["gpu-tested"]
PACKAGES = [name for name in TESTED if name != "machine"]


def locked_versions(name):
    """Every version uv.lock holds of a package (one per Python range where resolutions split)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {p["version"] for p in lock["package"] if p["name"] == name}


@pytest.mark.parametrize("name", PACKAGES)
def test_the_lock_holds_the_gpu_tested_version(name):
    assert locked_versions(name) == {TESTED[name]}, (
        f"uv.lock resolves {name} {sorted(locked_versions(name))}, but the GPU rows and GPU tests ran on "
        f"{TESTED[name]}: bound it in pyproject.toml's dependencies, or run the GPU suite on the new version and "
        "update [tool.tinyvlm.gpu-tested]")


@pytest.mark.parametrize("name", PACKAGES)
def test_the_installed_version_is_the_gpu_tested_one(name):
    assert version(name).split("+")[0] == TESTED[name], "run `uv sync`: the environment is not the locked one"
