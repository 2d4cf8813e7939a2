"""Rows to append: :class:`CandidateRows` (one row per finished candidate, checked on creation) and
the prompt id that splitting and de-duplication rely on."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ...features import FEATURE_DTYPE, pool_x0
from ...reduction import NO_REDUCTION, ChannelReduction
from .manifest import DatasetManifest


def prompt_id(prompt: str) -> str:
    """Default id of a prompt: the first 16 hex digits of the SHA-1 of its UTF-8 text.

    A content hash, so the same caption gets the same id in every job and on every machine, which
    is what splitting by prompt and dropping re-collected rows rely on.
    """
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


@dataclass(kw_only=True)
class CandidateRows:
    """A batch of R rows to append: one row per finished candidate.

    Attributes:
        features: ``[R, K, C, P, P]`` pooled activations at the manifest's K checkpoints (in its
            order); stored as float16.
        seeds: ``[R]`` seeds. ComfyUI seeds go from 0 to 2**64 - 1; values of 2**63 and above are
            stored as their two's-complement int64 (``seed - 2**64``), which keeps them distinct.
            Python ints outside that range are refused (2**64 would be stored as 0, -1 as
            2**64 - 1); an int64 tensor is taken as already stored that way.
        prompts: the R prompt texts.
        prompt_ids: R prompt ids; defaults to :func:`prompt_id` of each prompt.
        text_embedding: ``[R, D]`` pooled text embedding, or None; stored as float16.
        scores: evaluator name -> ``[R]`` finished-image scores (float32, finite).
        x0: ``[R, K, c, S, S]`` the sampler's x0 prediction latent at the K checkpoints, pooled
            (:func:`~probe_select.probes.features.pool_x0`), or None; stored as float16.
    """

    features: Tensor
    seeds: Union[Tensor, Sequence[int]]
    prompts: list[str]
    prompt_ids: Optional[list[str]] = None
    text_embedding: Optional[Tensor] = None
    scores: dict[str, Tensor]
    x0: Optional[Tensor] = None

    def __post_init__(self) -> None:
        features = self.features
        if not isinstance(features, Tensor) or features.ndim != 5 or not features.is_floating_point():
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"CandidateRows.features must be a float [R, K, C, P, P] tensor, got {shape}")
        self.features = features.detach().to("cpu", FEATURE_DTYPE).contiguous()
        if not torch.isfinite(self.features).all():
            raise ValueError("CandidateRows.features has NaN/inf values (after conversion to float16); check the activations' scale")
        rows = self.features.shape[0]
        self.seeds = _seeds_to_int64(self.seeds)
        if self.seeds.shape[0] != rows:
            raise ValueError(f"CandidateRows has {rows} feature rows but {self.seeds.shape[0]} seeds; give one seed per row")
        self.prompts = _string_list("prompts", self.prompts, rows)
        if self.prompt_ids is None:
            self.prompt_ids = [prompt_id(text) for text in self.prompts]
        self.prompt_ids = _string_list("prompt_ids", self.prompt_ids, rows, non_empty=True)
        if self.text_embedding is not None:
            text = self.text_embedding
            if not isinstance(text, Tensor) or text.ndim != 2 or text.shape[0] != rows or not text.is_floating_point():
                shape = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
                raise ValueError(f"CandidateRows.text_embedding must be a float [R, D] tensor with R={rows}, got {shape}")
            self.text_embedding = text.detach().to("cpu", FEATURE_DTYPE).contiguous()
            if not torch.isfinite(self.text_embedding).all():
                raise ValueError("CandidateRows.text_embedding has NaN/inf values (after conversion to float16)")
        if self.x0 is not None:
            x0 = self.x0
            if not isinstance(x0, Tensor) or x0.ndim != 5 or x0.shape[:2] != features.shape[:2] or not x0.is_floating_point():
                shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
                raise ValueError(f"CandidateRows.x0 must be a float [R, K, c, S, S] tensor with (R, K) = "
                                 f"{tuple(features.shape[:2])} like the features, got {shape}")
            self.x0 = x0.detach().to("cpu", FEATURE_DTYPE).contiguous()
            if not torch.isfinite(self.x0).all():
                raise ValueError("CandidateRows.x0 has NaN/inf values (after conversion to float16)")
        if not isinstance(self.scores, dict) or not self.scores:
            raise ValueError("CandidateRows.scores must be a non-empty dict: evaluator name -> [R] scores")
        scores = {}
        for name, values in self.scores.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"CandidateRows.scores keys must be evaluator names, got {name!r}")
            values = torch.as_tensor(values).detach().to("cpu", torch.float32).reshape(-1)
            if values.shape[0] != rows:
                raise ValueError(f"CandidateRows.scores[{name!r}] has {values.shape[0]} values for {rows} rows")
            if not torch.isfinite(values).all():
                raise ValueError(
                    f"CandidateRows.scores[{name!r}] has NaN/inf values; the evaluator failed on some "
                    f"images: drop those rows before appending"
                )
            scores[name] = values.contiguous()
        self.scores = scores

    def __len__(self) -> int:
        return self.features.shape[0]


def _seeds_to_int64(seeds) -> Tensor:
    if isinstance(seeds, Tensor):
        if seeds.is_floating_point() or seeds.is_complex():
            raise ValueError(f"CandidateRows.seeds must be integers, got dtype {seeds.dtype}")
        return seeds.detach().to("cpu", torch.int64).reshape(-1).contiguous()
    values = []
    for seed in seeds:
        seed = int(seed)
        if not 0 <= seed < 2**64:
            raise ValueError(
                f"CandidateRows.seeds: {seed} is outside ComfyUI's seed range 0 .. 2**64 - 1; "
                f"pass the seeds the sampler used"
            )
        values.append(seed - 2**64 if seed >= 2**63 else seed)
    return torch.tensor(values, dtype=torch.int64)


def _string_list(name: str, values, rows: int, non_empty: bool = False) -> list[str]:
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"CandidateRows.{name} must be a list of strings")
    values = list(values)
    if len(values) != rows:
        raise ValueError(f"CandidateRows has {rows} rows but {len(values)} {name}; give one per row")
    if non_empty and not all(values):
        raise ValueError(f"CandidateRows.{name} must not contain empty strings")
    return values


def rows_from_activations(activations, scores: dict[str, Tensor], prompt: str,
                          reduction: ChannelReduction = NO_REDUCTION,
                          x0_size: int = 0) -> tuple[DatasetManifest, CandidateRows]:
    """One dataset row per candidate of one run: its activations at every checkpoint (an
    ActivationSet or ActivationSeries) and each evaluator's score, with the manifest they imply.

    ``reduction`` reduces the channels of every checkpoint's features before they are stored and is
    recorded in the manifest (ValueError if it does not fit the activations' shape). ``x0_size`` > 0
    also stores each checkpoint's x0 prediction latent (the sets' ``x0``) pooled to
    ``x0_size x x0_size`` (ValueError if a set carries none); 0 stores no x0.
    """
    sets = list(getattr(activations, "sets", (activations,)))
    first = sets[0]
    n = len(first)
    text = first.text_embedding
    if text is not None and text.shape[0] == 1:
        text = text.expand(n, -1)
    x0 = None
    if x0_size:
        missing = [s.t for s in sets if s.x0 is None]
        if missing:
            raise ValueError(f"rows_from_activations: no x0 latent at checkpoints t={missing}; the activations must "
                             f"come from a sampler that records its x0 prediction, or store no x0 (x0_size=0)")
        x0 = torch.stack([pool_x0(s.x0, x0_size) for s in sets], dim=1)
    manifest = DatasetManifest(
        backbone_family=first.family, tap=first.tap, feature_shape=reduction.output_shape(first.feature_shape),
        pooling=first.pooling, checkpoints=[s.t for s in sets], evaluators=sorted(scores),
        text_dim=0 if text is None else text.shape[1], reduction=reduction,
        x0_shape=None if x0 is None else tuple(x0.shape[2:]))
    rows = CandidateRows(
        features=reduction.apply(torch.stack([s.features for s in sets], dim=1)), seeds=first.seeds,
        prompts=[prompt] * n,
        text_embedding=text, scores={name: value.float() for name, value in scores.items()}, x0=x0)
    return manifest, rows
