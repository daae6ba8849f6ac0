"""The ``medvae`` command line: parse arguments, call one function, turn user errors into one line.

Heavy imports (torch, MONAI, wandb) happen inside the commands so ``medvae --help`` is instant.

The error boundary (``_run``): every known family of input error - a bad value, a missing or
unreadable file, a damaged safetensors/NIfTI/DICOM/YAML file, a MONAI transform error (unwrapped
to its cause), an allocation that does not fit - ends as one line
``medvae <command>: error: <path>: <problem>`` and exit status 1. ``medvae --debug <command>`` (or
MEDVAE_DEBUG=1) shows the full traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click



def _known_errors() -> tuple[type[BaseException], ...]:
    """Exception families a user can fix (bad file, bad value, bad config), imported lazily."""
    import zlib

    families: list[type[BaseException]] = [ValueError, OSError, EOFError, MemoryError, zlib.error]
    for module, name in (("safetensors", "SafetensorError"), ("nibabel.spatialimages", "HeaderDataError"),
                         ("nibabel.filebasedimages", "ImageFileError"), ("pydicom.errors", "InvalidDicomError"),
                         ("pydicom.errors", "BytesLengthException"), ("yaml", "YAMLError"),
                         ("omegaconf.errors", "OmegaConfBaseException")):
        loaded = sys.modules.get(module)  # only families whose library is in use can have been raised
        if loaded is not None and hasattr(loaded, name):
            families.append(getattr(loaded, name))
    return tuple(families)


def _unwrap(err: BaseException) -> BaseException:
    """MONAI re-raises a transform's error as ``RuntimeError("applying transform ...")``: take its cause."""
    while isinstance(err, RuntimeError) and "applying transform" in str(err) and err.__cause__ is not None:
        err = err.__cause__
    return err


def one_line(err: BaseException) -> str:
    """``<path>: <problem>`` on one line for a known error family."""
    name = type(err).__name__
    if isinstance(err, MemoryError):
        text = f"out of memory ({err})" if str(err) else "out of memory"
    elif isinstance(err, OSError) and getattr(err, "filename", None) and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    elif name in ("YAMLError", "ScannerError", "ParserError", "ConstructorError", "ComposerError") or (
            "yaml" in type(err).__module__):
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.name}: line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(err, "problem", None) or str(err)
        text = f"{where}: not valid YAML for medvae ({problem})"
    elif name == "SafetensorError":
        text = f"not a readable safetensors file ({err})"
    elif name in ("HeaderDataError", "ImageFileError"):
        text = f"not a readable NIfTI image ({err})"
    elif name in ("InvalidDicomError", "BytesLengthException"):
        text = f"not a readable DICOM file ({err})"
    elif name == "error" and type(err).__module__ == "zlib" or isinstance(err, EOFError):
        text = f"damaged compressed data ({err})"
    else:
        text = str(err) or name
    return " ".join(text.split())


def _debug() -> bool:
    context = click.get_current_context(silent=True)
    root = context.find_root() if context is not None else None
    return bool(os.environ.get("MEDVAE_DEBUG")) or bool(root is not None and (root.obj or {}).get("debug"))


