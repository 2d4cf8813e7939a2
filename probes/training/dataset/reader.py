"""Reading a dataset back for training: :class:`ProbeDataset` (rows in shard-name order, duplicates
dropped, features read per checkpoint on demand) and :class:`DatasetArrays`, a trainer's input."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors import safe_open
from torch import Tensor

from ...features import FEATURE_DTYPE
from .manifest import (
    DATASET_FORMAT,
    DATASET_FORMAT_VERSION,
    DatasetError,
    DatasetManifest,
    PathLike,
    read_manifest,
    same_checkpoints,
)
from .shards import SHARD_DIR, list_shards, remove_stale_temporaries, stray_files

logger = logging.getLogger(__name__)

_SHARD_METADATA_KEYS = ("format", "format_version", "prompts", "prompt_ids", "checkpoints", "writer", "created")


@dataclass
class _Shard:
    """What a reader keeps of one shard in memory: everything except the features."""

    path: Path
    rows: int
    seeds: Tensor
    prompts: list[str]
    prompt_ids: list[str]
    text_embedding: Optional[Tensor]
    scores: dict[str, Tensor]
    keep: Optional[Tensor] = None  # kept row indices after dropping duplicates; None = all


def _read_shard(path: Path, manifest: DatasetManifest) -> _Shard:
    """Read and check one shard's small tensors and metadata (features: header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return _parse_shard(path, handle, manifest)
    except DatasetError:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError (not exported stably)
        raise DatasetError(f"shard {path} is not a readable safetensors file ({error}); it is truncated or corrupt.") from None


def _parse_shard(path: Path, handle, manifest: DatasetManifest) -> _Shard:
    def bad(problem: str) -> DatasetError:
        return DatasetError(f"shard {path} is inconsistent: {problem}.")

    metadata = dict(handle.metadata() or {})
    if metadata.get("format") != DATASET_FORMAT:
        raise bad(f"format {metadata.get('format')!r} instead of {DATASET_FORMAT!r} (not a Probe-Select dataset shard)")
    missing = [key for key in _SHARD_METADATA_KEYS if key not in metadata]
    if missing:
        raise bad(f"metadata {missing} missing")
    try:
        version = int(metadata["format_version"])
        prompts = json.loads(metadata["prompts"])
        prompt_ids = json.loads(metadata["prompt_ids"])
        checkpoints = [float(t) for t in json.loads(metadata["checkpoints"])]
    except (TypeError, ValueError) as error:
        raise bad(f"unreadable metadata ({error})") from None
    if version > DATASET_FORMAT_VERSION:
        raise DatasetError(
            f"shard {path} uses dataset format version {version}, but this Probe-Select reads up to "
            f"version {DATASET_FORMAT_VERSION}; update the pack."
        )
    if not same_checkpoints(checkpoints, manifest.checkpoints):
        raise bad(f"it holds checkpoints {checkpoints} but the manifest says {manifest.checkpoints} (copied from another dataset?)")

    keys = set(handle.keys())
    for name in ["features", "seeds"] + [f"score.{e}" for e in manifest.evaluators]:
        if name not in keys:
            raise bad(f"tensor {name!r} missing")
    features = handle.get_slice("features")
    shape = list(features.get_shape())
    rows = shape[0] if shape else -1
    expected = [rows, len(manifest.checkpoints), *manifest.feature_shape]
    if shape != expected or features.get_dtype() != "F16":
        raise bad(f"features are {features.get_dtype()} {shape}, expected F16 [R, K, C, P, P] = {expected}")
    seeds = handle.get_tensor("seeds")
    if seeds.dtype != torch.int64 or list(seeds.shape) != [rows]:
        raise bad(f"seeds are {seeds.dtype} {list(seeds.shape)}, expected int64 [{rows}]")
    for name, values in (("prompts", prompts), ("prompt_ids", prompt_ids)):
        if not isinstance(values, list) or len(values) != rows or not all(isinstance(v, str) for v in values):
            raise bad(f"metadata {name} is not a list of {rows} strings")
    scores = {}
    for evaluator in manifest.evaluators:
        values = handle.get_tensor(f"score.{evaluator}")
        if not values.is_floating_point() or list(values.shape) != [rows]:
            raise bad(f"score.{evaluator} is {values.dtype} {list(values.shape)}, expected float32 [{rows}]")
        if not torch.isfinite(values).all():
            raise bad(f"score.{evaluator} has NaN/inf values")
        scores[evaluator] = values.float()
    text = None
    if manifest.text_dim:
        if "text_embedding" not in keys:
            raise bad(f"tensor 'text_embedding' missing (the manifest says text_dim {manifest.text_dim})")
        text = handle.get_tensor("text_embedding")
        if not text.is_floating_point() or list(text.shape) != [rows, manifest.text_dim]:
            raise bad(f"text_embedding is {text.dtype} {list(text.shape)}, expected float [{rows}, {manifest.text_dim}]")
        text = text.to(FEATURE_DTYPE)
    elif "text_embedding" in keys:
        raise bad("it has a text_embedding but the manifest says text_dim 0")
    if manifest.x0_shape is not None:
        if "x0" not in keys:
            raise bad(f"tensor 'x0' missing (the manifest says x0_shape {manifest.x0_shape})")
        x0 = handle.get_slice("x0")
        expected_x0 = [rows, len(manifest.checkpoints), *manifest.x0_shape]
        if list(x0.get_shape()) != expected_x0 or x0.get_dtype() != "F16":
            raise bad(f"x0 is {x0.get_dtype()} {list(x0.get_shape())}, expected F16 [R, K, c, S, S] = {expected_x0}")
    elif "x0" in keys:
        raise bad("it has an x0 latent but the manifest has no x0_shape")
    return _Shard(path=path, rows=rows, seeds=seeds, prompts=prompts, prompt_ids=prompt_ids, text_embedding=text, scores=scores)


