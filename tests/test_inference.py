"""Memory-bounded whole-volume encode/decode equals the one-pass result and stays under its budget."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference_model import one_thread  # noqa: F401 (fixture)

from medvae import VAE3D
from medvae.inference import (
    decode_volume,
    encode_latent,
    encode_volume,
    estimate_one_pass_bytes,
    minimum_bytes,
    model_geometry,
    pad_to_multiple,
    plan_decode,
    plan_encode,
)
from medvae.inference.planner import plan_volume
from medvae.inference.statistics import GroupStatistics
from medvae.inference.steps import NormStep
from medvae.inference.streaming import run_plan

SHAPE = (1, 1, 24, 40, 32)  # not a multiple of any tile the planner picks below
FACTORS = [([8, 16], 2), ([8, 16, 16], 4), ([8, 16, 16, 16], 8)]


pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed_model(channels, attention=False, **kwargs):
    """A model whose every parameter is perturbed: the zero-initialised conv2/attention proj take part."""
    torch.manual_seed(0)
    model = VAE3D(channels=channels, norm_num_groups=4, latent_channels=3, attention=attention, attention_heads=2, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def budget_between(model, part, shape, fraction=0.3):
    """A budget well under the one-pass estimate (forcing tiles) but above the minimum."""
    geometry = model_geometry(model, part, shape)
    low, high = minimum_bytes(geometry), estimate_one_pass_bytes(geometry)
    return int(low + fraction * max(high - low, 0))


def bounded(model, part, data, budget):
    """(plan, result) of the memory-bounded path. Where the one-pass estimate fits the budget anyway
    (whole-tensor attention dominates both, factor 2), force the tiled plan through the same engine."""
    geometry = model_geometry(model, part, tuple(data.shape))
    plan = plan_volume(geometry, budget)
    if not plan.one_pass:
        run = encode_volume if part == "encoder" else decode_volume
        result = run(model, data, memory_budget=budget)
        return plan, (torch.cat([result.mean, result.logvar], 1) if part == "encoder" else result)
    plan = plan_volume(geometry, budget, allow_one_pass=False)
    with torch.no_grad():  # the network by run_plan, then the model's shortcut as encode/decode_volume add it
        result = run_plan(geometry, plan, data, torch.channels_last_3d)
        if part == "decoder":
            return plan, model.output(result, data, inplace=True)
        posterior = model.posterior(result, data, inplace=True)
        return plan, torch.cat([posterior.mean, posterior.logvar], 1)


def volume():
    torch.manual_seed(1)
    return torch.randn(SHAPE)


@pytest.mark.parametrize("channels, factor", FACTORS)
@pytest.mark.parametrize("attention", [False, True])
def test_bounded_encode_equals_one_pass(channels, factor, attention):
    model = perturbed_model(channels, attention)
    x = volume()
    budget = budget_between(model, "encoder", SHAPE)
    plan, moments = bounded(model, "encoder", x, budget)
    assert plan.tiles >= 8 and plan.peak_bytes <= budget
    with torch.no_grad():
        reference = model.encode(x)
    assert reference.mean.shape == (1, 3, 24 // factor, 40 // factor, 32 // factor)
    assert reference.mean.std() > 0.1  # a meaningful comparison, not zeros against zeros
    assert (moments - torch.cat([reference.mean, reference.logvar], 1)).abs().max() < 1e-4


@pytest.mark.parametrize("channels, factor", FACTORS)
@pytest.mark.parametrize("attention", [False, True])
def test_bounded_decode_equals_one_pass(channels, factor, attention):
    model = perturbed_model(channels, attention)
    torch.manual_seed(2)
    z = torch.randn(1, 3, 24 // factor, 40 // factor, 32 // factor)
    budget = budget_between(model, "decoder", tuple(z.shape))
    plan, voxels = bounded(model, "decoder", z, budget)
    assert plan.tiles >= 8 and plan.peak_bytes <= budget
    with torch.no_grad():
        reference = model.decode(z)
    assert voxels.shape == SHAPE and reference.std() > 0.1
    assert (voxels - reference).abs().max() < 1e-4


def test_smallest_budget_streams_everything_and_stays_exact():
    model = perturbed_model([8, 16])
    x = volume()
    budget = minimum_bytes(model_geometry(model, "encoder", SHAPE))
    posterior = encode_volume(model, x, memory_budget=budget)
    with torch.no_grad():
        reference = model.encode(x)
    assert (posterior.mean - reference.mean).abs().max() < 1e-4


def test_contiguous_memory_format_and_batch_of_two():
    model = perturbed_model([8, 16, 16], channels_last=False)
    x = torch.randn(2, 1, 16, 24, 16)
    budget = budget_between(model, "encoder", tuple(x.shape))
    with torch.no_grad():
        reference = model.encode(x)
        decoded = model.decode(reference.mean)
    assert (encode_volume(model, x, memory_budget=budget).mean - reference.mean).abs().max() < 1e-4
    z_budget = budget_between(model, "decoder", tuple(reference.mean.shape))
    assert (decode_volume(model, reference.mean, memory_budget=z_budget) - decoded).abs().max() < 1e-4


def test_training_mode_model_runs_in_eval_mode_and_is_restored():
    model = perturbed_model([8, 16], dropout=0.5).train()
    x = volume()
    budget = budget_between(model, "encoder", SHAPE)
    latent = encode_latent(model, x, memory_budget=budget)
    assert model.training
    with torch.no_grad():
        reference = model.eval().encode(x).mean
    assert (latent - reference).abs().max() < 1e-4


def test_sampled_latent_uses_the_generator():
    model = perturbed_model([8, 16])
    x = volume()
    budget = budget_between(model, "encoder", SHAPE)
    a = encode_latent(model, x, memory_budget=budget, sample=True, generator=torch.Generator().manual_seed(3))
    b = encode_latent(model, x, memory_budget=budget, sample=True, generator=torch.Generator().manual_seed(3))
    mean = encode_latent(model, x, memory_budget=budget)
    assert torch.equal(a, b) and not torch.allclose(a, mean)


def test_autocast_is_honoured():
    model = perturbed_model([8, 16, 16])
    x = volume()
    budget = budget_between(model, "encoder", SHAPE)
    with torch.no_grad():
        reference = model.encode(x).mean
        decoded = model.decode(reference)
    z_budget = budget_between(model, "decoder", tuple(reference.shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = encode_volume(model, x, memory_budget=budget).mean
        low_decoded = decode_volume(model, reference, memory_budget=z_budget)
    # The output convolutions run in float32, as in the model; the rest in bf16: close, not equal.
    assert low.dtype == low_decoded.dtype == torch.float32
    assert 0 < (low - reference).abs().max() < 0.1
    assert 0 < (low_decoded - decoded).abs().max() < 0.1


def test_budget_too_small_raises_with_the_minimum():
    model = perturbed_model([8, 16, 16])
    minimum = minimum_bytes(model_geometry(model, "encoder", SHAPE))
    with pytest.raises(ValueError, match=rf"encode_volume: .* too small .* needs about {minimum} bytes"):
        encode_volume(model, volume(), memory_budget=minimum - 1)
    with pytest.raises(ValueError, match="memory_budget must be a positive"):
        decode_volume(model, torch.zeros(1, 3, 6, 10, 8), memory_budget=0)


def test_bad_shapes_raise():
    model = perturbed_model([8, 16, 16])
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        encode_volume(model, torch.zeros(1, 1, 24, 42, 32), memory_budget=2**30)
    with pytest.raises(ValueError, match="expected 3 channel"):
        decode_volume(model, torch.zeros(1, 2, 6, 10, 8), memory_budget=2**30)


def test_large_budget_takes_the_one_pass_path():
    model = perturbed_model([8, 16, 16])
    assert plan_encode(model, SHAPE, 2**30).one_pass
    with torch.no_grad():
        assert torch.equal(encode_volume(model, volume(), memory_budget=2**30).mean, model.encode(volume()).mean)


def test_group_statistics_of_uneven_tiles_match_float64_with_a_large_offset():
    torch.manual_seed(4)
    x = 0.01 * torch.randn(2, 8, 10, 12, 14) + 100.0  # std / mean = 1e-4: a plain sum of squares cancels
    stats = GroupStatistics(num_groups=4, eps=1e-6)
    for d0, d1 in [(0, 3), (3, 4), (4, 10)]:
        for h0, h1 in [(0, 7), (7, 12)]:
            stats.add(x[:, :, d0:d1, h0:h1].contiguous(memory_format=torch.channels_last_3d))
    mean, rstd = stats.result()
    grouped = x.double().reshape(2, 4, -1)
    assert torch.allclose(mean.double(), grouped.mean(-1), rtol=0, atol=1e-5)
    expected_rstd = torch.rsqrt(grouped.var(-1, correction=0) + 1e-6)
    assert torch.allclose(rstd.double(), expected_rstd, rtol=1e-3, atol=0)


def test_pad_to_multiple_pads_the_far_end_by_edge_replication():
    x = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(1, 1, 5, 6, 7)
    padded, crop = pad_to_multiple(x, 4)
    assert padded.shape == (1, 1, 8, 8, 8)
    assert torch.equal(padded[crop], x)
    assert torch.equal(padded[0, 0, 7, :6, :7], x[0, 0, 4])  # last slice repeated
    assert torch.equal(padded[0, 0, :5, :6, 7], x[0, 0, :, :, 6])
    same, crop = pad_to_multiple(torch.zeros(2, 8, 16, 8), 8)
    assert same.shape == (2, 8, 16, 8) and same[crop].shape == (2, 8, 16, 8)
    with pytest.raises(ValueError, match="factor"):
        pad_to_multiple(x, 0)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_measured_peak_stays_under_the_budget():
    """In a fresh process: the resident-set peak of a bounded encode + decode stays under the budget."""
    script = textwrap.dedent(
        """
        import json, torch
        from medvae import VAE3D
        from medvae.inference import decode_volume, encode_volume, estimate_one_pass_bytes, minimum_bytes
        from medvae.inference import model_geometry

        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = VAE3D(channels=[16, 32], norm_num_groups=8, latent_channels=3).eval()
        x = torch.randn(1, 1, 64, 64, 64)
        z = torch.randn(1, 3, 32, 32, 32)
        with torch.no_grad():
            model.encode(x[..., :8, :8, :8]); model.decode(z[..., :4, :4, :4])
        result = {}
        for part, data, run in [("encoder", x, encode_volume), ("decoder", z, decode_volume)]:
            geometry = model_geometry(model, part, tuple(data.shape))
            low, high = minimum_bytes(geometry), estimate_one_pass_bytes(geometry)
            budget = int(low + 0.3 * (high - low))
            base = status("VmRSS")
            open("/proc/self/clear_refs", "w").write("5")
            run(model, data, memory_budget=budget)
            result[part] = (status("VmHWM") - base, budget)
        print(json.dumps(result))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for part, (peak, budget) in json.loads(done.stdout.splitlines()[-1]).items():
        assert 0 < peak <= budget, (part, peak, budget)


