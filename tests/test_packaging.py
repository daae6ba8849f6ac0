"""The README's two set-up commands are what CI runs, and installing never pulls a CUDA torch."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    setup = ROOT.joinpath("README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    for command in commands:
        assert "\n" not in command
        # torch first, pinned to the CPU wheel on disk, before the package
        assert command.index("pip install torch==2.13.0") < command.index("pip install -e")
    assert "medvae train" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert _readme_commands()[1] in ci


def test_torch_requirement_admits_the_local_cpu_wheel():
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    torch_reqs = [r for r in project["dependencies"] if re.match(r"torch\b", r)]
    assert len(torch_reqs) == 1
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(torch_reqs[0][len("torch"):])
    assert "2.13.0" in spec
    assert project["name"] != "medvae", "the PyPI name medvae belongs to an unrelated project"


def test_installed_torch_is_the_cpu_build():
    import torch

    assert torch.version.cuda is None or torch.cuda.is_available()
    out = subprocess.run([sys.executable, "-m", "pip", "list"], capture_output=True, text=True).stdout
    assert "nvidia-cudnn" not in out and "nvidia-cublas" not in out