def _job(module: str, issue: int):
    """Import a job module, or exit non-zero saying the command has not landed yet."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            raise
        command = click.get_current_context().info_name
        click.echo(f"medvae {command}: not available yet (tracked in issue #{issue})", err=True)
        sys.exit(2)


def close_process_group() -> None:
    """Destroy the torch.distributed group a job opened (embed, train-prior under ``accelerate launch``).

    Left open, gloo's worker threads are still running when the interpreter exits and a rank can
    abort with "terminate called without an active exception" after its work is done (seen once in
    CI on a 2-rank embed; pytorch/pytorch#190489). A job's known errors are raised by every rank
    together (embed gathers them first), so the group is closed on that path too.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _run(func, *args, **kwargs):
    """Call ``func``; a known error family becomes one line on stderr and exit status 1."""
    command = click.get_current_context().info_name
    try:
        result = func(*args, **kwargs)
    except Exception as raised:
        err = _unwrap(raised)
        if _debug() or not isinstance(err, _known_errors()):
            raise  # a bug: no teardown that could wait on a rank stuck in a collective
        click.echo(f"medvae {command}: error: {one_line(err)}", err=True)
        close_process_group()
        sys.exit(1)
    close_process_group()
    return result


def _split_config_args(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]`` -> (config path or None, overrides)."""
    config_path = None
    overrides = list(args)
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    stray = [a for a in overrides if "=" not in a]
    if stray:
        raise click.UsageError(f"expected key=value overrides after the config file, got {stray[0]!r}")
    return config_path, overrides


def _memory_option(func):
    """--memory-gb for the inference commands (generate, embed, reconstruct, evaluate)."""
    return click.option("--memory-gb", "memory_gb", default=None, type=click.FloatRange(min=0, min_open=True),
                        help="Memory budget of encode/decode in GiB (default: 80% of free memory).")(func)


def _bytes(memory_gb: float | None) -> int | None:
    return None if memory_gb is None else int(memory_gb * 2**30)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medvae3d", prog_name="medvae")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also: MEDVAE_DEBUG=1).")
@click.pass_context
def cli(context: click.Context, debug: bool) -> None:
    """medvae: train and use 3D VAEs on CT and MRI volumes without the KL blowing up."""
    context.obj = {"debug": debug}


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(args: tuple[str, ...]) -> None:
    """Train a VAE: medvae train [CONFIG.yaml] [key=value ...].

    Works the same under `accelerate launch [options] -m medvae train ...`.
    """
    config_path, overrides = _split_config_args(args)
    job = _job("medvae.train", 4)
    _run(job.train_from_cli, config_path, overrides)


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="Export or run folder.")
@click.option("--num", default=1, show_default=True, type=click.IntRange(min=1), help="Number of scans.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--shape", nargs=3, type=int, default=None, help="Output size D H W in voxels (multiple of the downsampling factor).")
@click.option("--prior", type=click.Choice(["standard", "fitted", "diffusion"]), default="fitted", show_default=True)
@click.option("--format", "out_format", type=click.Choice(["nifti", "dicom"]), default="nifti", show_default=True)
@click.option("--prior-dir", default=None, type=click.Path(path_type=Path),
              help="Diffusion prior folder (default: <model>/prior, where train-prior writes).")
@click.option("--sampler", type=click.Choice(["rflow", "ddpm", "ddim"]), default=None,
              help="Diffusion sampler (default: the prior's).")
@click.option("--sampling-steps", default=None, type=click.IntRange(min=1), help="Diffusion sampling steps.")
@click.option("--guidance", default=None, type=float, help="Classifier-free guidance weight (1: none).")
@click.option("--condition", "conditions", multiple=True, help="key=value, e.g. modality=CT or spacing=2.0.")
@_memory_option
def generate(model_dir, num, out_dir, seed, temperature, shape, prior, out_format, prior_dir, sampler,
             sampling_steps, guidance, conditions, memory_gb) -> None:
    """Decode latent samples into synthetic scans in real units (HU for CT)."""
    job = _job("medvae.jobs.generate", 5)
    diffusion = {"prior_dir": prior_dir, "sampler": sampler, "sampling_steps": sampling_steps,
                 "guidance": guidance, "conditions": list(conditions)}
    _run(job.generate, model_dir=model_dir, num=num, out_dir=out_dir, seed=seed, temperature=temperature,
         shape=shape, prior=prior, out_format=out_format, memory_budget=_bytes(memory_gb),
         diffusion=diffusion if prior == "diffusion" else None)


@cli.command("train-prior", context_settings={"ignore_unknown_options": True})
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="The VAE: run or export folder.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_prior(model_dir, args: tuple[str, ...]) -> None:
    """Train a latent diffusion prior: medvae train-prior --model RUN [CONFIG.yaml] [key=value ...].

    Works the same under `accelerate launch [options] -m medvae train-prior ...`.
    """
    config_path, overrides = _split_config_args(args)
    job = _job("medvae.prior.training", 12)
    _run(job.train_prior_from_cli, str(model_dir), config_path, overrides)


@cli.command("evaluate-samples")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="The VAE (feature space).")
@click.option("--samples", "samples", required=True, multiple=True, help="Synthetic volumes: folder, glob or datalist.")
@click.option("--train", "train", required=True, multiple=True, help="The training volumes (copy check, reference).")
@click.option("--heldout", "heldout", multiple=True, help="Held-out real volumes: reference and copy-check floor.")
@click.option("--pool", default=2, show_default=True, type=click.IntRange(min=1), help="Latent pooling grid per axis.")
@click.option("--json", "json_file", default=None, type=click.Path(path_type=Path))
@_memory_option
def evaluate_samples(model_dir, samples, train, heldout, pool, json_file, memory_gb) -> None:
    """Fréchet distance, MMD, intensity, foreground and texture (noise) distances, and the copy check of synthetic scans."""
    job = _job("medvae.jobs.evaluate_samples", 12)
    _run(job.evaluate_samples, model_dir=model_dir, samples=list(samples), train=list(train),
         heldout=list(heldout), pool=pool, json_file=json_file, memory_budget=_bytes(memory_gb))


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path), help=".parquet, .npz or .csv")
@click.option("--sample", is_flag=True, help="Sample the posterior instead of using its mean.")
@click.option("--spatial-pool", default=None, type=int, help="Also pool to an N^3 grid per channel.")
@click.option("--latents-dir", default=None, type=click.Path(path_type=Path), help="Write each latent grid as NIfTI here.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--scatter", default=None, type=click.Path(path_type=Path), help="Write a PCA scatter PNG here.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --sample (with each volume's id).")
@_memory_option
@click.argument("inputs", nargs=-1, required=True)
def embed(model_dir, out_file, sample, spatial_pool, latents_dir, batch_size, scatter, seed, memory_gb, inputs) -> None:
    """Write deterministic embeddings (posterior means) of volumes."""
    job = _job("medvae.jobs.embed", 5)
    _run(job.embed, model_dir=model_dir, out_file=out_file, inputs=list(inputs), sample=sample,
         spatial_pool=spatial_pool, latents_dir=latents_dir, batch_size=batch_size, scatter=scatter, seed=seed,
         memory_budget=_bytes(memory_gb))


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@_memory_option
@click.argument("inputs", nargs=-1, required=True)
def reconstruct(model_dir, out_dir, memory_gb, inputs) -> None:
    """Write reconstructions in the original units and geometry."""
    job = _job("medvae.jobs.reconstruct", 5)
    _run(job.reconstruct, model_dir=model_dir, out_dir=out_dir, inputs=list(inputs), memory_budget=_bytes(memory_gb))


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--json", "json_file", default=None, type=click.Path(path_type=Path))
@_memory_option
@click.argument("inputs", nargs=-1, required=True)
def evaluate(model_dir, json_file, memory_gb, inputs) -> None:
    """PSNR, SSIM, MS-SSIM (and MAE in HU for CT), per volume and aggregated."""
    job = _job("medvae.jobs.evaluate", 5)
    _run(job.evaluate, model_dir=model_dir, inputs=list(inputs), json_file=json_file, memory_budget=_bytes(memory_gb))


@cli.command()
@click.option("--config", "config_path", default=None, type=click.Path(path_type=Path),
              help="Config whose preprocessing to describe (default: built-in defaults).")
@click.option("--modality", type=click.Choice(["CT", "MR"]), default=None, help="Override the modality.")
@click.option("--series", default=None, help="SeriesInstanceUID to pick from a DICOM folder holding several.")
@click.option("--frame", default=None, type=int, help="Frame to pick from a 4D volume.")
@click.argument("inputs", nargs=-1, required=True)
def inspect(config_path, modality, series, frame, inputs) -> None:
    """Shape, spacing, orientation, modality, intensities, and what preprocessing will do."""
    job = _job("medvae.jobs.inspect", 3)
    _run(job.inspect, inputs=list(inputs), config_path=config_path, modality=modality, series=series, frame=frame)


def main() -> None:
    cli(prog_name="medvae")


if __name__ == "__main__":
    main()