def _statistics_sources(geometry, plan):
    """For each GroupNorm step index: the passes that stream tiles of its input T_k (stats-only
    passes stopping at k, or passes that materialise T_k and reduce its statistics on the way)."""
    norms = [i for i, step in enumerate(geometry.steps) if isinstance(step, NormStep)]
    return {k: [p for p in plan.passes if p.stop == k] for k in norms}


def test_materialised_tensors_feed_their_groupnorm_statistics_without_a_statistics_pass():
    """The comparison architecture's decoder at 128^3 under 0.5 GiB (benchmarks/inference_memory.py
    --plan-flops): tensors a pass materialises (e.g. the full-resolution input of the last GroupNorm)
    have their statistics reduced from the tiles that pass writes; the planner charges no extra pass
    for them, and every GroupNorm's statistics come from exactly one pass."""
    model = VAE3D(channels=(32, 64, 64), num_res_blocks=1, latent_channels=3, norm_num_groups=32)
    geometry = model_geometry(model, "decoder", (1, 3, 32, 32, 32), torch.device("cpu"))
    plan = plan_volume(geometry, 0.5 * 2**30, allow_one_pass=False)
    sources = _statistics_sources(geometry, plan)
    assert all(len(passes) == 1 for passes in sources.values()), sources
    free = [k for k, passes in sources.items() if passes[0].produce]
    assert len(geometry.steps) - 2 in free  # the last GroupNorm, on the 128^3 x 32 tensor
    assert plan.peak_bytes <= 0.5 * 2**30


def test_bounded_decode_gathers_each_groupnorm_statistics_once(monkeypatch):
    """Run a plan whose materialised tensors feed GroupNorms: one statistics reduction per GroupNorm
    (none repeated, none from a redundant pass), and the result equals one pass."""
    import medvae.inference.streaming as streaming

    model = perturbed_model([8, 16, 16])
    torch.manual_seed(2)
    z = torch.randn(1, 3, 6, 10, 8)
    geometry = model_geometry(model, "decoder", tuple(z.shape))
    plan = plan_volume(geometry, budget_between(model, "decoder", tuple(z.shape)), allow_one_pass=False)
    sources = _statistics_sources(geometry, plan)
    assert all(len(passes) == 1 for passes in sources.values()), sources
    assert sum(passes[0].produce for passes in sources.values()) >= 2  # the free path is exercised
    made = []

    class Counting(GroupStatistics):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(streaming, "GroupStatistics", Counting)
    with torch.no_grad():
        voxels = model.output(run_plan(geometry, plan, z, torch.channels_last_3d), z, inplace=True)
        reference = model.decode(z)
    assert len(made) == len(sources)
    assert reference.std() > 0.1 and (voxels - reference).abs().max() < 1e-4