@dataclass
class DatasetArrays:
    """Plain tensors of N dataset rows at one checkpoint and for one evaluator: a trainer's input.

    Attributes:
        features: ``[N, C, P, P]`` float16 pooled activations at checkpoint ``t``.
        t: the checkpoint.
        seeds: ``[N]`` int64.
        prompt_ids: N prompt ids (rows of one prompt are compared with each other in ranking).
        text_embedding: ``[N, D]`` float16, or None.
        scores: ``[N]`` float32 scores of ``evaluator``.
        evaluator: name of the evaluator.
        x0: ``[N, c, S, S]`` float16 pooled x0 prediction latent at checkpoint ``t``, or None when
            the dataset stores none.
    """

    features: Tensor
    t: float
    seeds: Tensor
    prompt_ids: list[str]
    text_embedding: Optional[Tensor]
    scores: Tensor
    evaluator: str = ""
    x0: Optional[Tensor] = None

    def __post_init__(self) -> None:
        rows = self.features.shape[0]
        lengths = {"seeds": self.seeds.shape[0], "prompt_ids": len(self.prompt_ids), "scores": self.scores.shape[0]}
        if self.text_embedding is not None:
            lengths["text_embedding"] = self.text_embedding.shape[0]
        if self.x0 is not None:
            lengths["x0"] = self.x0.shape[0]
        wrong = {name: n for name, n in lengths.items() if n != rows}
        if wrong:
            raise ValueError(f"DatasetArrays: {rows} feature rows but {wrong}")

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, indices: Union[Sequence[int], Tensor]) -> "DatasetArrays":
        """The rows at ``indices`` (e.g. ``split_by_prompt(...)["train"]``), in that order."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"DatasetArrays.select: indices outside [0, {len(self)})")
        positions = index.tolist()
        return dataclasses.replace(
            self,
            features=self.features[index],
            seeds=self.seeds[index],
            prompt_ids=[self.prompt_ids[i] for i in positions],
            text_embedding=None if self.text_embedding is None else self.text_embedding[index],
            scores=self.scores[index],
            x0=None if self.x0 is None else self.x0[index],
        )

    def prompt_groups(self) -> Tensor:
        """``[N]`` int64 dense prompt index per row (0, 1, ... in order of first appearance).

        Ranking losses and within-prompt metrics compare rows of the same group.
        """
        ids: dict[str, int] = {}
        return torch.tensor([ids.setdefault(p, len(ids)) for p in self.prompt_ids], dtype=torch.long)


class ProbeDataset:
    """A dataset read back for training: rows in shard-name order, duplicates dropped.

    Opening reads the manifest, every shard's header and its small tensors (seeds, scores, text
    embedding); features are read per checkpoint on demand by :meth:`features` / :meth:`arrays`,
    only the requested checkpoint's slice of each shard. Shards appended after opening are not
    seen; open the dataset again to include them.

    Args:
        root: the dataset folder.
        skip_corrupt: skip (with a warning, listed in :attr:`skipped`) shards that cannot be read
            or are inconsistent, instead of raising.

    Raises:
        DatasetError: for a missing or invalid manifest, or (without ``skip_corrupt``) a damaged
            shard, naming the file.
    """

    def __init__(self, root: PathLike, skip_corrupt: bool = False):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        remove_stale_temporaries(self.root)
        self.skipped: list[Path] = []
        stray = stray_files(self.root)
        if stray:
            logger.warning("dataset %s: ignoring %d files in %s/ that are not shards: %s",
                           self.root, len(stray), SHARD_DIR, ", ".join(stray))
        shards = []
        for path in list_shards(self.root):
            try:
                shards.append(_read_shard(path, self.manifest))
            except DatasetError as error:
                if not skip_corrupt:
                    raise DatasetError(
                        f"{error} Delete or move that file, or open the dataset with "
                        f"skip_corrupt=True to load the other shards."
                    ) from None
                logger.warning("skipping shard: %s", error)
                self.skipped.append(path)
        self._shards = shards
        dropped = _drop_duplicates(shards)
        if dropped:
            logger.info(
                "dataset %s: dropped %d duplicate rows (same prompt_id and seed as an earlier row; "
                "kept the first by shard name)", self.root, dropped,
            )
        self.duplicates_dropped = dropped
        kept = [(s, s.keep if s.keep is not None else slice(None)) for s in shards]
        self._seeds = torch.cat([s.seeds[k] for s, k in kept]) if shards else torch.zeros(0, dtype=torch.int64)
        self._prompts = [s.prompts[i] for s in shards for i in _kept_rows(s)]
        self._prompt_ids = [s.prompt_ids[i] for s in shards for i in _kept_rows(s)]
        self._scores = {
            name: torch.cat([s.scores[name][k] for s, k in kept]) if shards else torch.zeros(0)
            for name in self.manifest.evaluators
        }
        self._text = None
        if self.manifest.text_dim:
            self._text = (
                torch.cat([s.text_embedding[k] for s, k in kept])
                if shards
                else torch.zeros(0, self.manifest.text_dim, dtype=FEATURE_DTYPE)
            )
        logger.info("opened dataset %s: %d rows from %d shards", self.root, len(self), len(shards))

    def __len__(self) -> int:
        return self._seeds.shape[0]

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"ProbeDataset(root={str(self.root)!r}, rows={len(self)}, shards={len(self._shards)}, "
            f"family={m.backbone_family!r}, tap={m.tap!r}, checkpoints={m.checkpoints}, evaluators={m.evaluators})"
        )

    @property
    def shards(self) -> list[Path]:
        """The shard files loaded, in row order."""
        return [shard.path for shard in self._shards]

    @property
    def seeds(self) -> Tensor:
        """``[N]`` int64 seed per row."""
        return self._seeds

    @property
    def prompt_ids(self) -> list[str]:
        return self._prompt_ids

    @property
    def prompts(self) -> list[str]:
        return self._prompts

    @property
    def text_embedding(self) -> Optional[Tensor]:
        """``[N, D]`` float16 text embedding per row, or None when the dataset stores none."""
        return self._text

    def scores(self, evaluator: str) -> Tensor:
        """``[N]`` float32 scores of ``evaluator``."""
        if evaluator not in self._scores:
            raise DatasetError(
                f"dataset {self.root} has no scores for evaluator {evaluator!r}; it has "
                f"{self.manifest.evaluators}. Pick one of those or collect data scored by {evaluator!r}."
            )
        return self._scores[evaluator]

    def features(self, checkpoint_t: float) -> Tensor:
        """``[N, C, P, P]`` float16 features at ``checkpoint_t``, read from the shards now.

        A dataset without rows gives an empty ``[0, C, P, P]`` tensor, like its other arrays.

        Raises:
            DatasetError: if ``checkpoint_t`` is not one of the manifest's checkpoints (they are
                listed), or a shard has become unreadable since the dataset was opened.
        """
        return self._per_checkpoint("features", self.manifest.feature_shape, checkpoint_t)

    @property
    def has_x0(self) -> bool:
        """Whether the rows carry the sampler's x0 prediction latent (the manifest's ``x0_shape``)."""
        return self.manifest.x0_shape is not None

    def x0(self, checkpoint_t: float) -> Optional[Tensor]:
        """``[N, c, S, S]`` float16 pooled x0 latents at ``checkpoint_t``, read from the shards now;
        None when the dataset stores none. Raises like :meth:`features`."""
        if self.manifest.x0_shape is None:
            return None
        return self._per_checkpoint("x0", self.manifest.x0_shape, checkpoint_t)

    def _per_checkpoint(self, key: str, shape: tuple[int, ...], checkpoint_t: float) -> Tensor:
        """Tensor ``key`` (``[R, K, *shape]`` in every shard) at ``checkpoint_t``, kept rows only."""
        try:
            k = self.manifest.checkpoint_index(checkpoint_t)
        except DatasetError as error:
            raise DatasetError(f"dataset {self.root}: {error}") from None
        parts = []
        for shard in self._shards:
            try:
                with safe_open(str(shard.path), framework="pt") as handle:
                    part = handle.get_slice(key)[:, k]
            except Exception as error:
                raise DatasetError(
                    f"shard {shard.path} could not be read again ({error}); it was changed or removed "
                    f"after the dataset was opened. Reopen the dataset."
                ) from None
            if tuple(part.shape) != (shard.rows, *shape):
                raise DatasetError(f"shard {shard.path} changed after the dataset was opened; reopen the dataset.")
            parts.append(part if shard.keep is None else part[shard.keep])
        if not parts:
            return torch.zeros(0, *shape, dtype=FEATURE_DTYPE)
        return torch.cat(parts)

    def arrays(self, checkpoint_t: float, evaluator: str) -> DatasetArrays:
        """All rows as :class:`DatasetArrays` at ``checkpoint_t`` for ``evaluator``.

        Typical use: ``arrays = ds.arrays(0.2, "clipscore")``, then
        ``arrays.select(split_by_prompt(ds.prompt_ids)["train"])``.
        """
        scores = self.scores(evaluator)
        return DatasetArrays(
            features=self.features(checkpoint_t),
            t=self.manifest.checkpoints[self.manifest.checkpoint_index(checkpoint_t)],
            seeds=self._seeds,
            prompt_ids=list(self._prompt_ids),
            text_embedding=self._text,
            scores=scores,
            evaluator=evaluator,
            x0=self.x0(checkpoint_t),
        )

    def subset(self, indices: Union[Sequence[int], Tensor], checkpoint_t: float, evaluator: str) -> DatasetArrays:
        """The rows at ``indices`` as :class:`DatasetArrays` (``arrays(...).select(indices)``)."""
        return self.arrays(checkpoint_t, evaluator).select(indices)


def _kept_rows(shard: _Shard) -> list[int]:
    return list(range(shard.rows)) if shard.keep is None else shard.keep.tolist()


def _drop_duplicates(shards: list[_Shard]) -> int:
    """Set each shard's ``keep`` so that every (prompt_id, seed) appears once; returns rows dropped.

    The first occurrence in row order (shard name, then row) wins, so the result does not depend on
    which copy was written last.
    """
    seen: set[tuple[str, int]] = set()
    dropped = 0
    for shard in shards:
        keep = []
        for row, (pid, seed) in enumerate(zip(shard.prompt_ids, shard.seeds.tolist())):
            key = (pid, seed)
            if key in seen:
                dropped += 1
            else:
                seen.add(key)
                keep.append(row)
        shard.keep = None if len(keep) == shard.rows else torch.tensor(keep, dtype=torch.long)
    return dropped
