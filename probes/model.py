"""The probe: a small time-conditioned vision encoder over pooled denoiser activations and a head
that predicts the (z-scored) evaluator score of the finished image.

Layout (defaults in brackets)::

    features [B, C, P, P] --GroupNorm--> 1x1 conv stem [64]
      -> per width [128, 256]: ResBlock(time scale-shift) -> stride-2 conv  (16 -> 8 -> 4 px)
      -> self-attention over the final grid -> GroupNorm, SiLU
      -> adaptive avg pool to pooled_size^2 [4x4] -> flatten -> MLP -> u [embed_dim=256]
    x0 latent [B, c, S, S] (only when "x0" in inputs; the sampler's x0 prediction pooled to S = x0_size)
      --GroupNorm--> 3x3 conv stem [32] -> per x0 width [64, 128]: ResBlock(time) -> stride-2 conv
      -> GroupNorm, SiLU -> adaptive avg pool to pooled_size^2, + per-channel mean/std of the raw
      latent (the scale GroupNorm removes), + where x0_keypoints maps of the first ResBlock's output
      (full grid) peak (soft-argmax: x, y each; none by default) -> MLP -> u_x0 [embed_dim]
    u = u_act, or u_x0, or Linear(concat[u_act, u_x0]) when the probe reads both (config.inputs)
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

__all__ = ["PROBE_INPUTS", "PROBE_INPUT_CHOICES", "ProbeConfig", "Probe", "build_probe", "parse_probe_inputs",
           "spatial_soft_argmax", "timestep_embedding"]

# The diffusion convention: t in [0, 1] is scaled to [0, 1000] before the sinusoidal embedding so
# that its frequencies cover the same range as in the denoisers the activations come from.
TIMESTEP_SCALE = 1000.0

# What a probe can read, in canonical order: the tapped block's pooled activations and the sampler's
# x0 prediction latent at the checkpoint (free: the denoiser's own output, no VAE decode).
PROBE_INPUTS = ("activations", "x0")
# The choices offered by the training node and command line, as text.
PROBE_INPUT_CHOICES = ("activations", "x0", "activations+x0")
DEFAULT_INPUTS = ("activations",)


def parse_probe_inputs(text: Union[str, tuple, list]) -> tuple[str, ...]:
    """``"activations"``, ``"x0"``, ``"activations+x0"`` (or a sequence of names) as a canonical
    ``inputs`` tuple; ValueError naming the choices for anything else."""
    names = [part.strip() for part in text.split("+")] if isinstance(text, str) else [str(part) for part in text]
    unknown = [name for name in names if name not in PROBE_INPUTS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"probe inputs {text!r} are not valid; choose one of {list(PROBE_INPUT_CHOICES)}")
    return tuple(name for name in PROBE_INPUTS if name in names)


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
        inputs: what the probe reads: ``("activations",)`` (every probe before x0 inputs),
            ``("x0",)`` or ``("activations", "x0")``. With ``"x0"`` only, ``in_channels`` and
            ``feature_size`` still describe the dataset's activations but no layer reads them.
        x0_channels: channels c of the x0 latent (4 for SD1.x/SDXL, 16 for SD3/Flux).
        x0_size: side S the x0 latent is pooled to before the probe reads it.
        x0_stem_width: channels after the x0 branch's 3x3 input conv.
        x0_widths: output channels of each x0 down block (16 -> 8 -> 4 px by default).
        text_film: the text embedding also conditions the encoders' ResBlocks (added to the time
            embedding before their scale-shift), not only the head. Needs ``text_dim > 0``. A head
            that meets the text only after global pooling can't ask "is the red shape left of the
            blue one": the prompt has to steer the encoder while the layout is still spatial. (A config
            may say text_film before its text_dim is known, as a training setting does before the
            dataset fills it in; building the probe checks it.)
        x0_keypoints: how many keypoint maps the x0 branch reads positions from (0: none). Each is a 1x1 conv of
            the first ResBlock's output at the latent's full grid, time- and text-conditioned, read as the
            (x, y) its softmax over positions expects. A relation such as "the red circle left of the blue
            square" compares two such positions, which pooled features only say roughly. (On the proxy world's
            distilled probe they changed nothing: what kept it from the relation was a prompt embedding blind
            to word order; bench/results/distilled_probe.md.)

    The x0 fields and ``text_film`` are left out of :meth:`to_dict` while they keep their defaults, so that a
    config written for an activations-only probe is the same JSON as before they existed.
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
    inputs: tuple[str, ...] = DEFAULT_INPUTS
    x0_channels: int = 4
    x0_size: int = 16
    x0_stem_width: int = 32
    x0_widths: tuple[int, ...] = (64, 128)
    text_film: bool = False
    x0_keypoints: int = 0

    def __post_init__(self) -> None:
        # Accept lists (JSON) and store tuples so that configs compare equal and stay hashable.
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "head_hidden", tuple(self.head_hidden))
        object.__setattr__(self, "x0_widths", tuple(self.x0_widths))
        try:
            object.__setattr__(self, "inputs", parse_probe_inputs(self.inputs))
        except ValueError as error:
            raise ValueError(f"ProbeConfig.inputs: {error}") from None
        positive = ["in_channels", "feature_size", "stem_width", "pooled_size", "embed_dim",
                    "time_embed_dim", "mlp_hidden", "x0_channels", "x0_size", "x0_stem_width"]
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("text_dim", self.text_dim, minimum=0)
        _check_int("x0_keypoints", self.x0_keypoints, minimum=0)
        for name in ("widths", "head_hidden", "x0_widths"):
            for value in getattr(self, name):
                _check_int(f"{name} entry", value, minimum=1)
        if not isinstance(self.attention, bool):
            raise ValueError(f"ProbeConfig.attention must be a bool, got {self.attention!r}")
        if not isinstance(self.text_film, bool):
            raise ValueError(f"ProbeConfig.text_film must be a bool, got {self.text_film!r}")
        if self.time_embed_dim % 2:
            raise ValueError(f"ProbeConfig.time_embed_dim must be even (sin/cos pairs), got {self.time_embed_dim}")

    @property
    def has_text(self) -> bool:
        """Whether the probe has a text branch (and its head reads [u, e, u*e, |u-e|])."""
        return self.text_dim > 0

    @property
    def reads_activations(self) -> bool:
        """Whether the probe reads pooled denoiser activations."""
        return "activations" in self.inputs

    @property
    def reads_x0(self) -> bool:
        """Whether the probe reads the sampler's x0 prediction latent."""
        return "x0" in self.inputs

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        """``(c, S, S)`` of the pooled x0 latent the probe reads."""
        return (self.x0_channels, self.x0_size, self.x0_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples as lists); the x0 fields only when they differ from their defaults."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _OPTIONAL_FIELDS and value == field.default:
                continue
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

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


