"""The latent diffusion prior: latent cache, training through medvae's runner (2 ranks, exact resume),
generate --prior diffusion (reproducible, copy-checked), and refusals of bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from jobs_helpers import assert_one_line_error, make_export, write_ct_phantoms
from medvae.cli import cli
from medvae.export import model_hash

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]

# A tiny UNet (8/16 channels, cross-attention at the lowest level) on 2 x 8^3 latents of 16^3 phantoms.
TINY_PRIOR = ["diffusion.channels=[8,16]", "diffusion.attention_levels=[false,true]", "diffusion.norm_num_groups=4",
              "diffusion.num_head_channels=8", "diffusion.num_res_blocks=1", "diffusion.num_train_timesteps=100",
              "diffusion.sampling_steps=4", "latents.batch_size=2", "train.warmup_steps=1", "train.cpu=true",
              "tracking.wandb_mode=disabled", "tracking.log_every=1"]


def prior_overrides(data: Path, run: Path, *extra: str) -> list[str]:
    return TINY_PRIOR + [f"latents.train={data}", f"train.output_dir={run}", *extra]


def train_tiny_prior(model: Path, data: Path, run: Path, *extra: str):
    from medvae.prior.training import load_prior_config, train_prior

    return train_prior(load_prior_config(None, prior_overrides(data, run, *extra), str(model)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VAE export in runs/x, 6 CT phantoms, and a prior trained 3 steps at runs/x/prior."""
    root = tmp_path_factory.mktemp("prior")
    model = root / "runs" / "x"
    make_export(model / "export")
    write_ct_phantoms(root / "ct", count=6, shape=(16, 16, 16))
    train_tiny_prior(model, root / "ct", model / "prior", "train.max_steps=3", "train.checkpoint_every=3")
    return root, model


def test_latent_cache_has_provenance_scaling_and_one_grid(trained):
    from medvae.prior.latents import load_latents

    root, model = trained
    path = model / "prior" / "latents_train.safetensors"
    latents = load_latents(path, model_hash=model_hash(model))
    assert latents.latents.shape == (6, 2, 8, 8, 8) and len(latents.ids) == 6
    assert latents.provenance["model_hash"] == model_hash(model)
    assert latents.provenance["preprocessing"]["modality"] == "CT"
    assert "centre-crop or edge-pad" in latents.provenance["shape_policy"]
    assert all(c["modality"] == "CT" and c["spacing"] == pytest.approx(2.0) for c in latents.conditions)
    shift, scale = latents.scaling()  # latents.scaling=global, the default: latent diffusion's scale factor
    scaled = (latents.latents - shift[None, :, None, None, None]) * scale[None, :, None, None, None]
    assert abs(float(scaled.std()) - 1.0) < 1e-4 and scaled.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-5
    assert torch.equal(scale, scale[:1].expand(2))
    shift, scale = latents.scaling(per_channel=True)  # latents.scaling=channel: each channel its own
    scaled = (latents.latents - shift[None, :, None, None, None]) * scale[None, :, None, None, None]
    assert (scaled.std(dim=(0, 2, 3, 4)) - 1.0).abs().max() < 1e-4
    with pytest.raises(ValueError, match="another VAE"):
        load_latents(path, model_hash="0" * 64)


def test_prior_folder_records_provenance_and_the_copy_check(trained):
    root, model = trained
    export = model / "prior" / "export"
    config = json.loads((export / "config.json").read_text())
    assert {p.name for p in export.iterdir()} == {"config.json", "diffusion_prior.safetensors",
                                                   "copy_reference.safetensors"}
    assert config["model_hash"] == model_hash(model) and config["latent_shape"] == [2, 8, 8, 8]
    assert config["scheduler"]["kind"] == "rflow" and config["conditions"]["keys"] == ["modality", "spacing"]
    assert len(config["scale"]) == 2 and min(config["scale"]) > 0 and len(config["shift"]) == 2
    from medvae.prior.latents import load_latents

    stored = load_latents(model / "prior" / "latents_train.safetensors", model_hash=model_hash(model))
    assert config["scale"] == pytest.approx(stored.scaling()[1].tolist())  # the default: global
    assert config["copy_check"]["threshold"] > 0 and len(config["copy_check"]["reference_distances"]) == 6


