"""The copy check of ``medvae generate --prior fitted``: the export keeps the training latents and a
threshold set by held-out volumes; generate flags samples that are near-copies of a training volume."""

import json

import torch

from jobs_helpers import make_export, tiny_model
from phantoms import phantom, write_phantoms
from medvae.export import load_model
from medvae.inference import encode_volume
from medvae.jobs.generate import _copy_checked, generate
from medvae.prior import LatentPrior, fit_prior_to_volumes, load_prior, save_prior
from medvae.prior.gaussian import COPY_REFERENCE_NAME
from medvae.prior.sampling import HELDOUT_SOURCE, LEAVE_ONE_OUT_SOURCE

SHAPE = (16, 16, 16)


def volumes(seeds) -> list[torch.Tensor]:
    """Normalised (1, D, H, W) phantoms, one patient per seed."""
    return [torch.from_numpy(phantom(SHAPE, seed=s, scale=1.0))[None] for s in seeds]


def check_stream(prior: LatentPrior, latents: list[torch.Tensor]) -> dict:
    """What generate records about these latents, through the same streamed check it runs."""
    record: dict = {}
    assert [z for z in _copy_checked(iter(latents), prior, record)] == latents  # passed through unchanged
    return record


def test_an_exact_training_latent_is_flagged_and_a_new_patient_is_not():
    model = tiny_model()
    prior = fit_prior_to_volumes(model, volumes(range(4)), heldout=volumes([5, 6]))
    settings = prior.description["copy_check"]
    assert settings["reference"] == HELDOUT_SOURCE and len(settings["reference_distances"]) == 2
    assert settings["threshold"] == 0.5 * min(settings["reference_distances"]) > 0
    assert prior.copy_reference.shape == (4, *prior.latent_shape)

    with torch.no_grad():
        new_patient = encode_volume(model, volumes([10])[0][None]).mode()[0]
    record = check_stream(prior, [prior.copy_reference[1].clone(), new_patient])
    check = record["copy_check"]
    assert check["checked"] and check["flagged"] == [True, False] and record["flagged_copy_fraction"] == 0.5
    assert check["nearest_training_distance"][0] == 0.0
    assert check["nearest_training_distance"][1] > 2 * check["threshold"]  # a new patient is not near the line

    # Without held-out volumes the threshold comes from leave-one-out distances among the training latents.
    alone = fit_prior_to_volumes(model, volumes(range(4)))
    assert alone.description["copy_check"]["reference"] == LEAVE_ONE_OUT_SOURCE
    assert check_stream(alone, [alone.copy_reference[0].clone()])["copy_check"]["flagged"] == [True]


def test_a_one_patient_prior_at_temperature_zero_reproduces_that_patient_and_is_flagged(tmp_path, capsys):
    export = make_export(tmp_path / "export")
    save_prior(fit_prior_to_volumes(load_model(export), volumes([0]), heldout=volumes([5, 6])), export)
    out = generate(export, 2, tmp_path / "cold", prior="fitted", temperature=0.0)
    record = json.loads((out / "generation.json").read_text())
    assert record["copy_check"]["flagged"] == [True, True] and record["flagged_copy_fraction"] == 1.0
    assert [sample["flagged_copy"] for sample in record["samples"]] == [True, True]
    assert "copy check: 2 of 2 samples flagged" in (line := capsys.readouterr().out)
    assert "do not share as synthetic: sample_000.nii.gz, sample_001.nii.gz" in line


def test_generation_json_of_a_trained_export_records_the_check(tmp_path, capsys):
    """The VAE task's export (real data pipeline, validation split) stores the reference; generate uses it."""
    from medvae.config import load_config
    from medvae.train.vae_task import VAETask
    from training_helpers import TINY_TRAINING

    write_phantoms(tmp_path / "data", count=5, shape=SHAPE, scale=1.0)
    config = load_config(None, TINY_TRAINING + [f"data.train={tmp_path / 'data'}",
                                                f"train.output_dir={tmp_path / 'run'}", "data.val_fraction=0.4"])
    task = VAETask(config)
    task.build_model()
    train_set, val_set = task.build_data(tmp_path / "run")
    assert (len(train_set), len(val_set)) == (3, 2)
    task.export(tiny_model(), tmp_path / "run")  # the same architecture as TINY_TRAINING, weights that carry the input
    export = tmp_path / "run" / "export"
    assert (export / COPY_REFERENCE_NAME).is_file()
    stored = json.loads((export / "config.json").read_text())["extra"]["prior"]["copy_check"]
    assert stored["reference"] == HELDOUT_SOURCE and len(stored["reference_distances"]) == 2
    assert stored["num_reference_volumes"] == 3 and stored["threshold"] > 0

    out = generate(tmp_path / "run", 3, tmp_path / "gen", seed=1, prior="fitted")
    record = json.loads((out / "generation.json").read_text())
    check = record["copy_check"]
    assert check["checked"] and check["threshold"] == stored["threshold"] and check["reference"] == HELDOUT_SOURCE
    assert len(check["flagged"]) == len(check["nearest_training_distance"]) == 3
    assert record["flagged_copy_fraction"] == check["flagged_fraction"] == sum(check["flagged"]) / 3
    assert all(d > 0 for d in check["nearest_training_distance"])
    assert [s["nearest_training_distance"] for s in record["samples"]] == check["nearest_training_distance"]
    assert [s["flagged_copy"] for s in record["samples"]] == check["flagged"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("copy check:")]
    assert len(lines) == 1 and "of 3 samples flagged" in lines[0]


def test_an_export_without_a_copy_reference_still_generates_and_says_so(tmp_path, capsys):
    export = make_export(tmp_path / "old")
    shape = (2, 4, 4, 4)
    # What exports written before the copy check hold: the prior's tensors, a description without copy_check.
    save_prior(LatentPrior(torch.zeros(shape), torch.ones(shape), torch.zeros((0, *shape)), {"kind": "diagonal"}),
               export)
    assert "copy_check" not in json.loads((export / "config.json").read_text())["extra"]["prior"]
    assert not (export / COPY_REFERENCE_NAME).exists() and load_prior(export).copy_reference is None
    out = generate(export, 2, tmp_path / "gen", prior="fitted")
    record = json.loads((out / "generation.json").read_text())
    assert record["copy_check"]["checked"] is False and "no copy reference" in record["copy_check"]["reason"]
    assert record["flagged_copy_fraction"] is None and len(record["samples"]) == 2
    assert "copy check: not run" in capsys.readouterr().out

    # An export whose reference file was deleted (say, before sharing it) generates too, and says which file.
    save_prior(fit_prior_to_volumes(load_model(export), volumes(range(3))), export)
    (export / COPY_REFERENCE_NAME).unlink()
    out = generate(export, 1, tmp_path / "shared", prior="fitted")
    record = json.loads((out / "generation.json").read_text())
    assert record["copy_check"]["checked"] is False and COPY_REFERENCE_NAME in record["copy_check"]["reason"]
    assert record["flagged_copy_fraction"] is None