# Fields added after the first probe files; to_dict leaves them out at their defaults (see ProbeConfig).
_OPTIONAL_FIELDS = ("inputs", "x0_channels", "x0_size", "x0_stem_width", "x0_widths", "text_film", "x0_keypoints")


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


def spatial_soft_argmax(logits: Tensor) -> Tensor:
    """``[B, 2K]``: for each of the ``K`` maps of ``logits [B, K, H, W]``, the (x, y) its softmax over positions
    expects, both in [-1, 1] (grid cell centres; x to the right, y down), x and y of a map side by side."""
    batch, maps, height, width = logits.shape
    weights = logits.flatten(2).softmax(-1).view(batch, maps, height, width)
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=logits.device, dtype=logits.dtype)
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=logits.device, dtype=logits.dtype)
    x = (weights.sum(2) * xs).sum(-1)
    y = (weights.sum(3) * ys).sum(-1)
    return torch.stack([x, y], -1).flatten(1)


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


def _down_blocks(channels: int, widths: tuple[int, ...], time_dim: int) -> tuple[nn.ModuleList, int]:
    """One time-conditioned DownBlock per width, in order; returns them and the output channels."""
    blocks = []
    for width in widths:
        blocks.append(DownBlock(channels, width, time_dim))
        channels = width
    return nn.ModuleList(blocks), channels


