"""Training losses of the probe: listwise ranking within a prompt, text alignment, and Pearson.

All functions here are pure: tensors in, a scalar tensor out, no state and no randomness. Scores
and targets are z-scored evaluator scores; ``group`` gives the prompt of each row (rows with the
same id are seeds of one prompt), because selection only ever compares seeds of one prompt.

Loss of one batch (:func:`combined_loss`)::

    L = L_rank(pred, y; tau, alpha)
        + lambda_align   * L_InfoNCE(u, e_p)      (probe with a text branch, text given)
        + lambda_pearson * (1 - Pearson(pred, y)) (optional; the reference used weight 10)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import Probe

__all__ = [
    "listwise_ranking_loss",
    "anneal",
    "info_nce_loss",
    "pearson_loss",
    "LossTerms",
    "combined_loss",
    "ProbeLoss",
]


def _check_rows(name: str, **tensors: Tensor) -> int:
    sizes = {key: tuple(value.shape) for key, value in tensors.items()}
    rows = {shape[0] if shape else None for shape in sizes.values()}
    if len(rows) != 1 or None in rows:
        raise ValueError(f"{name}: inputs must share their first dimension, got shapes {sizes}")
    return rows.pop()


def listwise_ranking_loss(pred: Tensor, target: Tensor, group: Tensor, tau: float, alpha: float,
                          top_weight: float = 0.0) -> Tensor:
    """Listwise ranking loss within prompts, with a margin, optionally weighted toward each prompt's best rows.

    With ``s = pred / tau`` and, for each row i, the comparison set
    ``S_i = {i} U {j : group_j == group_i and y_j + alpha < y_i}`` (i and the rows of its prompt that
    are clearly worse than i)::

        l_i  = -(s_i - logsumexp_{j in S_i} s_j)  =  -log softmax_{S_i}(s)_i   (>= 0)
        loss = (1 / B) * sum_i l_i

    ``l_i`` is small when i outscores every row of its prompt that is worse than it by more than
    ``alpha``. A row whose set is only ``{i}`` (the worst of its prompt, a single-row prompt, or
    every other row within the margin) has ``l_i = 0`` exactly and still counts in the mean: the
    mean is over all B rows, so the loss scale does not jump when the margin empties some sets.

    With ``top_weight = g > 0`` the mean is weighted: row i of prompt p weighs
    ``w_i = |p| * exp(g * y_i) / sum_{j in p} exp(g * y_j)`` (a prompt's weights still sum to its row count). Seed
    selection keeps the best few candidates, so what counts is that the best rows outscore the rest; the
    unweighted loss spends most of its gradient ordering a prompt's failures among themselves. ``g = 0`` is the
    unweighted loss exactly.

    Args:
        pred: ``[B]`` predicted (z-scored) scores.
        target: ``[B]`` z-scored evaluator scores y.
        group: ``[B]`` integer prompt id of each row.
        tau: temperature (> 0); smaller values sharpen the softmax.
        alpha: margin in target units (>= 0).
        top_weight: g above (>= 0), in inverse target units.

    Returns:
        Scalar tensor (float32, or pred's dtype if wider).
    """
    if tau <= 0:
        raise ValueError(f"listwise_ranking_loss: tau must be > 0, got {tau}")
    if alpha < 0:
        raise ValueError(f"listwise_ranking_loss: alpha must be >= 0, got {alpha}")
    if not top_weight >= 0:
        raise ValueError(f"listwise_ranking_loss: top_weight must be >= 0, got {top_weight}")
    _check_rows("listwise_ranking_loss", pred=pred, target=target, group=group)
    if pred.ndim != 1:
        raise ValueError(f"listwise_ranking_loss: pred must be [B], got {tuple(pred.shape)}")
    s = pred.float() / tau
    y = target.to(device=s.device, dtype=torch.float32)
    g = group.to(s.device)
    same = g[:, None] == g[None, :]
    worse = y[None, :] + alpha < y[:, None]  # [i, j]: y_j + alpha < y_i
    members = (same & worse) | torch.eye(len(s), dtype=torch.bool, device=s.device)
    logits = s[None, :].expand(len(s), -1).masked_fill(~members, -math.inf)
    losses = torch.logsumexp(logits, dim=1) - s
    if top_weight == 0:
        return losses.mean()
    # w_i = |p| * softmax_{j in p}(g * y)_i, row by row over the same-prompt mask (max-shifted per prompt).
    z = top_weight * y
    shifted = z - z[None, :].expand(len(z), -1).masked_fill(~same, -math.inf).amax(dim=1)
    weights = same.sum(dim=1) * torch.exp(shifted) / (same * torch.exp(shifted)[None, :]).sum(dim=1)
    return (weights * losses).mean()


def anneal(epoch: int, epochs: int, alpha_max: float, tau_min: float = 0.1) -> tuple[float, float]:
    """Temperature and margin of the ranking loss at ``epoch`` (0-based) of ``epochs``::

        tau   = max(1 - e / E, tau_min)
        alpha = alpha_max * (1 - e / E)

    The first epoch (e = 0) has ``tau = 1`` and ``alpha = alpha_max``; the last (e = E - 1) has
    ``tau = max(1/E, tau_min)`` and ``alpha = alpha_max / E``.
    """
    if epochs < 1:
        raise ValueError(f"anneal: epochs must be >= 1, got {epochs}")
    if not 0 <= epoch < epochs:
        raise ValueError(f"anneal: epoch must be in [0, {epochs}), got {epoch}")
    remaining = 1.0 - epoch / epochs
    return max(remaining, tau_min), alpha_max * remaining


def info_nce_loss(u: Tensor, text: Tensor, group: Tensor, temperature: float = 0.07) -> Tensor:
    """Multi-positive InfoNCE between image embeddings and projected text embeddings.

    With cosine similarities ``S_ij = cos(u_i, e_j) / temperature`` over the batch (``e`` are the
    projected text embeddings) and the positives of row i ``P_i = {j : group_j == group_i}`` (all
    rows of the same prompt share its caption, so they all match; this includes j = i)::

        l_i  = -log( sum_{j in P_i} softmax_j(S_i)_j )
             = logsumexp_j S_ij - logsumexp_{j in P_i} S_ij
        loss = (1 / B) * sum_i l_i

    Only the image-to-text direction is used: the text side is the same caption repeated, so the
    text-to-image direction would just weight prompts by their number of rows. A batch holding a
    single prompt gives 0 (every candidate is a positive).

    Args:
        u: ``[B, D]`` image embeddings.
        text: ``[B, D]`` projected text embeddings ``e_p`` (same space as ``u``).
        group: ``[B]`` prompt id of each row.
        temperature: softmax temperature (> 0).
    """
    if temperature <= 0:
        raise ValueError(f"info_nce_loss: temperature must be > 0, got {temperature}")
    _check_rows("info_nce_loss", u=u, text=text, group=group)
    if u.ndim != 2 or text.ndim != 2 or u.shape[1] != text.shape[1]:
        raise ValueError(f"info_nce_loss: u and text must be [B, D] of the same D, got {tuple(u.shape)} and {tuple(text.shape)}")
    sims = F.normalize(u.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / temperature
    g = group.to(sims.device)
    positives = g[:, None] == g[None, :]
    return (torch.logsumexp(sims, dim=1) - torch.logsumexp(sims.masked_fill(~positives, -math.inf), dim=1)).mean()


def pearson_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - r`` with the Pearson correlation over the batch::

        r = sum((p - mean p) * (y - mean y)) / sqrt(sum((p - mean p)^2) * sum((y - mean y)^2) + eps)

    In [0, 2]; a constant prediction or target gives ``r = 0`` (loss 1), not NaN.
    """
    _check_rows("pearson_loss", pred=pred, target=target)
    p = pred.float() - pred.float().mean()
    y = target.to(device=p.device, dtype=torch.float32)
    y = y - y.mean()
    r = (p * y).sum() / torch.sqrt((p * p).sum() * (y * y).sum() + eps)
    return 1.0 - r


@dataclass
class LossTerms:
    """The loss of one batch and its parts (scalar tensors; ``total`` carries the gradient)."""

    total: Tensor
    ranking: Tensor
    align: Tensor
    pearson: Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("total", "ranking", "align", "pearson")}


def combined_loss(
    pred: Tensor,
    target: Tensor,
    group: Tensor,
    tau: float,
    alpha: float,
    u: Optional[Tensor] = None,
    text_proj: Optional[Tensor] = None,
    lambda_align: float = 10.0,
    lambda_pearson: float = 0.0,
    temperature: float = 0.07,
    top_weight: float = 0.0,
) -> LossTerms:
    """``ranking + lambda_align * InfoNCE(u, text_proj) + lambda_pearson * (1 - Pearson)``.

    The alignment term is used only when both ``u`` and ``text_proj`` are given and
    ``lambda_align > 0``; the Pearson term only when ``lambda_pearson > 0``. Terms not used are
    reported as 0.
    """
    ranking = listwise_ranking_loss(pred, target, group, tau, alpha, top_weight)
    zero = ranking.new_zeros(())
    align = zero
    if lambda_align > 0 and u is not None and text_proj is not None:
        align = info_nce_loss(u, text_proj, group, temperature)
    pearson = pearson_loss(pred, target) if lambda_pearson > 0 else zero
    total = ranking + lambda_align * align + lambda_pearson * pearson
    return LossTerms(total=total, ranking=ranking, align=align, pearson=pearson)


@dataclass(frozen=True)
class ProbeLoss:
    """The training loss of a :class:`~.model.Probe`, with its weights.

    Attributes:
        lambda_align: weight of the InfoNCE alignment term (10 in the reference).
        lambda_pearson: weight of ``1 - Pearson(pred, y)`` (the reference used 10; 0 = off).
        temperature: InfoNCE temperature.
        top_weight: weighting of the ranking loss toward each prompt's best rows (see
            :func:`listwise_ranking_loss`; 0 = unweighted).
    """

    lambda_align: float = 10.0
    lambda_pearson: float = 0.0
    temperature: float = 0.07
    top_weight: float = 0.0

    def __call__(
        self,
        probe: Probe,
        features: Tensor,
        t: Union[float, Tensor],
        target: Tensor,
        group: Tensor,
        tau: float,
        alpha: float,
        text: Optional[Tensor] = None,
        x0: Optional[Tensor] = None,
    ) -> tuple[Tensor, LossTerms]:
        """One forward pass of ``probe``; returns ``(pred [B], LossTerms)``.

        The image embedding ``u`` (whatever the probe reads: activations, x0 or both) and projected
        text ``e_p`` for InfoNCE are read with forward hooks on the probe's image embedding and text
        MLP during its own forward pass, so the head is computed exactly as at inference and nothing
        is evaluated twice. ``x0``: the pooled x0 latent, for probes that read it.
        """
        use_text = probe.config.has_text and text is not None
        captured: dict[str, Tensor] = {}
        handles = []
        if use_text and self.lambda_align > 0:
            handles.append(probe.image_embedding.register_forward_hook(lambda _m, _i, out: captured.__setitem__("u", out)))
            handles.append(probe.text_mlp.register_forward_hook(lambda _m, _i, out: captured.__setitem__("e", out)))
        try:
            pred = probe(features, t, text if probe.config.has_text else None, x0)
        finally:
            for handle in handles:
                handle.remove()
        terms = combined_loss(
            pred, target.to(pred.device), group.to(pred.device), tau, alpha,
            u=captured.get("u"), text_proj=captured.get("e"),
            lambda_align=self.lambda_align, lambda_pearson=self.lambda_pearson, temperature=self.temperature,
            top_weight=self.top_weight,
        )
        return pred, terms
