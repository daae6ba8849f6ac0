import subprocess
import sys

SUBCOMMANDS = ["train", "generate", "embed", "reconstruct", "evaluate", "inspect"]


def _medvae(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "medvae", *args], capture_output=True, text=True, **kwargs)


def test_help_lists_the_six_subcommands():
    result = _medvae("--help")
    assert result.returncode == 0
    commands = result.stdout.split("Commands:")[1]
    for name in SUBCOMMANDS:
        assert f"\n  {name} " in commands


def test_help_does_not_import_heavy_libraries():
    code = "import sys; from medvae.cli import cli; print(sorted(m for m in ('torch','monai','wandb','accelerate') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


def test_bad_override_is_one_line_and_nonzero(tmp_path):
    result = _medvae("train", "train.lrr=3", cwd=tmp_path)
    assert result.returncode != 0
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "train.lrr" in err
