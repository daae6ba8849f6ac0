"""The reference codes of benchmarks/heldout_ceiling.py, whose numbers RESULTS.md quotes as the ceiling
the convergence benchmark's held-out PSNR is read against: blocks in the right places, and a block PCA
that is exact when it keeps enough components and only then."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def ceiling():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import heldout_ceiling
    finally:
        sys.path.remove(str(BENCHMARKS))
    return heldout_ceiling


def test_blocks_are_the_cubes_of_the_volume_in_order(ceiling):
    x = torch.randn(1, 1, 8, 12, 8)
    rows = ceiling.blocks(x, 4)
    assert rows.shape == (2 * 3 * 2, 64)
    assert torch.equal(rows[0], x[0, 0, :4, :4, :4].flatten())
    assert torch.equal(rows[1], x[0, 0, :4, :4, 4:8].flatten())  # W varies fastest
    assert torch.equal(rows[2], x[0, 0, :4, 4:8, :4].flatten())
    assert torch.equal(rows[6], x[0, 0, 4:8, :4, :4].flatten())
    assert torch.equal(ceiling.unblocks(rows, (8, 12, 8), 4), x)


def test_block_pca_is_exact_with_enough_components_and_only_then(ceiling):
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(2, 64, generator=generator, dtype=torch.float64)

    def volume() -> torch.Tensor:  # every 4^3 block is a mix of the same two patterns plus a constant
        coefficients = torch.randn(27, 2, generator=generator, dtype=torch.float64)
        return ceiling.unblocks(coefficients @ patterns + 0.5, (12, 12, 12), 4).float()

    pca = ceiling.BlockPCA([volume() for _ in range(4)], 4)
    unseen = volume()
    assert torch.allclose(pca.reconstruct(unseen, 2), unseen, atol=1e-5)
    assert not torch.allclose(pca.reconstruct(unseen, 1), unseen, atol=1e-2)
    noise = torch.rand(1, 1, 12, 12, 12, generator=generator)
    assert torch.allclose(pca.reconstruct(noise, 64), noise, atol=1e-5)  # a full basis reconstructs anything


def test_psnr_is_scored_as_the_convergence_benchmark_scores_it(ceiling):
    x = torch.full((1, 1, 8, 8, 8), 0.5)  # SSIM's 7^3 window needs 7 voxels a side
    assert ceiling.score(lambda v: v + 0.1, [x])[0] == pytest.approx(20.0, abs=1e-4)
    assert ceiling.score(lambda v: v + 2.0, [x])[0] == pytest.approx(-20 * torch.log10(torch.tensor(0.5)).item(), abs=1e-4)
