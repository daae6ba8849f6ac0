"""The architecture of a VAE3D: its constructor arguments, validated once, with no torch import.

This dataclass is the model section of the training config as well (``medvae.config.ModelConfig``
derives from it) and is saved as ``config.json`` next to exported weights, so one schema describes
the network everywhere.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional


SHORTCUTS = ("none", "mean", "dct")  # the codes of medvae.models.shortcut


def shortcut_kind(value: Any) -> str:
    """The code named by a ``model.shortcut`` value: one of SHORTCUTS, or a bool as configs and
    exports wrote it before the codes had names (true: ``"mean"``, false: ``"none"``)."""
    if isinstance(value, str) and value.lower() in SHORTCUTS:
        return value.lower()
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return "mean"
    if value is False or value is None or (isinstance(value, str) and value.lower() == "false"):
        return "none"
    raise ValueError(f"shortcut must be one of {', '.join(SHORTCUTS)} (or true/false), got {value!r}")


@dataclass
class VAE3DArchitecture:
    """Everything needed to rebuild a VAE3D; ``ValueError`` naming the field on a bad value."""

    in_channels: int = 1
    out_channels: Optional[int] = None  # None: same as in_channels
    channels: List[int] = field(default_factory=lambda: [32, 64, 64])  # width per level; 2/3/4 levels = x2/x4/x8
    num_res_blocks: int = 1  # residual blocks per level, in the encoder and in the decoder
    latent_channels: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6  # added to the group variance before 1/sqrt
    attention: bool = False  # self-attention at the lowest resolution only
    attention_heads: int = 1
    dropout: float = 0.0  # dropout inside residual blocks (a regulariser against overfitting small sets)
    gradient_checkpointing: bool = False  # recompute residual blocks in backward: less memory, ~30% slower
    recompute_norm: bool = True  # recompute GroupNorm+SiLU in backward: two fewer tensors per block
    channels_last: bool = True  # channels_last_3d memory format (faster conv3d on CPU and GPU)
    # Parameter-free shortcuts (medvae.models.shortcut): the posterior mean gets a fixed code of each
    # f^3 block of the input, the output gets its inverse. "dct": the L lowest-frequency DCT
    # coefficients; "mean": the block mean on every channel; "none". Same weights and compression.
    shortcut: str = "dct"
    # The posterior's log-variance at initialisation (the moments convolution's bias): 0 starts it at
    # the prior's std of 1; below 0 starts it narrower, so the decoder's shortcut is not drowned in
    # posterior noise over the first steps (configs/demo.yaml: -4, posterior std 0.14).
    logvar_init: float = 0.0
    # Std of extra Gaussian noise on the decoder's latent in training mode only (the encoder and
    # inference never see it), in latent units, so the decoder learns to tolerate latents a little off
    # the encoder's, such as a diffusion prior's samples. With a shortcut, whose code is decoded
    # linearly, latent error otherwise reaches the voxels as f^3-block noise; measured at 0.06, the
    # noise of diffusion samples fell from 43 to 38 HU for 1.6 dB of held-out PSNR (benchmarks/
    # RESULTS.md, "Texture, a longer prior, and memorisation"). 0: off.
    latent_noise: float = 0.0

    def __post_init__(self) -> None:
        self.shortcut = shortcut_kind(self.shortcut)
        self.channels = [int(c) for c in self.channels]
        if not 2 <= len(self.channels) <= 4:
            raise ValueError(f"channels: need 2, 3 or 4 levels (downsampling 2, 4 or 8), got {self.channels}")
        if self.norm_num_groups < 1:
            raise ValueError(f"norm_num_groups must be >= 1, got {self.norm_num_groups}")
        for width in self.channels:
            if width < 1 or width % self.norm_num_groups:
                raise ValueError(f"channels: width {width} is not a positive multiple of norm_num_groups {self.norm_num_groups}")
        for name in ("in_channels", "latent_channels", "num_res_blocks", "attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.out_channels is not None and self.out_channels < 1:
            raise ValueError(f"out_channels must be >= 1 or None, got {self.out_channels}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not -10.0 <= self.logvar_init <= 5.0:
            raise ValueError(f"logvar_init must be in [-10, 5] (posterior std 0.007 to 12), got {self.logvar_init}")
        if not 0.0 <= self.latent_noise <= 1.0:
            raise ValueError(f"latent_noise must be in [0, 1] (latent units), got {self.latent_noise}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> Dict[str, Any]:
        """Plain field values (exactly the keyword arguments of ``VAE3D``)."""
        return {f.name: getattr(self, f.name) for f in fields(VAE3DArchitecture)} | {"channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VAE3DArchitecture":
        known = {f.name for f in fields(VAE3DArchitecture)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)
