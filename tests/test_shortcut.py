"""model.shortcut: the parameter-free block codes between the voxels and the latent ("dct", "mean")."""

import json

import pytest
import torch
from reference_model import block_code, block_decode, one_thread  # noqa: F401 (fixture)
from test_inference import bounded, budget_between, perturbed_model

from medvae import VAE3D
from medvae.config import load_config
from medvae.export import load_model, save_model
from medvae.models import shortcut
from medvae.models.architecture import VAE3DArchitecture
from medvae.models.shortcut import add_decoded_latent, add_encoded_input, encoded_input

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind,factor,latent", [("dct", 4, 3), ("dct", 2, 4), ("dct", 2, 10), ("mean", 4, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_code_equals_the_reference_in_any_slab_size(kind, factor, latent, dtype, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 8, 12).to(dtype)
    reference = block_code(x, kind, factor, latent)
    whole = encoded_input(x, kind, factor, latent)
    monkeypatch.setattr(shortcut, "POOL_SLAB_VOXELS", 1)  # one block-row of slices per slab
    slabs = encoded_input(x, kind, factor, latent)
    assert whole.dtype == torch.float32 and whole.shape == (2, latent, 20 // factor, 8 // factor, 12 // factor)
    assert (whole.double() - reference).abs().max() < 1e-5
    assert (slabs - whole).abs().max() < 1e-6
    if kind == "dct" and latent > factor**3:
        assert reference[:, factor**3:].abs().max() == 0  # channels past the last frequency get no code


def test_the_dct_code_of_every_frequency_reconstructs_the_block_exactly():
    """With f^3 channels the code is a change of basis: decoding it gives the input back."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 6, 4, 8)
    code = encoded_input(x, "dct", 2, 8)
    assert (code[:, 0] - block_code(x, "mean", 2, 1)[:, 0]).abs().max() < 1e-6  # the constant is the block mean
    assert (add_decoded_latent(torch.zeros_like(x), code, "dct", 2) - x).abs().max() < 1e-5


def test_the_dct_keeps_more_of_a_smooth_volume_than_the_block_mean():
    """The point of "dct": with 4 channels at x2, a smooth volume's blocks keep their gradients."""
    d, h, w = torch.meshgrid(*(torch.linspace(0, 1, 16),) * 3, indexing="ij")
    x = (torch.sin(3 * d) * torch.cos(2 * h) + w**2)[None, None]
    errors = {kind: (add_decoded_latent(torch.zeros_like(x), encoded_input(x, kind, 2, 4), kind, 2) - x).abs().mean()
              for kind in ("mean", "dct")}
    assert errors["dct"] < errors["mean"] / 4


def test_the_code_joins_the_mean_clamped_in_place_or_not():
    torch.manual_seed(0)
    blocks = torch.tensor([[-9.0, -1.0], [3.0, 8.0]]).reshape(1, 1, 2, 2, 1)  # beyond +-POOLED_LIMIT both sides
    x = blocks.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4) + 0.1 * torch.randn(1, 1, 8, 8, 4)
    mean = torch.randn(1, 3, 2, 2, 1)
    code = block_code(x, "dct", 4, 3)
    assert code.abs().max() > shortcut.POOLED_LIMIT
    expected = mean + code.float().clamp(-shortcut.POOLED_LIMIT, shortcut.POOLED_LIMIT)
    target = mean.clone()
    in_place = add_encoded_input(target, x, "dct", 4, inplace=True)
    assert in_place.data_ptr() == target.data_ptr()
    assert (add_encoded_input(mean, x, "dct", 4) - expected).abs().max() < 1e-5
    assert (in_place - expected).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["dct", "mean"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("slab_voxels", [1, 512])  # slabs of 1 latent slice, and of 2 (the last one short)
def test_the_decoded_latent_in_place_equals_the_reference(kind, memory_format, slab_voxels, monkeypatch):
    torch.manual_seed(0)
    z = torch.randn(2, 3, 3, 2, 4)
    voxels = torch.randn(2, 2, 6, 4, 8).to(memory_format=memory_format)
    expected = voxels.double() + block_decode(z, kind, 2)  # every output channel gets the same blocks
    plain = add_decoded_latent(voxels, z, kind, 2)
    monkeypatch.setattr(shortcut, "POOL_SLAB_VOXELS", slab_voxels)
    target = voxels.clone(memory_format=memory_format)
    in_place = add_decoded_latent(target, z, kind, 2, inplace=True)
    assert in_place.data_ptr() == target.data_ptr()
    assert (plain - expected).abs().max() < 1e-5
    assert (in_place - expected).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["dct", "mean"])
