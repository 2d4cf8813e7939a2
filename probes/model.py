"""The probe: a small time-conditioned vision encoder over pooled denoiser activations and a head
that predicts the (z-scored) evaluator score of the finished image.

Layout (defaults in brackets)::

    features [B, C, P, P] --GroupNorm--> 1x1 conv stem [64]
      -> per width [128, 256]: ResBlock(time scale-shift) -> stride-2 conv  (16 -> 8 -> 4 px)
      -> self-attention over the final grid -> GroupNorm, SiLU
      -> adaptive avg pool to pooled_size^2 [4x4] -> flatten -> MLP -> u [embed_dim=256]
    text [B, text_dim] -> MLP -> e [embed_dim]                       (only when text_dim > 0)
    head: MLP over u, or over concat[u, e, u*e, |u-e|] -> score [B]

Every layer works on one row at a time (GroupNorm only; no BatchNorm or other batch statistics),
so a candidate's score never depends on which other candidates share its batch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ProbeConfig", "Probe", "build_probe", "timestep_embedding"]

# The diffusion convention: t in [0, 1] is scaled to [0, 1000] before the sinusoidal embedding so
# that its frequencies cover the same range as in the denoisers the activations come from.
TIMESTEP_SCALE = 1000.0


@dataclass(frozen=True)
class ProbeConfig:
    """Architecture of a :class:`Probe`; stored in every probe file, so a file rebuilds its model.

    Attributes:
        in_channels: channels C of the pooled activations.
        feature_size: side P of the pooled activations the probe is trained on.
        stem_width: channels after the 1x1 input projection.
        widths: output channels of each down block (ResBlock + stride-2 downsample).
        attention: one self-attention layer over the final grid.
        pooled_size: side of the adaptive average pool before flattening.
        embed_dim: size of the image embedding u (and of the text embedding e).
        time_embed_dim: size of the timestep embedding.
        text_dim: width of the text embedding read by the text branch; 0 = no text branch.
        head_hidden: hidden sizes of the score head.
        mlp_hidden: hidden size of the image and text MLPs that produce u and e.
    """

    in_channels: int
    feature_size: int = 16
    stem_width: int = 64
    widths: tuple[int, ...] = (128, 256)
    attention: bool = True
    pooled_size: int = 4
    embed_dim: int = 256
    time_embed_dim: int = 128
    text_dim: int = 0
    head_hidden: tuple[int, ...] = (512, 256)
    mlp_hidden: int = 512

    def __post_init__(self) -> None:
        # Accept lists (JSON) and store tuples so that configs compare equal and stay hashable.
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "head_hidden", tuple(self.head_hidden))
        positive = ["in_channels", "feature_size", "stem_width", "pooled_size", "embed_dim",
                    "time_embed_dim", "mlp_hidden"]
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("text_dim", self.text_dim, minimum=0)
        for name in ("widths", "head_hidden"):
            for value in getattr(self, name):
                _check_int(f"{name} entry", value, minimum=1)
        if not isinstance(self.attention, bool):
            raise ValueError(f"ProbeConfig.attention must be a bool, got {self.attention!r}")
        if self.time_embed_dim % 2:
            raise ValueError(f"ProbeConfig.time_embed_dim must be even (sin/cos pairs), got {self.time_embed_dim}")

    @property
    def has_text(self) -> bool:
        """Whether the probe has a text branch (and its head reads [u, e, u*e, |u-e|])."""
        return self.text_dim > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples as lists)."""
        return {
            field.name: list(value) if isinstance(value, tuple) else value
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProbeConfig":
        """Inverse of :meth:`to_dict`. Unknown keys are an error: they mean a newer or foreign
        config whose architecture this code cannot rebuild faithfully."""
        if not isinstance(data, Mapping):
            raise ValueError(f"ProbeConfig.from_dict expects a mapping, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"ProbeConfig has no field(s) {unknown}; known fields are {sorted(known)}. "
                f"The config was probably written by a newer version of Probe-Select."
            )
        if "in_channels" not in data:
            raise ValueError("ProbeConfig.from_dict: 'in_channels' is required")
        return cls(**dict(data))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ProbeConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _num_groups(channels: int) -> int:
    """Group count for GroupNorm: 32 as in diffusion UNets when the width allows, but never fewer
    than 4 channels per group, since a one-channel group would erase each channel's mean."""
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0 and channels // groups >= 4:
            return groups
    return 1


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of ``t * 1000`` (float32), as in diffusion UNets:
    ``[cos(t' * f_k), sin(t' * f_k)]`` with ``f_k = 10000^(-k / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * TIMESTEP_SCALE)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.SiLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on the time embedding.

    The time embedding enters as a per-channel scale and shift right after the second GroupNorm
    (ADM's scale-shift norm) rather than as a bias before it: GroupNorm subtracts the group mean,
    which would remove most of an additive per-channel bias.
    """

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_num_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_embed_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(_num_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class DownBlock(nn.Module):
    """ResBlock followed by a stride-2 3x3 conv that halves the grid."""

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, time_embed_dim)
        self.down = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.down(self.res(x, temb))


class SelfAttention2d(nn.Module):
    """Residual multi-head self-attention over the positions of a feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # 64-wide heads as in most UNets; a single head when the width is not a multiple of 64.
        heads = channels // 64 if channels % 64 == 0 else 1
        self.norm = nn.GroupNorm(_num_groups(channels), channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        h, _ = self.attn(h, h, h, need_weights=False)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class Probe(nn.Module):
    """Predicts the z-scored evaluator score of a candidate from its early activations.

    No sigmoid on the output: the target is a z-score (unbounded); :func:`probes.scoring.
    score_candidates` maps it back to evaluator units with the probe's fixed normalisation.
    """

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__()
        self.config = config
        # Per-sample standardisation of the input: activation scale drifts with t and between
        # backbones, and GroupNorm never looks at other rows of the batch.
        self.input_norm = nn.GroupNorm(1, config.in_channels)
        # A learned 1x1 channel reduction plays the role of the reference's per-sample PCA.
        self.stem = nn.Conv2d(config.in_channels, config.stem_width, 1)
        self.time_mlp = _mlp([config.time_embed_dim, config.time_embed_dim, config.time_embed_dim])
        channels = config.stem_width
        blocks = []
        for width in config.widths:
            blocks.append(DownBlock(channels, width, config.time_embed_dim))
            channels = width
        self.down_blocks = nn.ModuleList(blocks)
        self.attention = SelfAttention2d(channels) if config.attention else None
        self.out_norm = nn.GroupNorm(_num_groups(channels), channels)
        self.image_mlp = _mlp([channels * config.pooled_size**2, config.mlp_hidden, config.embed_dim])
        self.text_mlp = _mlp([config.text_dim, config.mlp_hidden, config.embed_dim]) if config.has_text else None
        head_in = 4 * config.embed_dim if config.has_text else config.embed_dim
        self.head = _mlp([head_in, *config.head_hidden, 1])

    def _timesteps(self, t: Union[float, Tensor], batch: int) -> Tensor:
        device = self.stem.weight.device
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() == 1:
            return t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"Probe: t must be a float or have one value per row ({batch}), got {t.numel()} values")
        return t

    def encode(self, features: Tensor, t: Union[float, Tensor]) -> Tensor:
        """Image embedding ``u [B, embed_dim]`` of ``features [B, C, P, P]`` at checkpoint ``t``."""
        if features.ndim != 4 or features.shape[1] != self.config.in_channels:
            raise ValueError(
                f"Probe expects features [B, {self.config.in_channels}, P, P], got {tuple(features.shape)}"
            )
        weight = self.stem.weight
        x = features.to(device=weight.device, dtype=weight.dtype)
        temb = timestep_embedding(self._timesteps(t, x.shape[0]), self.config.time_embed_dim)
        temb = self.time_mlp(temb.to(weight.dtype))
        h = self.stem(self.input_norm(x))
        for block in self.down_blocks:
            h = block(h, temb)
        if self.attention is not None:
            h = self.attention(h)
        h = F.silu(self.out_norm(h))
        h = F.adaptive_avg_pool2d(h, self.config.pooled_size).flatten(1)
        return self.image_mlp(h)

    def project_text(self, text: Tensor) -> Tensor:
        """Text embedding ``e [B, embed_dim]`` of ``text [B, text_dim]``."""
        if self.text_mlp is None:
            raise ValueError("Probe has no text branch (config.text_dim == 0)")
        if text.ndim != 2 or text.shape[1] != self.config.text_dim:
            raise ValueError(f"Probe expects text [B, {self.config.text_dim}], got {tuple(text.shape)}")
        weight = self.stem.weight
        return self.text_mlp(text.to(device=weight.device, dtype=weight.dtype))

    def forward(self, features: Tensor, t: Union[float, Tensor], text: Optional[Tensor] = None) -> Tensor:
        """Predicted z-scored evaluator score ``[B]`` (float32).

        Args:
            features: ``[B, C, P, P]`` pooled activations (fp16 is fine; cast here).
            t: checkpoint fraction in [0, 1], a float or one value per row.
            text: ``[B, text_dim]`` or ``[1, text_dim]`` (shared) text embedding; required when the
                probe has a text branch, must be None otherwise.
        """
        u = self.encode(features, t)
        if self.text_mlp is None:
            if text is not None:
                raise ValueError("Probe has no text branch (config.text_dim == 0) but a text embedding was given")
            head_in = u
        else:
            if text is None:
                raise ValueError(f"Probe has a text branch (text_dim={self.config.text_dim}); pass a text embedding")
            e = self.project_text(text)
            if e.shape[0] == 1:
                e = e.expand_as(u)
            elif e.shape[0] != u.shape[0]:
                raise ValueError(f"Probe: {e.shape[0]} text rows for {u.shape[0]} feature rows")
            head_in = torch.cat([u, e, u * e, (u - e).abs()], dim=-1)
        return self.head(head_in).squeeze(-1).float()


def build_probe(config: ProbeConfig, seed: int = 0) -> Probe:
    """A freshly initialised :class:`Probe`; the same ``seed`` gives identical weights.

    The global RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Probe(config)
