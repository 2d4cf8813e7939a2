"""A probe distilled from the evaluator's reading of the x0 preview: the preview's ranking, without its decode.

Why: the evaluator run on the decoded x0 preview ranks a prompt's seeds well by the middle of the trajectory, but every
candidate then pays for a VAE decode and an evaluator pass. A probe trained on the finished images' scores alone learns
from one noisy number per row (the seed's future is not in its input yet) and memorises its training prompts. The
evaluator's reading of the preview is a dense label of the probe's own input instead, exact and cheap to make offline
for every recorded x0 latent, and for every flip of it (the teacher reads the flipped latent afresh, so a relation
such as "left of" is relabelled, not broken).

Three steps, each a pure function here (the teacher, which decodes and runs the evaluator, belongs to the caller):

1. :func:`distill_probe`: a :class:`~probes.model.Probe` that reads the x0 latent, its head widened to the teacher's
   ``k`` readings, regresses them (standardised, mean squared error) at every checkpoint at once (the probe is
   time-conditioned); the epoch kept is the one a caller's validation function likes best.
2. :func:`fit_linear_ranker`: a linear ranker over the (predicted) readings, fit to the finished images' scores by a
   pairwise logistic loss within prompts: the readings say what the preview shows, the ranker what of it matters for
   the finished image at that checkpoint.
3. :func:`fold_ranker`: the ranker folded into the head's last layer: an ordinary scalar :class:`Probe` that
   :func:`~probes.io.save_probe` writes and the scoring node runs, one per checkpoint.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import Probe, ProbeConfig, build_probe

__all__ = ["FLIP_VIEWS", "DistillConfig", "LinearRanker", "flip_view", "centre_within_groups", "widen_head",
           "distill_probe", "within_pairs", "fit_pairwise", "fit_linear_ranker", "fold_ranker"]

logger = logging.getLogger(__name__)

# The views of a latent a teacher may label, by index: as stored, mirrored left-right, upside down, both.
FLIP_VIEWS = ((), (-1,), (-2,), (-2, -1))


def flip_view(latent: Tensor, view: int) -> Tensor:
    """``latent [B, c, S, S]`` in view ``view`` of :data:`FLIP_VIEWS`."""
    dims = FLIP_VIEWS[view]
    return torch.flip(latent, dims) if dims else latent


@dataclass(frozen=True)
class DistillConfig:
    """How :func:`distill_probe` trains: AdamW with a one-cycle learning rate over ``epochs`` epochs of
    ``batch_size`` rows; every row is drawn in a random one of the teacher's views each time."""

    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DistillConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"DistillConfig.lr must be > 0, got {self.lr}")


def centre_within_groups(targets: Tensor, groups) -> Tensor:
    """``targets [rows, ...]`` less the mean of their group's rows, element by element (a group: the candidates of
    one prompt at one checkpoint).

    A within-prompt ranking reads only how a prompt's candidates differ; what they share (most of what the prompt
    alone decides) is a per-prompt constant it ignores. Regressing the centred readings spends the loss, and the
    standardisation's scale, on the differences.
    """
    group = torch.as_tensor(groups, dtype=torch.long)
    if group.shape != (targets.shape[0],):
        raise ValueError(f"centre_within_groups: one group per row, got {tuple(group.shape)} for "
                         f"{targets.shape[0]} rows")
    _, member = torch.unique(group, return_inverse=True)
    flat = targets.reshape(targets.shape[0], -1).double()
    sums = torch.zeros(int(member.max()) + 1 if len(member) else 0, flat.shape[1], dtype=torch.float64)
    sums.index_add_(0, member, flat)
    means = sums / torch.bincount(member).double().unsqueeze(1)
    return (flat - means[member]).reshape(targets.shape).to(targets.dtype)


def widen_head(probe: Probe, outputs: int) -> Probe:
    """``probe`` with the last layer of its head replaced by a fresh one of ``outputs`` outputs (in place)."""
    last = probe.head[-1]
    probe.head[-1] = nn.Linear(last.in_features, outputs)
    return probe


