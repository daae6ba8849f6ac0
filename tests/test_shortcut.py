"""model.shortcut: the parameter-free block-average paths between the voxels and the latent."""

import json

import pytest
import torch
import torch.nn.functional as F
from reference_model import block_means, one_thread  # noqa: F401 (fixture)
from test_inference import bounded, budget_between, perturbed_model

from medvae import VAE3D
from medvae.export import load_model, save_model
from medvae.models import shortcut
from medvae.models.shortcut import add_pooled_input, add_upsampled_latent, pooled_input

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_input_is_the_block_mean_over_channels_in_any_slab_size(dtype, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 8, 12).to(dtype)
    reference = block_means(x.double(), 4)
    whole = pooled_input(x, 4)
    monkeypatch.setattr(shortcut, "POOL_SLAB_VOXELS", 1)  # one block-row of slices per slab: 5 slabs
    slabs = pooled_input(x, 4)
    assert whole.dtype == torch.float32 and whole.shape == (2, 1, 5, 2, 3)
    assert (whole.double() - reference).abs().max() < 1e-6
    assert torch.equal(whole, slabs)


def test_pooled_input_joins_the_mean_clamped_in_place_or_not():
    torch.manual_seed(0)
    blocks = torch.tensor([[-9.0, -1.0], [3.0, 8.0]]).reshape(1, 1, 2, 2, 1)  # beyond +-POOLED_LIMIT both sides
    x = blocks.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4) + 0.1 * torch.randn(1, 1, 8, 8, 4)
    mean = torch.randn(1, 2, 2, 2, 1)
    expected = mean + block_means(x.double(), 4).float().clamp(-shortcut.POOLED_LIMIT, shortcut.POOLED_LIMIT)
    assert block_means(x.double(), 4).abs().max() > shortcut.POOLED_LIMIT
    target = mean.clone()
    in_place = add_pooled_input(target, x, 4, inplace=True)
    assert in_place.data_ptr() == target.data_ptr()
    assert (add_pooled_input(mean, x, 4) - expected).abs().max() < 1e-6
    assert (in_place - expected).abs().max() < 1e-6


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_upsampled_latent_in_place_equals_the_plain_upsample(memory_format):
    torch.manual_seed(0)
    z = torch.randn(2, 3, 3, 2, 4)
    voxels = torch.randn(2, 2, 6, 4, 8).to(memory_format=memory_format)
    up = z.mean(1, keepdim=True).repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    expected = voxels + up  # every output channel gets the same upsampled mean
    plain = add_upsampled_latent(voxels, z, 2)
    target = voxels.clone(memory_format=memory_format)
    in_place = add_upsampled_latent(target, z, 2, inplace=True)
    assert in_place.data_ptr() == target.data_ptr()
    assert (plain - expected).abs().max() < 1e-6
    assert (in_place - expected).abs().max() < 1e-6


def test_the_shortcut_adds_exactly_the_block_average_and_the_upsampled_mean():
    """Same weights with and without the shortcut: they differ by exactly the two shortcut terms."""
    torch.manual_seed(0)
    plain = perturbed_model([8, 16, 16], shortcut=False)
    with_shortcut = perturbed_model([8, 16, 16], shortcut=True)
    with_shortcut.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 16, 24, 16) * 3
    with torch.no_grad():
        a, b = plain.encode(x), with_shortcut.encode(x)
        assert torch.equal(a.logvar, b.logvar)
        assert (b.mean - a.mean - block_means(x.double(), 4).float()).abs().max() < 1e-5
        z = torch.randn_like(a.mean)
        difference = with_shortcut.decode(z) - plain.decode(z)
    assert (difference - F.interpolate(z.mean(1, keepdim=True), scale_factor=4.0)).abs().max() < 1e-5
    assert difference.std() > 0.1  # the comparison above is not zeros against zeros


def test_the_shortcut_trains_through_both_paths():
    """Gradient reaches the encoder through the decoder shortcut: with a zero decoder output conv, the
    encoder still gets a gradient from the reconstruction."""
    torch.manual_seed(0)
    model = VAE3D(channels=[8, 16, 16], norm_num_groups=4, shortcut=True)
    with torch.no_grad():
        model.decoder.conv_out.weight.zero_()
        model.decoder.conv_out.bias.zero_()
    x = torch.rand(1, 1, 16, 16, 16)
    out = model(x, sample_posterior=False)
    assert (out.reconstruction - F.interpolate(out.mean.mean(1, keepdim=True), scale_factor=4.0)).abs().max() < 1e-6
    (out.reconstruction - x).abs().mean().backward()
    assert model.encoder.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_bounded_inference_with_the_shortcut_equals_one_pass(part):
    model, plain = perturbed_model([8, 16, 16], shortcut=True), perturbed_model([8, 16, 16], shortcut=False)
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


def test_an_export_keeps_the_shortcut_and_an_older_export_loads_without_it(tmp_path):
    model = perturbed_model([8, 16], shortcut=True)
    x = torch.rand(1, 1, 8, 8, 8)
    save_model(model, tmp_path / "new")
    loaded = load_model(tmp_path / "new")
    assert loaded.arch.shortcut
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).mean, model.encode(x).mean)
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    del config["model"]["shortcut"]  # what an export written before the field existed holds
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    assert not load_model(tmp_path / "new").arch.shortcut
