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


# ---- the error boundary: each known family becomes one line, exit 1; bugs keep their traceback ----

import pytest  # noqa: E402


def _raising(error_factory):
    import click

    from medvae import cli as cli_module

    @click.group()
    @click.option("--debug", is_flag=True)
    @click.pass_context
    def group(context, debug):
        context.obj = {"debug": debug}

    @group.command()
    def job():
        def fail():
            raise error_factory()
        cli_module._run(fail)

    return group


def _families():
    import zlib

    import monai.transforms
    import nibabel.filebasedimages
    import nibabel.spatialimages
    import omegaconf
    import pydicom.errors
    import safetensors
    import yaml

    def monai_wrapped():
        def boom(_):
            raise ValueError("/data/scan.nii.gz: inner problem")
        try:
            monai.transforms.Compose([monai.transforms.Lambdad("image", boom)])({"image": 1})
        except RuntimeError as err:
            return err

    def yaml_error():
        try:
            yaml.safe_load(open(__file__.replace("test_cli.py", "conftest.py")).read() + "\n: [")
        except yaml.YAMLError as err:
            return err

    def omegaconf_error():
        try:
            omegaconf.OmegaConf.structured({"a": 1}).b  # noqa: B018
        except omegaconf.errors.OmegaConfBaseException as err:
            return err

    return {
        "SafetensorError": (lambda: safetensors.SafetensorError("header too large"), "safetensors"),
        "HeaderDataError": (lambda: nibabel.spatialimages.HeaderDataError("data code 1234"), "NIfTI"),
        "ImageFileError": (lambda: nibabel.filebasedimages.ImageFileError("cannot work out type"), "NIfTI"),
        "InvalidDicomError": (lambda: pydicom.errors.InvalidDicomError("no DICM"), "DICOM"),
        "YAMLError": (yaml_error, "YAML"),
        "OmegaConf": (omegaconf_error, "b"),
        "MONAI wrapped": (monai_wrapped, "/data/scan.nii.gz: inner problem"),
        "OSError with a file": (lambda: PermissionError(13, "Permission denied", "/data/locked.nii"),
                                "/data/locked.nii: Permission denied"),
        "MemoryError": (lambda: MemoryError(), "out of memory"),
        "zlib": (lambda: zlib.error("invalid stored block lengths"), "damaged compressed data"),
        "EOFError": (lambda: EOFError("ended early"), "damaged compressed data"),
        "ValueError": (lambda: ValueError("/x.nii: bad\nvalue"), "/x.nii: bad value"),
    }


@pytest.mark.parametrize("family", sorted(_families()))
def test_each_known_error_family_is_one_line_and_exit_1(family, monkeypatch):
    from click.testing import CliRunner

    monkeypatch.delenv("MEDVAE_DEBUG", raising=False)
    factory, needle = _families()[family]
    result = CliRunner().invoke(_raising(factory), ["job"])
    assert result.exit_code == 1, (family, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("medvae job: error: ") and needle in lines[0], lines


def test_debug_flag_and_env_keep_the_traceback(monkeypatch):
    from click.testing import CliRunner

    monkeypatch.delenv("MEDVAE_DEBUG", raising=False)
    factory = lambda: ValueError("/x.nii: bad")  # noqa: E731
    result = CliRunner().invoke(_raising(factory), ["--debug", "job"])
    assert isinstance(result.exception, ValueError)
    monkeypatch.setenv("MEDVAE_DEBUG", "1")
    assert isinstance(CliRunner().invoke(_raising(factory), ["job"]).exception, ValueError)


def test_a_bug_is_not_disguised_as_a_user_error(monkeypatch):
    from click.testing import CliRunner

    monkeypatch.delenv("MEDVAE_DEBUG", raising=False)
    result = CliRunner().invoke(_raising(lambda: TypeError("internal bug")), ["job"])
    assert isinstance(result.exception, TypeError)


@pytest.mark.parametrize("outcome", ["success", "known error"])
def test_a_job_s_process_group_is_closed_before_exit(outcome, tmp_path, monkeypatch):
    """Left open, gloo's threads can abort a rank at interpreter exit (pytorch/pytorch#190489)."""
    import click
    import torch.distributed as dist
    from click.testing import CliRunner

    from medvae import cli as cli_module

    monkeypatch.delenv("MEDVAE_DEBUG", raising=False)
    seen = {}

    def job_body():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        seen["open"] = dist.is_initialized()
        if outcome == "known error":
            raise ValueError("/x.nii: bad")

    @click.group()
    def group():
        pass

    @group.command()
    def job():
        cli_module._run(job_body)

    try:
        result = CliRunner().invoke(group, ["job"])
        assert result.exit_code == (0 if outcome == "success" else 1), result.exception
        assert seen["open"] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