def test_generate_diffusion_is_reproducible_and_records_sampler_seed_conditions(trained, tmp_path):
    from medvae.jobs.generate import generate

    root, model = trained
    conditions = {"conditions": ["modality=CT", "spacing=2"]}
    first = generate(model, 2, tmp_path / "a", seed=5, prior="diffusion", diffusion=conditions)
    again = generate(model, 2, tmp_path / "b", seed=5, prior="diffusion", diffusion=conditions)
    other = generate(model, 1, tmp_path / "c", seed=6, prior="diffusion", diffusion=conditions)
    scans = [[nib.load(out / f"sample_{i:03d}.nii.gz").get_fdata() for i in range(n)]
             for out, n in ((first, 2), (again, 2), (other, 1))]
    np.testing.assert_array_equal(scans[0][0], scans[1][0])
    np.testing.assert_array_equal(scans[0][1], scans[1][1])
    assert not np.array_equal(scans[0][0], scans[2][0]) and not np.array_equal(scans[0][0], scans[0][1])
    record = json.loads((first / "generation.json").read_text())
    assert record["prior"] == "diffusion" and record["seed"] == 5 and record["sampler"] == "rflow"
    assert record["sampling_steps"] == 4 and record["conditions"] == {"modality": "CT", "spacing": "2"}
    assert record["shape"] == [16, 16, 16] and record["model_hash"] == model_hash(model)
    assert record["prior_description"]["model_hash"] == model_hash(model)
    assert 0.0 <= record["flagged_copy_fraction"] <= 1.0 and len(record["copy_check"]["flagged"]) == 2
    image = nib.load(first / "sample_000.nii.gz")
    np.testing.assert_allclose(image.header.get_zooms(), [2.0, 2.0, 2.0])
    assert (first / "montage.png").is_file() and (first / "sample_000.png").is_file()


def test_guidance_changes_the_samples_and_without_it_a_batch_pass_is_skipped(trained):
    from medvae.prior.diffusion import load_diffusion_prior

    root, model = trained
    prior = load_diffusion_prior(model / "prior")
    conditions = {"modality": "CT", "spacing": 2.0}
    plain = prior.sample(1, seed=0, conditions=conditions)
    guided = prior.sample(1, seed=0, conditions=conditions, guidance=3.0)
    assert plain.shape == (1, 2, 8, 8, 8) and not torch.equal(plain, guided)
    torch.testing.assert_close(prior.sample(1, seed=0, conditions=conditions, guidance=1.0), plain, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["other_vae", "missing_condition", "unknown_modality", "wrong_sampler"])
