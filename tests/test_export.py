import json

import pytest
import torch

from medvae import VAE3D, load_model, save_model
from medvae.export import model_hash, read_export_config


def _trained_looking_model():
    torch.manual_seed(0)
    model = VAE3D(channels=[8, 16], norm_num_groups=4, latent_channels=2, attention=True)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.eval()


def test_export_load_round_trip_is_bitwise(tmp_path):
    model = _trained_looking_model()
    preprocessing = {"preset": "ct_window", "window_min": -1000.0, "window_max": 1000.0}
    save_model(model, tmp_path / "export", preprocessing=preprocessing, extra={"step": 7})
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "export")
    assert loaded.config == model.config
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        a = model(x)
        b = loaded(x)
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.logvar, b.logvar)
    config = read_export_config(tmp_path / "export")
    assert config["preprocessing"] == preprocessing and config["extra"] == {"step": 7}
    assert len(model_hash(tmp_path / "export")) == 64


def test_run_folder_resolves_to_its_export(tmp_path):
    save_model(_trained_looking_model(), tmp_path / "run" / "export")
    assert isinstance(load_model(tmp_path / "run"), VAE3D)


def test_loading_never_unpickles(tmp_path):
    model = _trained_looking_model()
    save_model(model, tmp_path / "export")
    # a pickle bomb next to the weights is never opened, and the weights file holds no pickle
    (tmp_path / "export" / "pytorch_model.bin").write_bytes(b"\x80\x04crm -rf\n")
    raw = (tmp_path / "export" / "model.safetensors").read_bytes()
    assert b"\x80\x04" not in raw[:16]
    load_model(tmp_path / "export")


def test_mismatched_weights_are_refused(tmp_path):
    save_model(_trained_looking_model(), tmp_path / "export")
    cfg_path = tmp_path / "export" / "config.json"
    config = json.loads(cfg_path.read_text())
    config["model"]["channels"] = [8, 16, 16]
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path / "export")


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")


def test_failed_export_leaves_previous_export_intact(tmp_path, monkeypatch):
    model = _trained_looking_model()
    save_model(model, tmp_path / "export", extra={"version": 1})
    import medvae.export as export

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken_save)
    with pytest.raises(OSError):
        save_model(model, tmp_path / "export", extra={"version": 2})
    assert read_export_config(tmp_path / "export")["extra"] == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


class _Marker:
    """Unpickling this touches a file: proof that a loader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_pickle_only_export_is_refused_without_unpickling(tmp_path):
    save_model(_trained_looking_model(), tmp_path / "export")
    (tmp_path / "export" / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    torch.save({"state_dict": _trained_looking_model().state_dict(), "hook": _Marker(str(marker))},
               tmp_path / "export" / "model.pt")  # a real torch pickle, as `torch.save(model)` exports write
    with pytest.raises(FileNotFoundError, match="model.pt not loaded: medvae never unpickles"):
        load_model(tmp_path / "export")
    assert not marker.exists()


def test_save_model_refuses_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(FileExistsError):
        save_model(_trained_looking_model(), tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