def test_the_shortcut_adds_exactly_the_block_code_and_its_decoded_blocks(kind):
    """Same weights with and without the shortcut: they differ by exactly the two shortcut terms."""
    torch.manual_seed(0)
    plain = perturbed_model([8, 16, 16], shortcut="none")
    with_shortcut = perturbed_model([8, 16, 16], shortcut=kind)
    with_shortcut.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 16, 24, 16) * 3
    with torch.no_grad():
        a, b = plain.encode(x), with_shortcut.encode(x)
        assert torch.equal(a.logvar, b.logvar)
        assert (b.mean - a.mean - block_code(x, kind, 4, 3).float()).abs().max() < 1e-5
        z = torch.randn_like(a.mean)
        difference = with_shortcut.decode(z) - plain.decode(z)
    assert (difference - block_decode(z, kind, 4).float()).abs().max() < 1e-5
    assert difference.std() > 0.1  # the comparison above is not zeros against zeros


def test_the_shortcut_trains_through_both_paths():
    """Gradient reaches the encoder through the decoder shortcut: with a zero decoder output conv, the
    encoder still gets a gradient from the reconstruction."""
    torch.manual_seed(0)
    model = VAE3D(channels=[8, 16, 16], norm_num_groups=4)
    with torch.no_grad():
        model.decoder.conv_out.weight.zero_()
        model.decoder.conv_out.bias.zero_()
    x = torch.rand(1, 1, 16, 16, 16)
    out = model(x, sample_posterior=False)
    assert (out.reconstruction - block_decode(out.mean, "dct", 4).float()).abs().max() < 1e-5
    (out.reconstruction - x).abs().mean().backward()
    assert model.encoder.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_bounded_inference_with_the_shortcut_equals_one_pass(part, monkeypatch):
    model, plain = perturbed_model([8, 16, 16], shortcut="dct"), perturbed_model([8, 16, 16], shortcut="none")
    monkeypatch.setattr(shortcut, "POOL_SLAB_VOXELS", 4096)  # several slabs in the in-place decode
    torch.manual_seed(1)
    data = torch.rand(1, 1, 24, 40, 32) * 4 if part == "encoder" else torch.randn(1, 3, 6, 10, 8)
    plan, result = bounded(model, part, data, budget_between(model, part, tuple(data.shape)))
    assert not plan.one_pass and plan.tiles >= 8

    def one_pass(m):
        with torch.no_grad():
            if part == "decoder":
                return m.decode(data)
            posterior = m.encode(data)
            return torch.cat([posterior.mean, posterior.logvar], 1)

    assert (result - one_pass(model)).abs().max() < 1e-4
    assert (result - one_pass(plain)).abs().max() > 0.5  # the bounded path did apply the shortcut


def test_shortcut_names_and_the_booleans_of_older_configs():
    assert VAE3DArchitecture().shortcut == "dct"
    assert load_config(None, ["model.shortcut=true"]).model.shortcut == "mean"
    assert load_config(None, ["model.shortcut=false"]).model.shortcut == "none"
    with pytest.raises(ValueError, match="shortcut must be one of none, mean, dct"):
        VAE3DArchitecture(shortcut="haar")


def test_an_export_keeps_its_shortcut_and_older_exports_load_as_they_were_trained(tmp_path):
    model = perturbed_model([8, 16])
    x = torch.rand(1, 1, 8, 8, 8)
    save_model(model, tmp_path / "new")
    loaded = load_model(tmp_path / "new")
    assert loaded.arch.shortcut == "dct"
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).mean, model.encode(x).mean)
    config_path = tmp_path / "new" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["shortcut"] = True  # an export of the first built-in shortcut: the block mean
    config_path.write_text(json.dumps(config))
    assert load_model(tmp_path / "new").arch.shortcut == "mean"
    del config["model"]["shortcut"]  # what an export written before the field existed holds
    config_path.write_text(json.dumps(config))
    assert load_model(tmp_path / "new").arch.shortcut == "none"
