"""Denoiser activations turned into probe inputs.

A tapped block yields either a UNet feature map ``[B, C, H, W]`` or DiT image tokens
``[B, L, D]``. Both become a small square map ``[B, C, P, P]`` in :data:`FEATURE_DTYPE`, pooled on
the device that produced them so that only the reduced tensor is copied to the CPU.
:class:`ActivationSet` carries such maps for N candidates together with everything needed to check
that a probe was trained on the same kind of input (backbone family, tap, checkpoint).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoints import checkpoint_index

__all__ = ["FEATURE_DTYPE", "ActivationSet", "ActivationSeries", "pool_feature_map", "pool_x0", "tokens_to_grid"]

# fp16 halves memory and shard size; pooled activations are averages of O(1) values and lose
# nothing the probe can use at this precision.
FEATURE_DTYPE = torch.float16


def pool_feature_map(x: Tensor, size: int) -> Tensor:
    """Reduce a feature map to ``size x size`` by adaptive average pooling.

    Args:
        x: ``[B, C, H, W]`` activations, on any device and in any float dtype.
        size: side ``P`` of the output map.

    Returns:
        ``[B, C, size, size]`` in :data:`FEATURE_DTYPE`, on ``x``'s device.

    Pooling runs in float32 on ``x``'s device (the GPU during sampling), so that fp16/bf16
    activations do not lose precision while being summed and only the small result needs a copy to
    the CPU. Each spatial axis is handled on its own: an axis longer than ``size`` is average
    pooled down to ``size``; an axis shorter than ``size`` (small latents, e.g. a 256 px image) is
    bilinearly upsampled to ``size`` instead, because average pooling cannot grow an axis. An axis
    already of length ``size`` is left as is.
    """
    if x.ndim != 4:
        raise ValueError(f"pool_feature_map expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if size < 1:
        raise ValueError(f"pool_feature_map: size must be >= 1, got {size}")
    height, width = x.shape[-2:]
    x = x.float()
    pooled_hw = (min(height, size), min(width, size))
    if pooled_hw != (height, width):
        x = F.adaptive_avg_pool2d(x, pooled_hw)
    if pooled_hw != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.to(FEATURE_DTYPE)


def pool_x0(latent: Tensor, size: int) -> Tensor:
    """The x0 prediction latent ``[B, c, H, W]`` as a probe reads it: ``[B, c, size, size]`` in
    :data:`FEATURE_DTYPE`, pooled like activations (:func:`pool_feature_map`), so that datasets store
    and scoring feeds the same small map whatever the image size. Video latents ``[B, c, T, H, W]``
    are averaged over time first."""
    if latent.ndim == 5:
        latent = latent.float().mean(dim=2)
    return pool_feature_map(latent, size)


def tokens_to_grid(tokens: Tensor, height: int, width: int) -> Tensor:
    """Reshape DiT image tokens ``[B, L, D]`` to a feature map ``[B, D, height, width]``.

    Tokens are taken in row-major order (the order in which DiTs patchify a latent), so token
    ``i`` lands at row ``i // width``, column ``i % width``. ``height`` and ``width`` are the patch
    grid, i.e. the latent size divided by the patch size.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens_to_grid expects [B, L, D] tokens, got shape {tuple(tokens.shape)}")
    batch, length, dim = tokens.shape
    if length != height * width:
        raise ValueError(
            f"tokens_to_grid: {length} tokens do not fill a {height}x{width} grid "
            f"({height * width} tokens); pass the patch grid of the image tokens only "
            f"(text/register tokens must be removed first)"
        )
    return tokens.transpose(1, 2).reshape(batch, dim, height, width)


