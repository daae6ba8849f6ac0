"""The fitted latent prior: its fit, its density, its samples, and how it travels with an export."""

import json

import pytest
import torch

from jobs_helpers import make_export
from medvae.prior import (
    PRIOR_NAME,
    LatentPrior,
    crop_or_pad,
    evenly_spaced,
    fit_prior,
    fit_prior_to_volumes,
    load_prior,
    save_prior,
)

SHAPE = (2, 3, 4, 4)  # (C, d, h, w): 96 numbers


def low_rank_latents(n: int, seed: int, rank: int = 3, noise: float = 0.2) -> torch.Tensor:
    """n latent grids with a shared low-rank structure plus small independent noise."""
    g = torch.Generator().manual_seed(123)  # the same structure for every call
    dims = int(torch.tensor(SHAPE).prod())
    basis, offset = 2.0 * torch.randn(rank, dims, generator=g), torch.randn(dims, generator=g)
    g = torch.Generator().manual_seed(seed)
    x = offset + torch.randn(n, rank, generator=g) @ basis + noise * torch.randn(n, dims, generator=g)
    return x.reshape(n, *SHAPE)


def test_low_rank_structure_is_found_and_predicts_unseen_latents_better():
    prior = fit_prior(low_rank_latents(40, seed=0))
    diagonal = fit_prior(low_rank_latents(40, seed=0), ranks=())
    assert prior.kind == "low_rank" and prior.rank >= 3
    assert diagonal.kind == "diagonal" and diagonal.rank == 0
    held_out = low_rank_latents(100, seed=1)
    assert prior.log_prob(held_out).mean() > diagonal.log_prob(held_out).mean() + 0.5 * held_out[0].numel()
    scores = prior.description["cross_validation"]["scores"]
    chosen = f"rank={prior.rank},shrinkage={prior.description['variance_shrinkage']:g}"
    assert scores[chosen] == max(scores.values())
    assert prior.description["standard_normal_loglik_per_element"] < scores[chosen]


def test_log_prob_matches_the_full_covariance_gaussian():
    prior = fit_prior(low_rank_latents(30, seed=2))
    assert prior.rank > 0
    flat_factors = prior.factors.reshape(prior.rank, -1).double()
    covariance = torch.diag(prior.residual_std.reshape(-1).double() ** 2) + flat_factors.T @ flat_factors
    reference = torch.distributions.MultivariateNormal(prior.mean.reshape(-1).double(), covariance)
    z = low_rank_latents(5, seed=3)
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z.reshape(5, -1).double()))


def test_samples_follow_the_prior_and_temperature_scales_the_std():
    prior = fit_prior(low_rank_latents(30, seed=4))
    samples = prior.sample(4000, torch.Generator().manual_seed(0))
    assert samples.shape == (4000, *SHAPE)
    expected_std = (prior.residual_std**2 + (prior.factors**2).sum(0)).sqrt()
    assert (samples.mean(0) - prior.mean).abs().max() < 5 * expected_std.max() / 4000**0.5
    torch.testing.assert_close(samples.std(0), expected_std, rtol=0.1, atol=0)
    cold = prior.sample(4000, torch.Generator().manual_seed(0), temperature=0.5)
    torch.testing.assert_close(cold - prior.mean, 0.5 * (samples - prior.mean), rtol=1e-5, atol=1e-5)
    # sample i depends on the seed and i only
    torch.testing.assert_close(prior.sample(3, torch.Generator().manual_seed(0)), samples[:3])


def test_few_volumes_give_a_diagonal_prior_without_cross_validation():
    prior = fit_prior(low_rank_latents(3, seed=5))
    assert prior.kind == "diagonal" and prior.description["cross_validation"]["scores"] == {}
    assert torch.isfinite(prior.log_prob(low_rank_latents(2, seed=6))).all()
    single = fit_prior(low_rank_latents(1, seed=5))
    assert (single.residual_std > 0).all()  # floored, so the density stays finite


def test_standard_prior_is_zero_mean_unit_std():
    prior = LatentPrior.standard(SHAPE)
    assert prior.kind == "standard" and prior.rank == 0
    samples = prior.sample(2000, torch.Generator().manual_seed(1))
    assert abs(float(samples.mean())) < 0.02 and abs(float(samples.std()) - 1) < 0.02


def test_crop_or_pad_centres_the_grid():
    latent = torch.arange(2 * 6 * 3 * 4, dtype=torch.float32).reshape(2, 6, 3, 4)
    out = crop_or_pad(latent, (2, 4, 5, 4))
    assert out.shape == (2, 4, 5, 4)
    torch.testing.assert_close(out[:, :, 1:4], latent[:, 1:5])  # cropped 1 + 1 along d, padded 1 + 1 along h
    torch.testing.assert_close(out[:, :, 0], latent[:, 1:5, 0])  # edge replication
    with pytest.raises(ValueError, match="channels"):
        crop_or_pad(latent, (3, 6, 3, 4))
    assert evenly_spaced(10, 4) == [0, 3, 6, 9] and evenly_spaced(3, 5) == [0, 1, 2]


def test_prior_travels_with_the_export(tmp_path):
    export = make_export(tmp_path / "export")
    assert load_prior(export) is None
    prior = fit_prior(low_rank_latents(12, seed=7))
    save_prior(prior, export)
    loaded = load_prior(tmp_path / "export")
    for name in ("mean", "residual_std", "factors"):
        torch.testing.assert_close(getattr(loaded, name), getattr(prior, name))
    described = json.loads((export / "config.json").read_text())["extra"]["prior"]
    assert described["file"] == PRIOR_NAME and described["latent_shape"] == list(SHAPE)
    assert described["kind"] == prior.kind
    (export / PRIOR_NAME).unlink()
    with pytest.raises(ValueError, match="missing"):
        load_prior(export)


def test_fit_to_volumes_of_different_sizes_uses_their_median_latent_shape():
    from jobs_helpers import tiny_model

    model = tiny_model()
    volumes = [torch.rand(1, *shape) for shape in [(16, 16, 16), (20, 16, 12), (16, 24, 16), (12, 16, 16)]]
    prior = fit_prior_to_volumes(model, volumes)
    assert prior.latent_shape == (2, 8, 8, 8)
    assert prior.description["volume_shape"] == [16, 16, 16]
    assert prior.description["num_volumes_encoded"] == 4
