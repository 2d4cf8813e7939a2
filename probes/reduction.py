"""Channel reduction of pooled activations, applied when a dataset is written and again, identically,
before a probe trained on that data scores live activations.

One row of the default SD1.5 tap is 640 x 16 x 16 fp16 (328 KB) per checkpoint; the paper stores 48
channels instead. A :class:`ChannelReduction` says how ``[C, P, P]`` became ``[k, P, P]``:

* ``"none"``: stored as tapped.
* ``"pca"``: per-sample PCA. Each map's ``P*P`` positions are the observations and its ``C`` channels
  the variables; the positions are centred (each channel's spatial mean removed) and projected on
  the map's own top-``k`` principal directions, so output channel ``j`` is the map of the ``j``-th
  component's scores. Nothing is fitted on the dataset: every sample carries its own basis, so the
  reduction needs no stored state and reads a live candidate exactly as it read a stored row.
  Principal directions are only defined up to order and sign; here components come in order of
  decreasing variance (singular value; ties have probability zero with real data), and each
  direction's sign is chosen so that the sum of the cubes of its channel loadings is positive
  (its heaviest loadings point the positive way; a smooth rule, so near-identical directions of
  two samples get the same sign, unlike a rule on the single largest loading). An exactly zero sum
  falls back to the sign of the first non-zero loading. The spatial mean of every channel is
  removed by the centring: the reduced rows describe layout, not overall offsets.
* ``"projection"``: a fixed random orthonormal ``C x k`` matrix, the same for every sample, drawn
  from a seed (NumPy's legacy ``RandomState`` Gaussian stream, which NumPy keeps frozen across
  releases, then orthonormalised by QR with the signs of ``R``'s diagonal made positive). It is
  identified by its seed and shape and a digest of the Gaussian draw, so a probe and a dataset
  made on another machine are checked to use the very same matrix.

Both kinds compute in float64 on the CPU, one sample at a time, and return float16: a candidate's
reduced features do not depend on which other candidates share its batch, on the device, or on
whether it is reduced while a dataset is written or while a probe scores it.

The reduction is recorded in the dataset manifest (``reduction``) and in the probe file
(``channel_reduction``); the probe's ``feature_shape`` is the reduced ``(k, P, P)`` and
``in_channels`` the tapped ``C``. Scoring applies it to the live activations
(:func:`~.scoring.score_candidates`), so nobody applies it by hand.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from .features import FEATURE_DTYPE

__all__ = ["REDUCTION_KINDS", "ChannelReduction", "NO_REDUCTION", "pca_directions", "projection_matrix"]

REDUCTION_KINDS = ("none", "pca", "projection")
# Identifies the generator behind "projection" matrices; part of the digest, so a change of
# generator can never silently pair a probe with data projected another way.
PROJECTION_GENERATOR = "numpy.RandomState.standard_normal/qr-positive-diagonal"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ChannelReduction:
    """How stored (and scored) features were reduced from ``in_channels`` to ``channels`` channels.

    Attributes:
        kind: ``"none"``, ``"pca"`` (per-sample principal components) or ``"projection"`` (a fixed
            seeded random orthonormal projection).
        channels: k, the channels kept (0 for ``"none"``).
        in_channels: C, the channels of the tapped activations (0 for ``"none"``).
        seed: the projection's seed (0 and unused otherwise).
        digest: for ``"projection"``, the first 16 hex digits of the SHA-256 of the generator name,
            the shape, the seed and the Gaussian draw (set by :meth:`create`, checked on load).

    Build one with :meth:`create`; :data:`NO_REDUCTION` is the identity.
    """

    kind: str = "none"
    channels: int = 0
    in_channels: int = 0
    seed: int = 0
    digest: str = ""

    def __post_init__(self) -> None:
        if self.kind not in REDUCTION_KINDS:
            raise ValueError(f"channel reduction kind must be one of {list(REDUCTION_KINDS)}, got {self.kind!r}")
        for name in ("channels", "in_channels", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"ChannelReduction.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.kind == "none":
            if (self.channels, self.in_channels, self.seed, self.digest) != (0, 0, 0, ""):
                raise ValueError("ChannelReduction 'none' takes no channels, in_channels, seed or digest")
            return
        if not 1 <= self.channels <= self.in_channels:
            raise ValueError(
                f"channel reduction {self.kind}: cannot keep {self.channels} of {self.in_channels} channels; "
                f"pick between 1 and {self.in_channels}"
            )
        if self.kind == "pca":
            if self.seed or self.digest:
                raise ValueError("ChannelReduction 'pca' takes no seed or digest (it has no stored state)")
        elif self.digest != _projection_digest(self.in_channels, self.channels, self.seed):
            raise ValueError(
                f"channel reduction projection (seed {self.seed}, {self.in_channels} -> {self.channels}) has digest "
                f"{self.digest!r}, but this Probe-Select draws that projection with digest "
                f"{_projection_digest(self.in_channels, self.channels, self.seed)!r}: the data or probe was made "
                f"with another projection. Re-collect the data (or retrain the probe) with this version."
            )

    @classmethod
    def create(cls, kind: str, channels: int = 0, in_channels: int = 0, seed: int = 0) -> "ChannelReduction":
        """A reduction of ``kind`` from ``in_channels`` to ``channels`` (``"none"`` ignores the numbers)."""
        if kind == "none":
            return NO_REDUCTION
        if kind == "projection":
            if not (_is_int(channels) and _is_int(in_channels) and _is_int(seed)) or min(channels, in_channels, seed) < 0:
                raise ValueError(f"ChannelReduction.create: channels, in_channels and seed must be ints >= 0, got "
                                 f"{channels!r}, {in_channels!r}, {seed!r}")
            if not 1 <= channels <= in_channels:
                raise ValueError(f"channel reduction projection: cannot keep {channels} of {in_channels} channels; "
                                 f"pick between 1 and {in_channels}")
            return cls(kind, channels, in_channels, seed, _projection_digest(in_channels, channels, seed))
        return cls(kind, channels, in_channels)

    @property
    def active(self) -> bool:
        """Whether features are reduced at all."""
        return self.kind != "none"

    def describe(self) -> str:
        """One line for messages and reports, e.g. ``"per-sample PCA 640 -> 48 channels"``."""
        if self.kind == "pca":
            return f"per-sample PCA {self.in_channels} -> {self.channels} channels"
        if self.kind == "projection":
            return f"random projection {self.in_channels} -> {self.channels} channels (seed {self.seed}, {self.digest})"
        return "none (channels as tapped)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "ChannelReduction":
        """Inverse of :meth:`to_dict`; None means no reduction. Raises ValueError for anything else."""
        if data is None:
            return NO_REDUCTION
        if isinstance(data, ChannelReduction):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"channel reduction must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"channel reduction has unknown fields {unknown} (written by a newer Probe-Select?)")
        return cls(**dict(data))

    def input_shape(self, feature_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The tapped ``(C, P, P)`` that reduces to ``feature_shape`` (itself when not reduced)."""
        if not self.active:
            return tuple(feature_shape)
        return (self.in_channels, *tuple(feature_shape)[1:])

    def output_shape(self, feature_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(k, P, P)`` for tapped features of ``feature_shape``; ValueError if they can't be reduced."""
        shape = tuple(int(n) for n in feature_shape)
        if not self.active:
            return shape
        if shape[0] != self.in_channels:
            raise ValueError(f"{self.describe()} needs {self.in_channels}-channel features, got {shape[0]} channels "
                             f"(shape {shape})")
        positions = shape[1] * shape[2]
        if self.kind == "pca" and self.channels > positions - 1:
            raise ValueError(
                f"per-sample PCA of a {shape[1]}x{shape[2]} map has at most {positions - 1} components (its "
                f"{positions} positions, centred), fewer than the {self.channels} asked for; keep at most "
                f"{positions - 1} channels or pool to a larger feature size"
            )
        return (self.channels, *shape[1:])

    def apply(self, features: Tensor) -> Tensor:
        """Reduce ``[..., C, P, P]`` features to ``[..., k, P, P]`` float16 on the CPU.

        Each ``[C, P, P]`` map is reduced on its own in float64 (see the module docstring), so the
        result for one sample never depends on the others in the tensor.
        """
        if not self.active:
            return features
        if features.ndim < 3:
            raise ValueError(f"channel reduction expects [..., C, P, P] features, got shape {tuple(features.shape)}")
        out_shape = self.output_shape(tuple(features.shape[-3:]))
        lead = tuple(features.shape[:-3])
        c, p, q = features.shape[-3:]
        maps = features.detach().to("cpu", torch.float64).reshape(-1, c, p * q)
        out = torch.empty(maps.shape[0], self.channels, p * q, dtype=FEATURE_DTYPE)
        matrix = projection_matrix(self.in_channels, self.channels, self.seed) if self.kind == "projection" else None
        for i in range(maps.shape[0]):
            positions = maps[i].T                                   # [P*P, C]: positions are the observations
            if matrix is None:
                centred = positions - positions.mean(dim=0, keepdim=True)
                reduced = centred @ pca_directions(centred, self.channels)
            else:
                reduced = positions @ matrix
            out[i] = reduced.T.to(FEATURE_DTYPE)
        return out.reshape(*lead, *out_shape)


NO_REDUCTION = ChannelReduction()


def pca_directions(centred: Tensor, k: int) -> Tensor:
    """``[C, k]`` top-``k`` principal directions of ``centred`` ``[n, C]`` (observations x variables).

    Columns are ordered by decreasing variance; each column's sign makes the sum of the cubes of its
    entries positive (an exactly zero sum: the first non-zero entry positive). Computed from the
    eigenvectors of the smaller of the two Gram matrices (``n x n`` for a 16x16 map of 640
    channels), which is several times cheaper than an SVD of ``centred`` and as exact in float64
    for the leading components.
    """
    n, c = centred.shape
    if n < c:
        values, vectors = torch.linalg.eigh(centred @ centred.T)           # ascending
        top = torch.flip(torch.arange(n), dims=[0])[:k]
        directions = centred.T @ vectors[:, top]                             # [C, k], norms = singular values
        norms = directions.norm(dim=0)
        directions = torch.where(norms > 0, directions / norms.clamp_min(torch.finfo(centred.dtype).tiny), 0.0)
    else:
        values, vectors = torch.linalg.eigh(centred.T @ centred)
        directions = vectors[:, torch.flip(torch.arange(c), dims=[0])[:k]]
    skew = (directions ** 3).sum(dim=0)
    first_nonzero = directions.gather(0, (directions != 0).int().argmax(dim=0, keepdim=True)).squeeze(0)
    sign = torch.where(skew != 0, torch.sign(skew), torch.sign(first_nonzero))
    sign[sign == 0] = 1.0
    return directions * sign


@functools.lru_cache(maxsize=16)
def _projection(in_channels: int, channels: int, seed: int) -> tuple[Tensor, str]:
    gaussian = np.random.RandomState(seed).standard_normal((in_channels, channels))       # float64, frozen stream
    digest = hashlib.sha256()
    digest.update(f"{PROJECTION_GENERATOR}\x00{in_channels}\x00{channels}\x00{seed}\x00".encode())
    digest.update(np.ascontiguousarray(gaussian, dtype="<f8").tobytes())
    q, r = torch.linalg.qr(torch.from_numpy(gaussian))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).contiguous(), digest.hexdigest()[:16]


def projection_matrix(in_channels: int, channels: int, seed: int) -> Tensor:
    """The ``[in_channels, channels]`` float64 orthonormal projection of ``seed`` (a copy)."""
    return _projection(in_channels, channels, seed)[0].clone()


def _projection_digest(in_channels: int, channels: int, seed: int) -> str:
    if not 1 <= channels <= in_channels:
        return ""
    return _projection(in_channels, channels, seed)[1]