def test_bad_input_is_one_line_exit_1_and_writes_nothing(trained, tmp_path, case):
    root, model = trained
    args = ["generate", "--model", str(model), "--out", str(tmp_path / "out"), "--prior", "diffusion",
            "--condition", "modality=CT", "--condition", "spacing=2"]
    needle = {"other_vae": "another VAE", "missing_condition": "spacing=VALUE", "unknown_modality": "modality=MR",
              "wrong_sampler": "rflow"}[case]
    if case == "other_vae":
        other = make_export(tmp_path / "other" / "export", seed=1)
        args[2] = str(other.parent)
        args += ["--prior-dir", str(model / "prior")]
    elif case == "missing_condition":
        args = args[:-2]
    elif case == "unknown_modality":
        args[args.index("modality=CT")] = "modality=MR"
    else:
        args += ["--sampler", "ddim"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The logged diffusion loss per step (the loss is its only term)."""
    from training_helpers import read_jsonl

    rows = read_jsonl(run_dir / "metrics.jsonl")
    return {r["step"]: r.get("train/loss", r.get("train/term/diffusion")) for r in rows
            if "train/loss" in r or "train/term/diffusion" in r}


def check_resume_is_exact(root: Path, model: Path, tmp_path: Path, *extra: str) -> None:
    """4 steps straight, and 2 + resume from the step-2 checkpoint: the same losses and exported weights."""
    common = ("train.max_steps=4", "train.checkpoint_every=2", *extra)
    full = train_tiny_prior(model, root / "ct", tmp_path / "full", *common)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.run_dir / "checkpoints" / "step_000002", resumed_dir / "checkpoints" / "step_000002")
    resumed = train_tiny_prior(model, root / "ct", resumed_dir, *common, "train.resume=auto")
    assert resumed.step == 4
    full_losses, resumed_losses = losses_by_step(full.run_dir), losses_by_step(resumed_dir)
    assert sorted(resumed_losses) == [3, 4]
    assert all(resumed_losses[s] == full_losses[s] for s in (3, 4)), (resumed_losses, full_losses)
    exported = [load_file(str(d / "export" / "diffusion_prior.safetensors")) for d in (full.run_dir, resumed_dir)]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_resume_is_exact(trained, tmp_path):
    check_resume_is_exact(*trained, tmp_path, "train.ema_decay=null")


def test_resume_with_ema_is_exact(trained, tmp_path):
    check_resume_is_exact(*trained, tmp_path, "train.ema_decay=0.9")


@pytest.mark.slow
def test_two_cpu_ranks_train_the_prior_in_sync(trained, tmp_path):
    root, model = trained
    script = Path(__file__).with_name("distributed_prior.py")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(script.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    overrides = prior_overrides(root / "ct", tmp_path / "run", "train.max_steps=3", "train.checkpoint_every=3",
                                "latents.batch_size=1", f"model={model}")
    result = subprocess.run(LAUNCH + [str(script), str(tmp_path), *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    info = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert all(i["num_processes"] == 2 and i["backend"] == "gloo" for i in info)
    assert info[0]["seen_ids"] != info[1]["seen_ids"] and len(info[0]["seen_ids"]) == 3
    ranks = [load_file(str(tmp_path / f"rank_{r}.safetensors")) for r in (0, 1)]
    initial = load_file(str(tmp_path / "initial.safetensors"))
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
    assert sum(float((ranks[0][n] - initial[n]).abs().sum()) for n in initial) > 0, "training changed nothing"
    assert (tmp_path / "run" / "export" / "diffusion_prior.safetensors").is_file()


def test_volumes_of_different_sizes_share_the_median_grid_rounded_up_for_the_unet(tmp_path):
    from medvae.jobs.loading import load_for_inference
    from medvae.prior.latents import encode_items

    export = make_export(tmp_path / "export")
    items = []
    for index, shape in enumerate([(16, 16, 16), (20, 16, 12), (24, 16, 12)]):
        path = write_ct_phantoms(tmp_path / f"v{index}", count=1, shape=shape)[0]
        items.append({"image": str(path), "id": f"v{index}", "modality": "CT"})
    loaded = load_for_inference(export, device="cpu")
    latents = encode_items(loaded, items, multiple=4)
    assert latents.provenance["original_latent_shapes"] == [[2, 8, 8, 8], [2, 10, 8, 6], [2, 12, 8, 6]]
    assert latents.latent_shape == (2, 12, 8, 8)  # median (10, 8, 6), each side padded up to a multiple of 4
    assert encode_items(loaded, items).latent_shape == (2, 10, 8, 6)
    # train-prior tells the user which volumes were cropped and which padded to reach the grid
    from medvae.prior.latents import latent_grid_line

    line = latent_grid_line(encode_items(loaded, items))  # grid (2, 10, 8, 6)
    assert "3 training latents on a 2 x 10 x 8 x 6 grid" in line
    # (8, 8, 8) is padded in d and cropped in w, (10, 8, 6) fits, (12, 8, 6) is cropped in d
    assert "centre-cropped along some axis: 2" in line and "edge-padded along some axis: 1" in line


def test_a_prior_written_with_one_scale_factor_loads_with_it_on_every_channel(trained, tmp_path):
    """Priors written before per-channel scaling hold a single ``scale_factor``; it scales every channel."""
    from medvae.prior.diffusion import load_diffusion_prior

    _, model = trained
    old = tmp_path / "old"
    shutil.copytree(model / "prior" / "export", old)
    config = json.loads((old / "config.json").read_text())
    config["scale_factor"] = 2.5
    del config["scale"]
    (old / "config.json").write_text(json.dumps(config))
    prior = load_diffusion_prior(old)
    assert prior.scale.flatten().tolist() == [2.5, 2.5]
    assert prior.describe()["scale_factor"] == 2.5 and "scale" not in prior.describe()


def test_latents_scaling_channel_scales_each_channel_by_its_own_std(trained, tmp_path):
    from medvae.prior.latents import load_latents

    root, model = trained
    run = tmp_path / "channel"
    train_tiny_prior(model, root / "ct", run, "train.max_steps=1", "train.checkpoint_every=1", "latents.scaling=channel")
    config = json.loads((run / "export" / "config.json").read_text())
    stored = load_latents(run / "latents_train.safetensors", model_hash=model_hash(model))
    per_channel = stored.scaling(per_channel=True)[1]
    assert config["scale"] == pytest.approx(per_channel.tolist())
    assert abs(per_channel[0] - per_channel[1]) > 1e-3 * per_channel.abs().max()  # the two modes differ here


def test_copy_probe_runs_at_every_validation_and_a_near_copy_writes_a_copy_risk_event(trained, tmp_path):
    """diffusion.copy_probe samples the prior being trained at each validation and runs generate's copy
    check on the samples: logged as val/copy_flagged_fraction; a flagged sample is a copy_risk event."""
    from medvae.config import TrackingConfig
    from medvae.prior.training import DiffusionPriorTask, load_prior_config
    from medvae.tracking.tracker import Tracker

    root, model = trained
    run = tmp_path / "probe"
    train_tiny_prior(model, root / "ct", run, "train.max_steps=2", "train.checkpoint_every=2", "train.val_every=1")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = {row["step"]: row["val/copy_flagged_fraction"] for row in rows if "val/copy_flagged_fraction" in row}
    assert probes == {1: 0.0, 2: 0.0}  # an untrained prior draws noise, far from every training volume
    events = (run / "events.jsonl").read_text().splitlines() if (run / "events.jsonl").exists() else []
    assert not [e for e in events if json.loads(e)["kind"] == "copy_risk"]

    # The same probe under a threshold every sample falls below: the verdict reaches events.jsonl.
    direct = tmp_path / "direct"
    direct.mkdir()
    task = DiffusionPriorTask(load_prior_config(None, prior_overrides(root / "ct", direct), str(model)))
    task.build_data(direct)
    task.copy_settings = {**task.copy_settings, "threshold": float("inf")}
    tracker = Tracker(direct, TrackingConfig(wandb_mode="disabled"), {}, is_main_process=True)
    scores = task._copy_probe(task.build_model(), torch.device("cpu"), 9, tracker)
    assert scores["val/copy_flagged_fraction"] == 1.0
    (event,) = [json.loads(line) for line in (direct / "events.jsonl").read_text().splitlines()]
    assert (event["kind"], event["action"], event["step"]) == ("copy_risk", "record", 9)
    assert event["values"]["flagged"] == event["values"]["probed"] == task.config.diffusion.copy_probe


def test_train_prior_warns_when_its_last_copy_probe_flagged(tmp_path):
    from medvae.prior.training import copy_probe_warning

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 100, "loss": 1.0}, {"step": 200, "val/copy_flagged_fraction": 0.0},
            {"step": 400, "val/copy_flagged_fraction": 0.25}, {"step": 600, "val/copy_flagged_fraction": 0.5}]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    warning = copy_probe_warning(metrics)
    assert "at step 600, 50%" in warning and "first flagged at step 400" in warning
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))  # never flagged
    assert copy_probe_warning(metrics) is None
    assert copy_probe_warning(tmp_path / "missing.jsonl") is None


def test_export_weights_lowest_val_loss_exports_the_best_validation(trained, tmp_path):
    """diffusion.export_weights=lowest_val_loss: the prior folder gets the weights of the validation
    with the lowest held-out loss (kept in the run folder as best_val.*), not the last ones."""
    from medvae.prior.training import BEST_RECORD, BEST_WEIGHTS

    root, model = trained
    held = tmp_path / "held"
    held.mkdir()
    for path in write_ct_phantoms(tmp_path / "more", count=8, shape=(16, 16, 16))[6:]:  # two scans not in training
        shutil.copy(path, held / path.name)
    run = tmp_path / "best"
    train_tiny_prior(model, root / "ct", run, "train.max_steps=3", "train.checkpoint_every=3", "train.val_every=1",
                     f"latents.val={held}", "diffusion.export_weights=lowest_val_loss", "train.lr=0.05",
                     "train.ema_decay=null", "train.guard.enabled=false", "diffusion.copy_probe=0")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["val/diffusion_loss"] for row in rows if "val/diffusion_loss" in row}
    best_step = min(losses, key=losses.get)
    assert sorted(losses) == [1, 2, 3] and best_step < 3  # the high LR makes the last step not the best
    assert json.loads((run / BEST_RECORD).read_text()) == {"step": best_step, "val_diffusion_loss": losses[best_step]}
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["exported_weights"] == {"kind": "lowest_val_loss", "step": best_step,
                                          "val_diffusion_loss": losses[best_step]}
    exported = load_file(run / "export" / "diffusion_prior.safetensors")
    best = load_file(run / BEST_WEIGHTS)
    last = load_file(run / "checkpoints" / "step_000003" / "model.safetensors")
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in best)
    assert not all(torch.equal(exported[k], last[k]) for k in best)  # not the last weights


@pytest.mark.parametrize("setting", ["no_heldout", "no_validation"])
def test_export_weights_lowest_val_loss_without_validation_is_refused_before_the_run_folder(trained, tmp_path, setting):
    root, model = trained
    run = tmp_path / "run"
    extra = ["diffusion.export_weights=lowest_val_loss"] + (["train.val_every=0"] if setting == "no_validation" else [])
    result = CliRunner().invoke(cli, ["train-prior", "--model", str(model), *prior_overrides(root / "ct", run, *extra)])
    assert result.exit_code == 1
    assert_one_line_error(result, "export_weights=lowest_val_loss", "latents.val" if setting == "no_heldout" else "val_every")
    assert not run.exists()