def _check_rows(x0: Tensor, t: Tensor, text: Optional[Tensor], targets: Tensor) -> None:
    rows = x0.shape[0]
    if x0.ndim != 4:
        raise ValueError(f"distill_probe: x0 must be [rows, c, S, S], got shape {tuple(x0.shape)}")
    if targets.ndim != 3 or not 1 <= targets.shape[1] <= len(FLIP_VIEWS):
        raise ValueError(f"distill_probe: targets must be [rows, views (1 to {len(FLIP_VIEWS)}), readings], "
                         f"got shape {tuple(targets.shape)}")
    for name, tensor in (("t", t), ("text", text), ("targets", targets)):
        if tensor is not None and tensor.shape[0] != rows:
            raise ValueError(f"distill_probe: {name} has {tensor.shape[0]} rows, x0 has {rows}")


def distill_probe(config: ProbeConfig, x0: Tensor, t: Tensor, text: Optional[Tensor], targets: Tensor,
                  distill: DistillConfig = DistillConfig(),
                  validate: Optional[Callable[[Probe], float]] = None) -> tuple[Probe, list[dict]]:
    """Train a probe reading the x0 latent to predict the teacher's readings of it.

    Args:
        config: the probe's architecture; must read ``"x0"`` only.
        x0: ``[rows, c, S, S]`` x0 latents (every checkpoint's rows together).
        t: ``[rows]`` each row's checkpoint.
        text: ``[rows, text_dim]`` prompt embeddings (None for a probe without a text branch).
        targets: ``[rows, views, k]`` the teacher's readings of each row in each of the first ``views`` of
            :data:`FLIP_VIEWS` (views = 1: no flips).
        validate: called with the probe after every epoch (head still ``k`` wide, eval mode); the epoch with the
            highest value is returned. None: the last epoch.

    Returns the probe with its ``k``-wide head, predicting the readings standardised by their training mean and
    SD (``probe.reading_mean``/``reading_std`` buffers hold them), and one history entry per epoch.
    """
    if config.inputs != ("x0",):
        raise ValueError(f"distill_probe: the probe must read the x0 latent only, not {list(config.inputs)}")
    _check_rows(x0, t, text, targets)
    generator = torch.Generator().manual_seed(distill.seed)
    probe = build_probe(config, seed=distill.seed)
    with torch.random.fork_rng(devices=[]):     # the new layer's initial weights from the seed too
        torch.manual_seed(distill.seed)
        widen_head(probe, targets.shape[-1])
    mean, std = targets[:, 0].mean(0), targets[:, 0].std(0).clamp(min=1e-6)
    probe.register_buffer("reading_mean", mean.float())
    probe.register_buffer("reading_std", std.float())
    standardised = ((targets - mean) / std).float()
    rows, views, batch = x0.shape[0], targets.shape[1], distill.batch_size
    per_epoch = max(1, rows // batch)
    optimiser = torch.optim.AdamW(probe.parameters(), lr=distill.lr / 2, weight_decay=distill.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, distill.lr, total_steps=distill.epochs * per_epoch)
    best, best_state, history = -float("inf"), None, []
    for epoch in range(distill.epochs):
        probe.train()
        order, total = torch.randperm(rows, generator=generator), 0.0
        for step in range(per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            view = torch.randint(0, views, (len(idx),), generator=generator)
            latent = x0[idx].float().clone()
            for v in range(1, views):
                latent[view == v] = flip_view(latent[view == v], v)
            pred = probe(None, t[idx], None if text is None else text[idx], x0=latent)
            loss = F.mse_loss(pred, standardised[idx, view])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach())
        probe.eval()
        entry = {"epoch": epoch, "loss": total / per_epoch}
        if validate is not None:
            entry["validation"] = float(validate(probe))
        history.append(entry)
        logger.info("distill epoch %d: %s", epoch, entry)
        value = entry.get("validation", epoch)
        if value > best:
            best, best_state = value, copy.deepcopy(probe.state_dict())
    probe.load_state_dict(best_state)
    return probe.eval(), history


@dataclass(frozen=True)
class LinearRanker:
    """``score = weights . (readings - mean) / std``: a linear ranker over standardised readings."""

    weights: Tensor
    mean: Tensor
    std: Tensor

    def __call__(self, readings: Tensor) -> Tensor:
        return ((torch.as_tensor(readings, dtype=torch.float64) - self.mean) / self.std) @ self.weights


def within_pairs(target, groups, margin: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Every ordered pair (better, worse) of rows of one group whose targets differ by more than ``margin``: two
    ``[pairs]`` row indices, group by group in sorted order."""
    target, groups = torch.as_tensor(target, dtype=torch.float64), torch.as_tensor(groups)
    better, worse = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for group in torch.unique(groups):
        rows = torch.nonzero(groups == group)[:, 0]
        gap = target[rows][:, None] - target[rows][None, :]
        i, j = torch.nonzero(gap > margin, as_tuple=True)
        better.append(rows[i])
        worse.append(rows[j])
    return torch.cat(better), torch.cat(worse)


def fit_pairwise(net: nn.Module, x: Tensor, better: Tensor, worse: Tensor, steps: int = 300) -> nn.Module:
    """Fit ``net`` (rows ``x [rows, k]`` -> ``[rows, 1]``) so that each ``better`` row outscores its ``worse`` one:
    pairwise logistic loss, full batch, Adam. Returns ``net`` in eval mode."""
    if len(better) == 0:
        raise ValueError("no group has two rows with different targets: nothing to rank")
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        scores = net(x)[:, 0]
        loss = F.softplus(scores[worse] - scores[better]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


def fit_linear_ranker(readings: Tensor, target: Tensor, groups: Tensor, steps: int = 300, seeds: int = 3,
                      margin: float = 1e-3) -> LinearRanker:
    """A :class:`LinearRanker` fit so that, within each group (a prompt's seeds), rows with a higher ``target`` score
    higher (:func:`fit_pairwise` over every pair whose targets differ by more than ``margin``). The weights are the
    mean over ``seeds`` fits (a full-batch fit still depends on its initialisation)."""
    readings = torch.as_tensor(readings, dtype=torch.float64)
    target, groups = torch.as_tensor(target, dtype=torch.float64), torch.as_tensor(groups)
    if readings.ndim != 2 or target.shape != (readings.shape[0],) or groups.shape != target.shape:
        raise ValueError(f"fit_linear_ranker: readings must be [rows, k] with target and groups [rows], got "
                         f"{tuple(readings.shape)}, {tuple(target.shape)}, {tuple(groups.shape)}")
    mean, std = readings.mean(0), readings.std(0).clamp(min=1e-6)
    x = ((readings - mean) / std).float()
    better, worse = within_pairs(target, groups, margin)
    fits = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        layer = fit_pairwise(nn.Linear(x.shape[1], 1), x, better, worse, steps)
        fits.append(layer.weight.detach()[0].double())
    return LinearRanker(torch.stack(fits).mean(0), mean, std)


def fold_ranker(probe: Probe, ranker: LinearRanker, scale: float = 1.0, shift: float = 0.0) -> Probe:
    """A copy of a distilled ``probe`` whose head ends in one output: ``scale * ranker(readings) + shift``, where
    ``readings`` are what the distilled head predicts (in the teacher's units). An ordinary :class:`Probe` (its
    reading buffers dropped) that scores exactly as the ranker on the distilled head's readings. ``scale`` > 0 and
    ``shift`` map the ranker's score to the z-scored evaluator score a probe file promises."""
    if not scale > 0:
        raise ValueError(f"fold_ranker: scale must be > 0 (it would reverse the ranking), got {scale}")
    last = probe.head[-1]
    if ranker.weights.shape != (last.out_features,):
        raise ValueError(f"fold_ranker: the ranker reads {tuple(ranker.weights.shape)} readings, the head predicts "
                         f"{last.out_features}")
    folded = build_probe(probe.config)
    state = {k: v for k, v in probe.state_dict().items() if k not in ("reading_mean", "reading_std")}
    # readings = std_t * (W h + b) + mean_t;  score = scale * w . (readings - mean_r) / std_r + shift
    coef = (scale * ranker.weights / ranker.std).double()
    unit_weight = last.weight.detach().double() * probe.reading_std.double()[:, None]
    unit_bias = last.bias.detach().double() * probe.reading_std.double() + probe.reading_mean.double()
    prefix = f"head.{len(probe.head) - 1}."
    state[prefix + "weight"] = (coef @ unit_weight)[None].float()
    state[prefix + "bias"] = (coef @ (unit_bias - ranker.mean) + shift)[None].float()
    folded.load_state_dict(state)
    return folded.eval()
