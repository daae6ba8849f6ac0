"""One op list: the model's forward and the memory-bounded runner follow the same ops, exactly."""

import pytest
import torch
from reference_model import one_thread, perturbed, reference_encode, reference_decode, reference_run  # noqa: F401 (fixture)
from torch import nn

from medvae import VAE3D
from medvae.inference import decode_volume, encode_volume, estimate_one_pass_bytes, minimum_bytes, model_geometry
from medvae.models.blocks import ResBlock
from medvae.models.ops import Activation, Norm, Op, ResidualClose


pytestmark = pytest.mark.usefixtures("one_thread")


def tight_budget(model, part, shape, fraction=0.3):
    geometry = model_geometry(model, part, shape)
    low, high = minimum_bytes(geometry), estimate_one_pass_bytes(geometry)
    return int(low + fraction * (high - low))


def bounded_encode(model, x):
    return encode_volume(model, x, memory_budget=tight_budget(model, "encoder", tuple(x.shape))).mean


def test_one_pass_and_bounded_match_float64_at_128_cubed():
    """Encode and decode of a ~128^3 volume (sides not tile multiples): the float32 one pass and
    the memory-bounded path each within 1e-4 of a float64 one pass of the same weights."""
    torch.manual_seed(0)
    model = perturbed(VAE3D(channels=[2, 2], norm_num_groups=2, latent_channels=2)).eval()
    exact = VAE3D(channels=[2, 2], norm_num_groups=2, latent_channels=2)
    exact.load_state_dict(model.state_dict())
    exact = exact.double().eval()
    x = 0.5 * torch.randn(1, 1, 130, 128, 126) + 1.0  # an offset: sums of squares would cancel
    shape = tuple(x.shape)
    with torch.no_grad():
        reference = exact.encode(x.double()).mean
        one_pass = model.encode(x).mean
        budget = tight_budget(model, "encoder", shape)
        bounded = encode_volume(model, x, memory_budget=budget).mean
        assert reference.std() > 0.1
        assert (one_pass.double() - reference).abs().max() < 1e-4
        assert (bounded.double() - reference).abs().max() < 1e-4

        z = reference.float()
        voxels = exact.decode(z.double())
        assert voxels.shape == x.shape and voxels.std() > 0.1
        assert (model.decode(z).double() - voxels).abs().max() < 1e-4
        decoded = decode_volume(model, z, memory_budget=tight_budget(model, "decoder", tuple(z.shape)))
        assert (decoded.double() - voxels).abs().max() < 1e-4


@pytest.mark.parametrize("attention", [False, True])
def test_forward_equals_a_plain_functional_reference(attention):
    """float64: the model (fused norm+act+conv, sub-pixel upsampling, exact statistics) equals
    F.group_norm -> F.silu -> F.conv3d / nearest F.interpolate on the same op list."""
    torch.manual_seed(0)
    model = perturbed(VAE3D(channels=[8, 16, 16], norm_num_groups=4, latent_channels=3, attention=attention,
                            attention_heads=2)).double().eval()
    x = torch.randn(1, 1, 12, 16, 8, dtype=torch.float64)
    assert model.arch.shortcut == "dct"  # the default; reference_encode/decode add it independently
    with torch.no_grad():
        moments = model.encoder(x)
        assert (moments - reference_run(model.encoder.ops(), x)).abs().max() < 1e-10
        posterior = model.encode(x)
        mean, logvar = reference_encode(model, x)
        # DiagonalGaussian keeps mean and logvar in float32: equal to float32 rounding
        assert (posterior.mean - mean).abs().max() < 1e-6 and (posterior.logvar - logvar).abs().max() < 1e-6
        z = posterior.mean.double()
        assert (model.decoder(z) - reference_run(model.decoder.ops(), z)).abs().max() < 1e-10
        assert (model.decode(z) - reference_decode(model, z)).abs().max() < 1e-10


class ResBlockWithOutputActivation(ResBlock):
    """A residual block with one more op: SiLU after the residual add."""

    def ops(self) -> list[Op]:
        return super().ops() + [Activation()]


def _swap_first_block(model, block_type):
    old = model.encoder.levels[0].res_blocks[0]
    new = block_type(old.conv1.in_channels, old.conv1.out_channels, 4)
    new.load_state_dict(old.state_dict(), strict=False)
    model.encoder.levels[0].res_blocks[0] = new
    return model


def test_a_block_subclass_that_adds_an_op_changes_one_pass_and_bounded_alike():
    model = perturbed(VAE3D(channels=[8, 16, 16], norm_num_groups=4, latent_channels=3)).eval()
    x = torch.randn(1, 1, 16, 24, 20)
    with torch.no_grad():
        before = model.encode(x).mean
        _swap_first_block(model, ResBlockWithOutputActivation)
        after = model.encode(x).mean
        bounded = bounded_encode(model, x)
        reference = reference_encode(model, x)[0]
    assert (after - before).abs().max() > 1e-2  # the op takes effect ...
    assert (bounded - after).abs().max() < 1e-4  # ... in both paths alike
    assert (after.double() - reference).abs().max() < 1e-4


class Scale(Op):
    """An op neither executor knows."""

    def __init__(self, factor: float):
        self.factor = factor


class ResBlockWithUnknownOp(ResBlock):
    def ops(self) -> list[Op]:
        return super().ops()[:-1] + [Scale(0.5), ResidualClose(None)]


class PlainBlock(nn.Module):
    """A module that is not a medvae Block: it declares no op list."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv1(x)


@pytest.mark.parametrize("block_type, name", [(ResBlockWithUnknownOp, "Scale"), (PlainBlock, "PlainBlock")])
def test_an_unknown_op_or_module_fails_in_both_paths_naming_it(block_type, name):
    model = _swap_first_block(perturbed(VAE3D(channels=[8, 16], norm_num_groups=4, latent_channels=3)), block_type)
    x = torch.randn(1, 1, 8, 8, 8)
    with pytest.raises(TypeError, match=name):
        model.encode(x)
    with pytest.raises(TypeError, match=name):
        encode_volume(model, x, memory_budget=2**30)


def test_a_block_cannot_override_forward():
    """The forward is the op list: a hand-written forward (e.g. scaling the residual by 0.5) that the
    bounded runner could not follow is refused when the class is defined."""
    with pytest.raises(TypeError, match="declare ops"):

        class HalfResidual(ResBlock):
            def forward(self, x):
                return 0.5 * x


def test_norm_without_recompute_and_checkpointing_keep_the_op_list():
    """Unfused norms and checkpointed residual segments run the same ops: same output and gradients."""
    torch.manual_seed(0)
    model = perturbed(VAE3D(channels=[8, 16], norm_num_groups=4, latent_channels=2))
    x = torch.randn(1, 1, 8, 12, 8)
    ops = model.encoder.ops()
    assert [type(op) for op in ops].count(Norm) == 5
    grads = []
    for recompute, checkpointing in [(True, False), (False, True)]:
        other = VAE3D(channels=[8, 16], norm_num_groups=4, latent_channels=2, recompute_norm=recompute,
                      gradient_checkpointing=checkpointing)
        other.load_state_dict(model.state_dict())
        out = other(x, sample_posterior=False)
        (out.reconstruction.square().mean() + out.mean.square().mean()).backward()
        grads.append([p.grad for p in other.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