class Probe(nn.Module):
    """Predicts the z-scored evaluator score of a candidate from its early activations and/or its
    x0 prediction latent (``config.inputs``).

    No sigmoid on the output: the target is a z-score (unbounded); :func:`probes.scoring.
    score_candidates` maps it back to evaluator units with the probe's fixed normalisation.
    """

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__()
        if config.text_film and not config.has_text:
            raise ValueError("ProbeConfig.text_film needs a text branch: set text_dim to the text embedding's width")
        self.config = config
        # Modules are created in the order of the activations-only probe before x0 inputs existed, so that
        # a seed still gives the same initial weights and parameter order (optimizer states) as then.
        if config.reads_activations:
            # Per-sample standardisation of the input: activation scale drifts with t and between
            # backbones, and GroupNorm never looks at other rows of the batch.
            self.input_norm = nn.GroupNorm(1, config.in_channels)
            # A learned 1x1 channel reduction plays the role of the reference's per-sample PCA.
            self.stem = nn.Conv2d(config.in_channels, config.stem_width, 1)
        self.time_mlp = _mlp([config.time_embed_dim, config.time_embed_dim, config.time_embed_dim])
        if config.reads_activations:
            self.down_blocks, channels = _down_blocks(config.stem_width, config.widths, config.time_embed_dim)
            self.attention = SelfAttention2d(channels) if config.attention else None
            self.out_norm = nn.GroupNorm(_num_groups(channels), channels)
            self.image_mlp = _mlp([channels * config.pooled_size**2, config.mlp_hidden, config.embed_dim])
        if config.reads_x0:
            # Per-sample too; the per-channel mean and std removed here join the pooled vector instead.
            self.x0_norm = nn.GroupNorm(1, config.x0_channels)
            self.x0_stem = nn.Conv2d(config.x0_channels, config.x0_stem_width, 3, padding=1)
            self.x0_blocks, channels = _down_blocks(config.x0_stem_width, config.x0_widths, config.time_embed_dim)
            self.x0_out_norm = nn.GroupNorm(_num_groups(channels), channels)
            self.x0_mlp = _mlp([channels * config.pooled_size**2 + 2 * config.x0_channels + 2 * config.x0_keypoints,
                                config.mlp_hidden, config.embed_dim])
        self.fuse = nn.Linear(2 * config.embed_dim, config.embed_dim) if len(config.inputs) == 2 else None
        # Where the image embedding u leaves the encoder, whatever it reads: the loss hooks it (InfoNCE).
        self.image_embedding = nn.Identity()
        self.text_mlp = _mlp([config.text_dim, config.mlp_hidden, config.embed_dim]) if config.has_text else None
        head_in = 4 * config.embed_dim if config.has_text else config.embed_dim
        self.head = _mlp([head_in, *config.head_hidden, 1])
        # Created last, so that every other module keeps the initial weights a seed gave it before.
        self.text_film = (_mlp([config.text_dim, config.time_embed_dim, config.time_embed_dim])
                          if config.text_film else None)
        self.x0_keypoint_maps = (nn.Conv2d(config.x0_widths[0], config.x0_keypoints, 1)
                                 if config.reads_x0 and config.x0_keypoints else None)

    def _weight(self) -> Tensor:
        """A weight of the probe: its device and dtype are the ones inputs are cast to."""
        return self.time_mlp[0].weight

    def _timesteps(self, t: Union[float, Tensor], batch: int) -> Tensor:
        device = self._weight().device
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() == 1:
            return t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"Probe: t must be a float or have one value per row ({batch}), got {t.numel()} values")
        return t

    def _time_embedding(self, t: Union[float, Tensor], batch: int) -> Tensor:
        weight = self._weight()
        temb = timestep_embedding(self._timesteps(t, batch), self.config.time_embed_dim)
        return self.time_mlp(temb.to(weight.dtype))

    def _conditioning(self, t: Union[float, Tensor], batch: int, text: Optional[Tensor]) -> Tensor:
        """What the ResBlocks' scale-shift reads: the time embedding, plus the text's when ``text_film``."""
        temb = self._time_embedding(t, batch)
        if self.text_film is None:
            return temb
        if text is None:
            raise ValueError("Probe conditions its encoders on the text (config.text_film); pass a text embedding")
        weight = self._weight()
        return temb + self.text_film(self._check_text(text).to(device=weight.device, dtype=weight.dtype))

    def _check_text(self, text: Tensor) -> Tensor:
        if text.ndim != 2 or text.shape[1] != self.config.text_dim:
            raise ValueError(f"Probe expects text [B, {self.config.text_dim}], got {tuple(text.shape)}")
        return text

    def encode(self, features: Tensor, t: Union[float, Tensor], text: Optional[Tensor] = None) -> Tensor:
        """Activation embedding ``u_act [B, embed_dim]`` of ``features [B, C, P, P]`` at checkpoint ``t``
        (``text``: ``[B or 1, text_dim]``, read only when ``config.text_film``)."""
        if not self.config.reads_activations:
            raise ValueError(f"Probe reads {list(self.config.inputs)}, not activations")
        if features is None or features.ndim != 4 or features.shape[1] != self.config.in_channels:
            shape = None if features is None else tuple(features.shape)
            raise ValueError(f"Probe expects features [B, {self.config.in_channels}, P, P], got {shape}")
        weight = self._weight()
        x = features.to(device=weight.device, dtype=weight.dtype)
        temb = self._conditioning(t, x.shape[0], text)
        h = self.stem(self.input_norm(x))
        for block in self.down_blocks:
            h = block(h, temb)
        if self.attention is not None:
            h = self.attention(h)
        h = F.silu(self.out_norm(h))
        h = F.adaptive_avg_pool2d(h, self.config.pooled_size).flatten(1)
        return self.image_mlp(h)

    def encode_x0(self, x0: Tensor, t: Union[float, Tensor], text: Optional[Tensor] = None) -> Tensor:
        """x0 embedding ``u_x0 [B, embed_dim]`` of the pooled x0 latent ``[B, c, S, S]`` (:func:`~.features.pool_x0`;
        ``text`` as in :meth:`encode`)."""
        if not self.config.reads_x0:
            raise ValueError(f"Probe reads {list(self.config.inputs)}, not the x0 latent")
        expected = self.config.x0_shape
        if x0 is None or x0.ndim != 4 or tuple(x0.shape[1:]) != expected:
            shape = None if x0 is None else tuple(x0.shape)
            raise ValueError(f"Probe expects the x0 latent pooled to [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {shape}")
        weight = self._weight()
        x = x0.to(device=weight.device, dtype=weight.dtype)
        temb = self._conditioning(t, x.shape[0], text)
        stats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3), unbiased=False)], dim=1)
        h = self.x0_stem(self.x0_norm(x))
        parts = [stats]
        for i, block in enumerate(self.x0_blocks):
            h = block.res(h, temb)
            if i == 0 and self.x0_keypoint_maps is not None:     # the full grid, already text-conditioned
                parts.append(spatial_soft_argmax(self.x0_keypoint_maps(h)))
            h = block.down(h)
        h = F.silu(self.x0_out_norm(h))
        h = F.adaptive_avg_pool2d(h, self.config.pooled_size).flatten(1)
        return self.x0_mlp(torch.cat([h, *parts], dim=1))

    def embed(self, features: Optional[Tensor], t: Union[float, Tensor], x0: Optional[Tensor] = None,
              text: Optional[Tensor] = None) -> Tensor:
        """Image embedding ``u [B, embed_dim]`` from what the probe reads (``config.inputs``); inputs it
        does not read are ignored (``text`` too, unless ``config.text_film``)."""
        parts = []
        if self.config.reads_activations:
            parts.append(self.encode(features, t, text))
        if self.config.reads_x0:
            if x0 is None:
                raise ValueError("Probe reads the x0 latent (config.inputs includes 'x0'); pass x0")
            parts.append(self.encode_x0(x0, t, text))
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"Probe: {parts[0].shape[0]} feature rows but {parts[1].shape[0]} x0 rows")
        u = self.fuse(torch.cat(parts, dim=-1)) if self.fuse is not None else parts[0]
        return self.image_embedding(u)

    def project_text(self, text: Tensor) -> Tensor:
        """Text embedding ``e [B, embed_dim]`` of ``text [B, text_dim]``."""
        if self.text_mlp is None:
            raise ValueError("Probe has no text branch (config.text_dim == 0)")
        weight = self._weight()
        return self.text_mlp(self._check_text(text).to(device=weight.device, dtype=weight.dtype))

    def forward(self, features: Optional[Tensor], t: Union[float, Tensor], text: Optional[Tensor] = None,
                x0: Optional[Tensor] = None) -> Tensor:
        """Predicted z-scored evaluator score ``[B]`` (float32).

        Args:
            features: ``[B, C, P, P]`` pooled activations (fp16 is fine; cast here); ignored (may be
                None) when the probe does not read activations.
            t: checkpoint fraction in [0, 1], a float or one value per row.
            text: ``[B, text_dim]`` or ``[1, text_dim]`` (shared) text embedding; required when the
                probe has a text branch, must be None otherwise.
            x0: ``[B, c, S, S]`` pooled x0 latent; required when the probe reads x0, ignored otherwise.
        """
        u = self.embed(features, t, x0, text)
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
