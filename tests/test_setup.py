"""The project's own set-up files agree with each other."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ." in pip_section, "environment.yml's pip section must install the package itself"
    pip_section = set(pip_section) - {"-e ."}
    assert pip_section == wanted, f"only in environment.yml: {pip_section - wanted}; only in pyproject: {wanted - pip_section}"


def test_torch_is_pinned_to_the_local_cpu_build():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps
    assert not any(_name(d) == "torchvision" for d in deps)


def test_ci_runs_make_test_and_nothing_else():
    lines = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[-1].strip() == "make test"
    assert not any(ln.strip().startswith(("pytest", "python", "pip")) for ln in lines)


def test_the_default_tier_hides_a_gpu_from_itself_and_the_processes_it_starts():
    """tests/conftest.py: the selection CI runs checks the CPU path on any machine (`make test-gpu`
    runs the tests marked `gpu`)."""
    if os.environ.get("HPE_TEST_CUDA") == "1":
        pytest.skip("HPE_TEST_CUDA=1 keeps the GPU visible to the default tier")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "False"
