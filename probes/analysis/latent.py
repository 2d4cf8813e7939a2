"""Latent probing: spherical interpolation between latents or noises, and semantic directions.

Gaussian noise of dimension d concentrates on a sphere of radius ~sqrt(d): a straight line between
two noises passes through latents of too small a norm (the midpoint of two independent noises has
norm ~sqrt(d / 2)), which samplers turn into washed-out images. Slerp walks along the sphere
instead.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["slerp", "slerp_path", "PARALLEL_EPS", "token_direction", "apply_direction"]

# Angles (radians) closer than this to 0 or pi count as (anti)parallel: sin(omega) ~ 1e-6 would
# amplify float errors by 1e6 in the usual slerp weights.
PARALLEL_EPS = 1e-6


def _orthogonal_unit(unit: Tensor) -> Tensor:
    """A unit vector orthogonal to ``unit`` (1-d), chosen deterministically: the coordinate axis on
    which ``unit`` is smallest, with its ``unit`` component removed."""
    axis = torch.zeros_like(unit)
    axis[int(unit.abs().argmin())] = 1.0
    other = axis - (axis @ unit) * unit
    return other / other.norm()


def _slerp_flat(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Slerp of two 1-d float64 vectors: directions along the great circle, norms linearly."""
    norm_a, norm_b = a.norm(), b.norm()
    if float(norm_a) == 0.0 or float(norm_b) == 0.0:
        return (1.0 - t) * a + t * b              # no direction to follow: plain lerp
    unit_a, unit_b = a / norm_a, b / norm_b
    cos_omega = float((unit_a @ unit_b).clamp(-1.0, 1.0))
    omega = math.acos(cos_omega)
    norm = (1.0 - t) * norm_a + t * norm_b
    if omega < PARALLEL_EPS:                       # same direction: only the norm moves
        return norm * unit_a
    if math.pi - omega < PARALLEL_EPS:
        # Opposite directions: every great half-circle joins them. Take the one through a fixed
        # orthogonal direction, so the path is deterministic and still of constant norm.
        other = _orthogonal_unit(unit_a)
        return norm * (math.cos(math.pi * t) * unit_a + math.sin(math.pi * t) * other)
    sin_omega = math.sin(omega)
    direction = (math.sin((1.0 - t) * omega) * unit_a + math.sin(t * omega) * unit_b) / sin_omega
    return norm * direction


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation between ``a`` and ``b`` (same shape), row by row along dim 0.

    Each row is flattened; its direction follows the great circle from ``a`` to ``b`` and its norm
    goes linearly from ``|a|`` to ``|b|``, so equal norms are kept exactly. ``t = 0`` and ``t = 1``
    return ``a`` and ``b`` themselves (exact ends). Parallel rows reduce to a norm change;
    anti-parallel rows take a fixed great half-circle (see :func:`_orthogonal_unit`). Computed in
    float64 and returned in ``a``'s dtype.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone().to(a.dtype)
    rows_a = a.detach().double().reshape(a.shape[0], -1) if a.ndim > 1 else a.detach().double()[None]
    rows_b = b.detach().double().reshape(rows_a.shape)
    out = torch.stack([_slerp_flat(ra, rb, float(t)) for ra, rb in zip(rows_a, rows_b)])
    return out.reshape(a.shape).to(a.dtype)


def slerp_path(a: Tensor, b: Tensor, count: int) -> Tensor:
    """``count`` points from ``a`` to ``b`` (``t = 0 .. 1`` evenly), stacked along dim 0.

    ``a`` and ``b`` are single items (e.g. ``[C, H, W]`` or ``[1, C, H, W]``); the result is
    ``[count, *item_shape]`` with row 0 equal to ``a`` and row ``count - 1`` equal to ``b``.
    """
    if count < 2:
        raise ValueError(f"slerp_path needs count >= 2 (both ends), got {count}")
    item_a = a[0] if a.ndim > 1 and a.shape[0] == 1 else a
    item_b = b[0] if b.ndim > 1 and b.shape[0] == 1 else b
    return torch.stack([slerp(item_a[None], item_b[None], i / (count - 1))[0] for i in range(count)])


def token_direction(cond_to: Tensor, cond_from: Tensor, mode: str) -> Tensor:
    """The semantic direction ``cond_to - cond_from`` of two prompts' conditionings ``[1, T, D]``.

    mode ``"per_token"`` keeps one difference per token position (both prompts must have the same
    token count, as CLIP-padded prompts do); ``"mean"`` takes the difference of the token means and
    returns it as ``[1, 1, D]``, applicable to any token count (T5 prompts of different lengths).
    """
    if cond_to.shape[-1] != cond_from.shape[-1]:
        raise ValueError(f"the two conditionings have token widths {cond_to.shape[-1]} and {cond_from.shape[-1]}; "
                         f"they must come from the same text encoder")
    if mode == "mean":
        return cond_to.mean(dim=1, keepdim=True) - cond_from.mean(dim=1, keepdim=True)
    if mode != "per_token":
        raise ValueError(f"unknown direction mode {mode!r}; use 'per_token' or 'mean'")
    if cond_to.shape[1] != cond_from.shape[1]:
        raise ValueError(f"per-token directions need prompts of one token count, got {cond_to.shape[1]} and "
                         f"{cond_from.shape[1]}")
    return cond_to - cond_from


def apply_direction(cond: Tensor, direction: Tensor, strengths: Sequence[float]) -> Tensor:
    """``cond + s * direction`` for every strength s, stacked along the batch: ``[len(strengths), T, D]``.

    ``cond`` is ``[1, T, D]``; a per-token ``direction`` must have ``T`` tokens, a mean direction
    ``[1, 1, D]`` is added to every token.
    """
    if direction.shape[1] not in (1, cond.shape[1]):
        raise ValueError(f"a per-token direction of {direction.shape[1]} tokens can't be added to a conditioning "
                         f"of {cond.shape[1]} tokens; use the 'mean' direction")
    base = cond[:1]
    return torch.cat([base + float(s) * direction.to(base) for s in strengths])
