"""The diagonal Gaussian posterior q(z | x) = N(mean, exp(logvar)).

Everything here runs in float32, whatever autocast is active: the KL is the term that explodes
first under fp16, so mean and logvar are upcast before any exp.
"""

from __future__ import annotations

import math

import torch

# Limits for logvar. exp(10) = 2.2e4 keeps even an fp16 std (exp(5) = 148) finite, and caps the KL
# gradient d KL / d logvar = 0.5 * (exp(logvar) / prior_var - 1) at about 1.1e4 per element.
# exp(-20) is a std of 4.5e-5: far below any useful posterior width.
LOGVAR_MIN = -20.0
LOGVAR_MAX = 10.0


def _clamp_keep_gradient(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp the value, pass the gradient straight through.

    A plain clamp has zero gradient outside [low, high], so a logvar that overshoots gets no signal
    back and stays stuck at the limit. Here the forward value is clamped (nothing overflows) but
    the gradient is the one evaluated at the clamped point, which is bounded and points back.
    """
    return x + (x.clamp(low, high) - x).detach()


class DiagonalGaussian:
    """Posterior of a 3D VAE over a latent grid.

    Args:
        mean: (B, C, d, h, w) posterior mean, any float dtype.
        logvar: (B, C, d, h, w) log-variance, same shape as ``mean``.
    Both are stored in float32; logvar is clamped to [LOGVAR_MIN, LOGVAR_MAX].
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ in shape")
        self.mean = mean.float()
        self.logvar = _clamp_keep_gradient(logvar.float(), LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Reparameterised sample mean + temperature * std * eps, shape (B, C, d, h, w), float32."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + temperature * self.std * noise

    def mode(self) -> torch.Tensor:
        """The posterior mean: the deterministic latent used for embeddings and reconstruction."""
        return self.mean

    def kl_per_element(self, prior_std: float = 1.0) -> torch.Tensor:
        """KL(q || N(0, prior_std^2)) per latent element, (B, C, d, h, w), float32.

        0.5 * (mean^2 / s^2 + exp(logvar) / s^2 - 1 - logvar + log s^2), computed from logvar
        directly (never from log(std**2)) with autocast switched off.
        """
        if not prior_std > 0:
            raise ValueError(f"prior_std must be > 0, got {prior_std}")
        with torch.autocast(device_type=self.mean.device.type, enabled=False):
            prior_logvar = 2.0 * math.log(prior_std)
            inv_prior_var = math.exp(-prior_logvar)
            return 0.5 * (
                self.mean.square() * inv_prior_var
                + torch.exp(self.logvar) * inv_prior_var
                - 1.0
                - self.logvar
                + prior_logvar
            )

    def kl(self, prior_std: float = 1.0) -> torch.Tensor:
        """KL divergence per volume, summed over every non-batch dimension: shape (B,), float32."""
        per_element = self.kl_per_element(prior_std)
        return per_element.flatten(1).sum(dim=1)

    def kl_per_channel(self, prior_std: float = 1.0) -> torch.Tensor:
        """Mean KL per latent element for each channel, shape (B, C), float32 (used by free bits)."""
        return self.kl_per_element(prior_std).flatten(2).mean(dim=2)

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mean.shape)}, device={self.mean.device})"
