"""The fitted latent prior: a Gaussian over the latent grid, fitted to the training set's posterior means.

With the tiny KL weights that give sharp reconstructions, the latents of real volumes are far from
N(0, I), and decoding N(0, I) samples gives noise. After training, medvae encodes the training
volumes (posterior means, whole volumes through the memory-bounded encoder), brings every latent
grid to one shape, and fits

    z = mean + factors^T e + residual_std * n,    e ~ N(0, I_k),  n ~ N(0, I)

over the flattened grid (C * d * h * w numbers): a per-position mean, a low-rank part of ``k``
principal directions (scikit-learn's PCA), and a per-position residual std; the density is
``torch.distributions.LowRankMultivariateNormal``. ``k = 0`` is the per-position diagonal
Gaussian. The residual variances may be shrunk towards their channel's mean variance (a per-position
variance from a few volumes is noisy, and an underestimate costs much held-out likelihood). ``k`` and
the shrinkage are chosen by K-fold cross-validation of the held-out log-likelihood of latent means
(nats per latent element, scikit-learn's KFold), among k in 0, 1, 2, 4, ... and shrinkage in 0, 0.25, ..., 1: the low-rank
part is kept only where it predicts unseen volumes better than the diagonal. The scores of every
candidate (and of N(0, I) on the training means) are kept in the description, so the choice can be
checked.

Common shape: each latent grid is centre-cropped, or edge-padded, to the per-axis median of the
training latent grids (the encoder sees each whole volume, so crops have no border effects). The
prior therefore describes whole scans of the median preprocessed size, centred; ``generate
--prior fitted`` makes volumes of exactly ``latent_shape * downsampling_factor`` voxels.

Saved as ``prior.safetensors`` (mean, residual_std, factors) in the export folder, described in
``config.json["extra"]["prior"]``; nothing is pickled.

Copy check (as for the diffusion prior, ``medvae.prior.sampling``): a Gaussian fitted to few
volumes can reproduce a training patient, so the export also keeps the encoded training latents on
the prior's grid, ``prior_copy_reference.safetensors`` (as private as the training scans; delete it
before sharing an export, and generate then records that it could not check), and the threshold in
``extra.prior.copy_check``: derived from the held-out (validation) volumes' nearest-training
distances, or, without held-out volumes, from each training volume's distance to its nearest other
one (leave-one-out). With one training volume and no held-out ones no threshold exists, and
``copy_check`` says so.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PRIOR_NAME = "prior.safetensors"
COPY_REFERENCE_NAME = "prior_copy_reference.safetensors"  # the training latents the copy check compares with
PRIOR_FORMAT = "medvae-prior"
CANDIDATE_RANKS = (1, 2, 4, 8, 16, 32)  # low-rank sizes tried by cross-validation (besides 0)
CV_FOLDS = 5
MAX_VOLUMES = 256  # volumes encoded for the fit (evenly spaced over the training list beyond this)
MAX_ELEMENTS = 64 * 2**20  # volumes x latent elements held for the fit (256 MiB in float32)
VARIANCE_FLOOR = 1e-6  # absolute floor of the residual variance (normalised latent units squared)
RELATIVE_FLOOR = 1e-3  # ... plus this share of the mean per-position variance
SHRINKAGES = (0.0, 0.25, 0.5, 0.75, 1.0)  # weights of the channel-mean variance tried by cross-validation
DEFAULT_SHRINKAGE = 0.5  # used without cross-validation (fewer than 4 volumes)


@dataclass
class LatentPrior:
    """A Gaussian over latent grids of one shape (C, d, h, w).

    mean, residual_std: (C, d, h, w) float32. factors: (k, C, d, h, w) float32, k >= 0 (the
    columns of the low-rank covariance factor). description: JSON-able facts about the fit
    (``copy_check``: the copy check's threshold and its derivation). copy_reference: (N, C, d, h, w)
    float32 training latents for the copy check, or None.
    """

    mean: torch.Tensor
    residual_std: torch.Tensor
    factors: torch.Tensor
    description: dict[str, Any] = field(default_factory=dict)
    copy_reference: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.mean = self.mean.detach().float().cpu().contiguous()
        self.residual_std = self.residual_std.detach().float().cpu().contiguous()
        self.factors = self.factors.detach().float().cpu().reshape(-1, *self.mean.shape).contiguous()
        if self.mean.ndim != 4 or self.residual_std.shape != self.mean.shape:
            raise ValueError(f"prior: mean {tuple(self.mean.shape)} and residual_std "
                             f"{tuple(self.residual_std.shape)} must both be (C, d, h, w)")
        if self.copy_reference is not None:
            self.copy_reference = self.copy_reference.detach().float().cpu().contiguous()
            if self.copy_reference.ndim != 5 or self.copy_reference.shape[1:] != self.mean.shape:
                raise ValueError(f"prior: copy reference {tuple(self.copy_reference.shape)} must be (N, "
                                 f"{', '.join(map(str, self.mean.shape))}), the prior's latent grid")

    @classmethod
    def standard(cls, latent_shape: Sequence[int]) -> "LatentPrior":
        """N(0, I) over a (C, d, h, w) grid."""
        shape = tuple(int(s) for s in latent_shape)
        return cls(torch.zeros(shape), torch.ones(shape), torch.zeros((0, *shape)), {"kind": "standard"})

    @property
    def rank(self) -> int:
        return int(self.factors.shape[0])

    @property
    def kind(self) -> str:
        return str(self.description.get("kind", "diagonal" if self.rank == 0 else "low_rank"))

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return tuple(int(s) for s in self.mean.shape)  # type: ignore[return-value]

    def sample(self, num: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """(num, C, d, h, w) float32 samples on the CPU; ``temperature`` scales the std.

        Each sample draws its own noise in turn (residual, then low-rank), so sample i is the same
        whatever ``num`` is, for a given generator seed. (``distribution().rsample`` draws the same
        law but takes no generator, so the draw is written out here.)
        """
        samples = []
        for _ in range(num):
            residual = torch.randn(self.mean.shape, generator=generator)
            weights = torch.randn(self.rank, generator=generator)
            low_rank = torch.tensordot(weights, self.factors, dims=1) if self.rank else 0.0
            samples.append(self.mean + temperature * (self.residual_std * residual + low_rank))
        return torch.stack(samples) if samples else torch.zeros((0, *self.mean.shape))

    def distribution(self):
        """This prior as a ``torch.distributions.LowRankMultivariateNormal`` over flattened grids (float64)."""
        return _distribution(self.mean.reshape(-1).double(), self.factors.reshape(self.rank, self.mean.numel()).double(),
                             self.residual_std.reshape(-1).double() ** 2)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of latent grids z (N, C, d, h, w) in nats, (N,) float64."""
        return self.distribution().log_prob(z.reshape(z.shape[0], -1).double())


def _distribution(mean: torch.Tensor, factors: torch.Tensor, variance: torch.Tensor):
    """torch.distributions.LowRankMultivariateNormal over D numbers: cov = factors^T factors + diag(variance).

    mean, variance (D,); factors (k, D), k >= 0 (a zero column stands in for k = 0, which the
    distribution does not accept; it changes nothing).
    """
    from torch.distributions import LowRankMultivariateNormal

    cov_factor = factors.T if factors.shape[0] else torch.zeros((mean.shape[0], 1), dtype=mean.dtype)
    return LowRankMultivariateNormal(mean, cov_factor.contiguous(), variance)


def _log_prob(x: torch.Tensor, mean: torch.Tensor, factors: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(variance) + factors^T factors), x (N, D), factors (k, D); float64 nats (N,)."""
    return _distribution(mean.double(), factors.double(), variance.double()).log_prob(x.double())


def _fit_params(x: torch.Tensor, ranks: Sequence[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each rank: (mean (D,), factors (rank, D), raw residual variance (D,)) from rows x (N, D), float64.

    The principal directions come from scikit-learn's PCA (one SVD of the N x D rows serves every
    rank). As in probabilistic PCA, each direction carries the variance above the residual level.
    """
    from sklearn.decomposition import PCA

    rows = x.double().numpy()
    n = rows.shape[0]
    mean = torch.from_numpy(rows.mean(0))
    centred = torch.from_numpy(rows) - mean
    fitted = {0: (mean, torch.zeros((0, rows.shape[1]), dtype=torch.float64),
                  centred.pow(2).sum(0) / max(n - 1, 1))}
    top_rank = min(max(ranks, default=0), n - 1)
    if top_rank > 0:
        pca = PCA(n_components=top_rank, svd_solver="full").fit(rows)
        directions = torch.from_numpy(pca.components_)  # (k, D) orthonormal
        eigenvalues = torch.from_numpy(pca.explained_variance_)  # (k,) variance along each direction
        scores = centred @ directions.T  # (N, k)
        for rank in (r for r in ranks if 0 < r <= top_rank):
            residual = centred - scores[:, :rank] @ directions[:rank]
            residual_variance = residual.pow(2).sum(0) / max(n - 1 - rank, 1)
            scale = (eigenvalues[:rank] - residual_variance.mean()).clamp(min=0).sqrt()
            fitted[rank] = (mean, directions[:rank] * scale[:, None], residual_variance)
    return {rank: fitted[rank] for rank in ranks}


def _shrink(variance: torch.Tensor, channels: int, shrinkage: float) -> torch.Tensor:
    """Blend each position's variance with its channel's mean variance (weight ``shrinkage``), then floor it.

    Per-position variances from a few volumes are noisy, and an underestimate costs a lot of
    held-out likelihood; pulling them towards the channel's average is the usual remedy.
    """
    per_position = variance.reshape(channels, -1)
    blended = ((1 - shrinkage) * per_position + shrinkage * per_position.mean(1, keepdim=True)).reshape(-1)
    return blended.clamp(min=VARIANCE_FLOOR + RELATIVE_FLOOR * float(blended.mean()))


def _cross_validate(x: torch.Tensor, channels: int, ranks: Sequence[int], folds: int) -> dict[tuple[int, float], float]:
    """Mean held-out log-likelihood per latent element for each (rank, shrinkage), K-fold over the rows of x."""
    from sklearn.model_selection import KFold

    n, dims = x.shape
    scores = {(rank, shrinkage): 0.0 for rank in ranks for shrinkage in SHRINKAGES}
    for train, test in KFold(n_splits=folds).split(x.numpy()):
        held_out = x[torch.from_numpy(test)]
        for rank, (mean, factors, variance) in _fit_params(x[torch.from_numpy(train)], ranks).items():
            for shrinkage in SHRINKAGES:
                log_prob = _log_prob(held_out, mean, factors, _shrink(variance, channels, shrinkage))
                scores[rank, shrinkage] += float(log_prob.sum())
    return {key: total / (n * dims) for key, total in scores.items()}


def fit_prior(latent_means: torch.Tensor, ranks: Sequence[int] = CANDIDATE_RANKS, folds: int = CV_FOLDS) -> LatentPrior:
    """Fit a LatentPrior to posterior means (N, C, d, h, w) of N training volumes.

    With N >= 4, the rank k in {0} + ``ranks`` (those with k <= N_train - 2 in every fold) and the
    variance shrinkage in SHRINKAGES with the best cross-validated held-out log-likelihood are
    refitted on all N; with fewer volumes, k = 0 and shrinkage DEFAULT_SHRINKAGE.
    """
    if latent_means.ndim != 5 or latent_means.shape[0] < 1:
        raise ValueError(f"fit_prior: need latent means (N, C, d, h, w) with N >= 1, got {tuple(latent_means.shape)}")
    n = int(latent_means.shape[0])
    x = latent_means.reshape(n, -1).float().cpu()
    folds = min(folds, n)
    smallest_train = n - math.ceil(n / folds) if n >= 4 else 0
    candidates = [0] + [int(r) for r in ranks if 0 < r <= smallest_train - 2]
    channels = int(latent_means.shape[1])
    scores = _cross_validate(x, channels, candidates, folds) if n >= 4 else {}
    # Best score; among equals the simplest (lowest rank, then most shrinkage).
    rank, shrinkage = max(scores, key=lambda key: (scores[key], -key[0], key[1])) if scores else (0, DEFAULT_SHRINKAGE)
    mean, factors, variance = _fit_params(x, [rank])[rank]
    variance = _shrink(variance, channels, shrinkage)
    standard = _log_prob(x.double(), torch.zeros_like(mean), factors[:0], torch.ones_like(variance))
    shape = tuple(int(s) for s in latent_means.shape[1:])
    description = {
        "kind": "diagonal" if rank == 0 else "low_rank",
        "rank": rank,
        "variance_shrinkage": shrinkage,
        "latent_shape": list(shape),
        "num_volumes": n,
        "cross_validation": {
            "folds": folds,
            "metric": "held-out log-likelihood of latent means, nats per latent element",
            "scores": {f"rank={r},shrinkage={v:g}": score for (r, v), score in scores.items()},
        },
        "standard_normal_loglik_per_element": float(standard.mean()) / x.shape[1],
    }
    return LatentPrior(mean.reshape(shape), variance.sqrt().reshape(shape), factors.reshape(rank, *shape), description)


def common_latent_shape(shapes: Iterable[Sequence[int]]) -> tuple[int, ...]:
    """Per-axis median (rounded down) of latent grid shapes (C, d, h, w)."""
    stacked = np.asarray([list(s) for s in shapes], dtype=np.int64)
    return tuple(int(v) for v in np.floor(np.median(stacked, axis=0)))


def crop_or_pad(latent: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre-crop or edge-pad a latent grid (C, d, h, w) to ``shape`` (C, d', h', w')."""
    if latent.shape[0] != shape[0]:
        raise ValueError(f"latent channels {latent.shape[0]} differ from the prior's {shape[0]}")
    for axis, target in enumerate(shape[1:], start=1):
        size = latent.shape[axis]
        if size > target:
            start = (size - target) // 2
            latent = latent.narrow(axis, start, target)
        elif size < target:
            before = (target - size) // 2
            pad = [0, 0] * 3
            pad[2 * (3 - axis)], pad[2 * (3 - axis) + 1] = before, target - size - before
            latent = F.pad(latent[None], pad, mode="replicate")[0]
    return latent


def evenly_spaced(count: int, limit: int) -> list[int]:
    """``min(count, limit)`` indices spread evenly over range(count), first and last included."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def fit_prior_to_volumes(model, volumes: Iterable[torch.Tensor], memory_budget: int | None = None,
                         max_elements: int = MAX_ELEMENTS, heldout: Iterable[torch.Tensor] = ()) -> LatentPrior:
    """Encode normalised volumes (1, D, H, W) (posterior means, memory-bounded) and fit a LatentPrior.

    Volumes are padded by the pipeline to multiples of the downsampling factor already. Latent grids
    are brought to their median shape (``crop_or_pad``); beyond ``max_elements`` numbers in all,
    the volumes used are spread evenly over the list (the description says how many).

    The copy check (module doc): every encoded training latent becomes the prior's copy reference,
    and the ``heldout`` volumes (validation, encoded the same way) set its threshold.
    """
    from medvae.inference import encode_volume
    from medvae.prior.sampling import copy_check_settings

    device = next(model.parameters()).device

    def encode(stream: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        means = []
        for volume in stream:
            x = torch.as_tensor(volume).as_subclass(torch.Tensor).float()[None].to(device)
            means.append(encode_volume(model, x, memory_budget=memory_budget).mode()[0].cpu())
        return means

    latents = encode(volumes)
    if not latents:
        raise ValueError("fit_prior: no training volumes to fit the prior to")
    shape = common_latent_shape(latent.shape for latent in latents)
    keep = evenly_spaced(len(latents), max(1, max_elements // int(np.prod(shape))))
    stacked = torch.stack([crop_or_pad(latents[i], shape) for i in keep])
    prior = fit_prior(stacked)
    prior.description.update(
        num_volumes_encoded=len(latents),
        volume_shape=[int(s) * model.downsampling_factor for s in shape[1:]],
        source="posterior means of whole training volumes, latent grids centre-cropped or edge-padded "
               "to their median shape",
    )
    reference = torch.stack([crop_or_pad(latent, shape) for latent in latents])
    heldout_latents = [crop_or_pad(latent, shape) for latent in encode(heldout)]
    try:
        prior.description["copy_check"] = copy_check_settings(
            reference, torch.stack(heldout_latents) if heldout_latents else None)
        prior.copy_reference = reference
    except ValueError as err:  # one training volume and no held-out ones: no threshold can be derived
        prior.description["copy_check"] = {"checked": False, "reason": str(err)}
    return prior


def save_prior(prior: LatentPrior, export_dir: str | os.PathLike) -> Path:
    """Add ``prior.safetensors`` (and the copy reference, if the prior has one) to an export and
    describe it in ``config.json["extra"]["prior"]``.

    Every write is atomic, the config last, so a reader that finds the description finds the files.
    """
    from safetensors.torch import save_file

    from medvae.atomic import atomic_file
    from medvae.export import CONFIG_NAME, model_hash, read_export_config, resolve_export_dir

    directory = resolve_export_dir(export_dir)
    config = read_export_config(directory)
    if prior.copy_reference is not None:
        with atomic_file(directory / COPY_REFERENCE_NAME) as tmp:
            save_file({"latents": prior.copy_reference}, str(tmp), metadata={"format": PRIOR_FORMAT})
    else:  # a stale reference of an earlier prior must not be checked against this one
        (directory / COPY_REFERENCE_NAME).unlink(missing_ok=True)
    tensors = {"mean": prior.mean, "residual_std": prior.residual_std, "factors": prior.factors}
    with atomic_file(directory / PRIOR_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": PRIOR_FORMAT})
    config.setdefault("extra", {})["prior"] = {**prior.description, "file": PRIOR_NAME,
                                               "model_hash": model_hash(directory)}
    with atomic_file(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory / PRIOR_NAME


def load_prior(export_dir: str | os.PathLike) -> LatentPrior | None:
    """The fitted prior of an export (or run) folder, or None when it has none.

    Its copy reference is loaded when the description holds a copy-check threshold and the file is
    there; an export made before copy references were stored, or whose reference was deleted,
    loads without one.
    """
    from safetensors.torch import load_file

    from medvae.export import model_hash, read_export_config, resolve_export_dir

    directory = resolve_export_dir(export_dir)
    description = (read_export_config(directory).get("extra") or {}).get("prior")
    if not description:
        return None
    path = directory / str(description.get("file", PRIOR_NAME))
    if not path.is_file():
        raise ValueError(f"{path}: config.json describes a fitted prior but its file is missing")
    if description.get("model_hash") not in (None, model_hash(directory)):
        raise ValueError(f"{path}: the prior was fitted to other weights than {directory / 'model.safetensors'}")
    reference_path = directory / COPY_REFERENCE_NAME
    reference = None
    if "threshold" in (description.get("copy_check") or {}) and reference_path.is_file():
        if reference_path.is_symlink():
            raise ValueError(f"{reference_path}: the copy reference is a symlink; an export must hold its own files")
        try:
            reference = load_file(str(reference_path))["latents"]
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise ValueError(f"{reference_path}: unreadable copy reference ({' '.join(str(err).split())})") from None
    try:
        tensors = load_file(str(path))
        return LatentPrior(tensors["mean"], tensors["residual_std"], tensors["factors"], dict(description), reference)
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path}: unreadable prior ({' '.join(str(err).split())})") from None


def fit_and_save_prior(model, items: Sequence[dict], data_config, export_dir: str | os.PathLike,
                       max_volumes: int = MAX_VOLUMES, memory_budget: int | None = None,
                       heldout_items: Sequence[dict] = ()) -> LatentPrior:
    """After training: fit the prior to the training volumes and add it to the export.

    ``items``: the training dataset's items, either preprocessed (``image`` a (1, D, H, W) tensor,
    as the memory cache holds them) or datalist rows (``image`` a path, run through the infer
    pipeline). At most ``max_volumes`` of them, evenly spaced, are encoded. ``heldout_items``
    (the validation set's, same forms, at most ``max_volumes``) set the copy check's threshold.
    """
    from medvae.data import build_transforms

    transform = build_transforms(data_config, "infer", model.downsampling_factor)

    def volumes(rows: Sequence[dict]):
        for index in evenly_spaced(len(rows), max_volumes):
            item = rows[index]
            image = item["image"]
            yield image if isinstance(image, torch.Tensor) else transform(dict(item))["image"]

    prior = fit_prior_to_volumes(model, volumes(items), memory_budget=memory_budget,
                                 heldout=volumes(heldout_items or ()))
    save_prior(prior, export_dir)
    return prior