@dataclass
class ActivationSet:
    """Pooled activations of N candidates, captured at one checkpoint of one sampling run.

    Attributes:
        features: ``[N, C, P, P]`` pooled activations (:data:`FEATURE_DTYPE`, CPU), one row per
            candidate, conditional branch only.
        family: backbone family the activations come from (e.g. ``"sd2"``, ``"sd3"``).
        tap: path of the tapped block inside the denoiser (e.g. ``"output_blocks.7.0"``).
        step: checkpoint step ``s``: number of sampling steps done when captured.
        steps: total number of sampling steps ``T`` of the schedule.
        sigma: noise level at the checkpoint.
        seeds: seed of each candidate, aligned with the rows of ``features``.
        run_id: identifier shared with the latents of the same run, so that scores can be matched
            to the right candidates.
        text_embedding: ``[N, D]`` or ``[1, D]`` float32 pooled text embedding (one row means the
            same prompt for every candidate), or None.
        pooling: how the activations were reduced to ``P x P``.
        x0: ``[N, c, H, W]`` (video: ``[N, c, T, H, W]``) the sampler's x0 prediction latent (LATENT ``samples``) at this
            checkpoint, one row per candidate, or None. Probes that read x0 pool it themselves
            (:func:`pool_x0`); it costs the sampler nothing, since it is the denoiser output.
    """

    features: Tensor
    family: str
    tap: str
    step: int
    steps: int
    sigma: float
    seeds: list[int]
    run_id: str
    text_embedding: Optional[Tensor] = None
    pooling: str = "adaptive_avg"
    x0: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if not isinstance(self.features, Tensor) or self.features.ndim != 4:
            shape = tuple(self.features.shape) if isinstance(self.features, Tensor) else type(self.features)
            raise ValueError(f"ActivationSet.features must be a [N, C, P, P] tensor, got {shape}")
        self.seeds = [int(seed) for seed in self.seeds]
        if len(self.seeds) != len(self):
            raise ValueError(
                f"ActivationSet has {len(self)} feature rows but {len(self.seeds)} seeds; "
                f"there must be one seed per candidate"
            )
        if self.steps < 1 or not 0 <= self.step <= self.steps:
            raise ValueError(
                f"ActivationSet checkpoint step {self.step} of {self.steps} is invalid; "
                f"need steps >= 1 and 0 <= step <= steps"
            )
        if self.text_embedding is not None:
            text = self.text_embedding
            if text.ndim != 2 or text.shape[0] not in (len(self), 1):
                raise ValueError(
                    f"ActivationSet.text_embedding must be [N, D] with N={len(self)} rows or a "
                    f"single [1, D] row shared by all candidates, got shape {tuple(text.shape)}"
                )
        if self.x0 is not None:
            if not isinstance(self.x0, Tensor) or self.x0.ndim not in (4, 5) or self.x0.shape[0] != len(self):
                shape = tuple(self.x0.shape) if isinstance(self.x0, Tensor) else type(self.x0).__name__
                raise ValueError(f"ActivationSet.x0 must be the [N, c, H, W] x0 latent with N={len(self)} rows, "
                                 f"got {shape}")

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def t(self) -> float:
        """Checkpoint as the fraction of steps done, ``step / steps``."""
        return self.step / self.steps

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """Per-candidate feature shape ``(C, P, P)``."""
        return tuple(int(n) for n in self.features.shape[1:])

    def select(self, indices: Union[Sequence[int], Tensor]) -> "ActivationSet":
        """The candidates at ``indices``, in that order; features, seeds and text rows stay aligned.

        A shared single text row stays shared.
        """
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(f"ActivationSet.select: indices {index.tolist()} out of range for {len(self)} candidates")
        text = self.text_embedding
        if text is not None and text.shape[0] == len(self):
            text = text[index]
        return dataclasses.replace(
            self,
            features=self.features[index],
            seeds=[self.seeds[i] for i in index.tolist()],
            text_embedding=text,
            x0=None if self.x0 is None else self.x0[index],
        )


@dataclass
class ActivationSeries:
    """Activations of one run at several checkpoints (for datasets and quality-versus-t studies).

    Every member shares the run, the candidates and the tap; they differ only in the step.
    """

    sets: tuple

    def __post_init__(self) -> None:
        self.sets = tuple(sorted(self.sets, key=lambda s: s.step))
        if not self.sets:
            raise ValueError("ActivationSeries needs at least one ActivationSet")
        first = self.sets[0]
        for other in self.sets[1:]:
            if (other.run_id, other.seeds, other.tap, other.family) != (first.run_id, first.seeds, first.tap,
                                                                         first.family):
                raise ValueError("ActivationSeries members must come from one run, one tap and the same candidates")

    def __len__(self) -> int:
        return len(self.sets[0])

    @property
    def checkpoints(self) -> list[float]:
        return [s.t for s in self.sets]

    @property
    def run_id(self) -> str:
        return self.sets[0].run_id

    @property
    def seeds(self) -> list[int]:
        return self.sets[0].seeds

    def at(self, t: float) -> ActivationSet:
        """The member recorded at the stored checkpoint for ``t`` (:func:`.checkpoints.checkpoint_index`).

        Raises:
            CheckpointError: if no member is within the tolerance of ``t``.
        """
        return self.sets[checkpoint_index([s.t for s in self.sets], t)]

    def select(self, indices) -> "ActivationSeries":
        return ActivationSeries(tuple(s.select(indices) for s in self.sets))
