"""Image features for set metrics: resizing, extractors, streaming accumulation, reference files.

FID and its relatives change with how images are resized and quantised before the feature
extractor (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation").
Two modes are offered and every output says which one was used:

- ``clean``: each channel of the float image (0..255, not quantised) is resized with PIL's
  antialiased bicubic filter (``Image.resize(..., BICUBIC)`` in mode ``"F"``) and clipped to 0..255,
  as clean-fid does.
- ``legacy``: the image is quantised to uint8 as a saved PNG would be, then resized with
  ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` without antialiasing,
  as pytorch-fid and older FID code do.

Images of different sizes are each resized to the extractor's input (299 x 299 for the FID
Inception, squashed without cropping as FID code does; CLIP crops the centre square first, as
its own preprocessing does).

Features are accumulated as float32 rows only, so 10,000 images need about 10,000 x (2048 + 1008)
x 4 bytes = 120 MB for FID + IS features, never the images themselves.

Reference statistics (features + FID mean/covariance) are saved as safetensors with metadata that
names the extractor of each feature set and the resize mode; loading them for another extractor
is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_write
from .image_metrics import gaussian_statistics
from .inception import INCEPTION_INPUT_SIZE
from .stored import read_format_file

__all__ = [
    "RESIZE_MODES",
    "RESIZE_DESCRIPTIONS",
    "IMAGE_EXTENSIONS",
    "FeatureExtractor",
    "InceptionExtractor",
    "ClipExtractor",
    "ModuleExtractor",
    "weights_fingerprint",
    "resize_image",
    "preprocess_images",
    "FeatureAccumulator",
    "extract_features",
    "list_image_files",
    "iter_image_folder",
    "ReferenceStatsError",
    "ReferenceStats",
    "save_reference_stats",
    "load_reference_stats",
]

logger = logging.getLogger(__name__)

RESIZE_MODES = ("clean", "legacy")
RESIZE_DESCRIPTIONS = {
    "clean": "clean (PIL bicubic, antialiased, on float pixels without uint8 quantisation; as clean-fid)",
    "legacy": "legacy (pixels quantised to uint8, then torch bilinear without antialiasing; as pytorch-fid)",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_FORMAT = "probe-select-reference-stats"
REFERENCE_FORMAT_VERSION = 1

Progress = Callable[[int, int], None]


# ---- extractors -----------------------------------------------------------------------------


def weights_fingerprint(module: nn.Module) -> str:
    """12 hex digits identifying a module's weights: names, shapes and the first 4,096 values of
    every tensor (cheap for large models, and any retrained or different model changes it)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)[:4096].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:12]


class FeatureExtractor:
    """Turns resized pixels ``[B, 3, S, S]`` (0..1) into named feature rows.

    Attributes:
        kind: the feature family a metric reads, ``"inception"`` or ``"clip"``.
        extractor_id: identity stored with saved features; features of different ids are never
            compared.
        input_size: side S of the square input.
        crop: ``"none"`` (squash the whole image) or ``"center"`` (centre square first).
        device: where the model runs.
    """

    kind: str = "custom"
    extractor_id: str = "custom"
    input_size: int = 224
    crop: str = "none"
    device: torch.device = torch.device("cpu")

    def features(self, pixels: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extractor_id!r})"


class InceptionExtractor(FeatureExtractor):
    """The FID InceptionV3 (:mod:`.inception`): ``pool`` (2048) and ``logits`` (1008) features."""

    kind = "inception"
    crop = "none"

    def __init__(self, model: nn.Module, identity: str, device: Union[str, torch.device] = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.input_size = INCEPTION_INPUT_SIZE
        self.extractor_id = f"fid-inception-v3:{identity}"

    def features(self, pixels: Tensor) -> dict[str, Tensor]:
        out = self.model(pixels.to(self.device, torch.float32))
        return {"pool": out["pool"], "logits": out["logits"]}


class ClipExtractor(FeatureExtractor):
    """An open_clip model: ``embedding`` (L2-normalised image embedding) features, and text
    embeddings for CLIPScore. Built from a loaded :class:`~probe_select.probes.evaluators.CLIPScoreEvaluator`, so
    the pack loads open_clip weights in one place only (local files, never a download)."""

    kind = "clip"
    crop = "center"

    def __init__(self, model: nn.Module, tokenizer, name: str, image_size: int, mean: Sequence[float],
                 std: Sequence[float], device: Union[str, torch.device] = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.input_size = int(image_size if isinstance(image_size, int) else image_size[0])
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.extractor_id = f"open_clip:{name}:{weights_fingerprint(model)}"

    @classmethod
    def from_evaluator(cls, evaluator) -> "ClipExtractor":
        """From a :class:`~probe_select.probes.evaluators.CLIPScoreEvaluator` (its model, tokenizer and image settings)."""
        name = getattr(evaluator, "name", "clip").split(":", 1)[-1]
        return cls(evaluator.model, evaluator.tokenizer, name, evaluator.image_size, evaluator.image_mean,
                   evaluator.image_std, device=evaluator.device)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def features(self, pixels: Tensor) -> dict[str, Tensor]:
        x = (pixels.float() - self.mean) / self.std
        embedding = self.model.encode_image(x.to(self.device, self._dtype())).float()
        return {"embedding": F.normalize(embedding, dim=-1)}

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``[len(prompts), D]`` (float32, CPU)."""
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts])
        with torch.inference_mode():
            tokens = self.tokenizer(unique).to(self.device)
            embedding = F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()
        return embedding[index]


class ModuleExtractor(FeatureExtractor):
    """Any module mapping ``[B, 3, S, S]`` pixels to ``[B, D]`` (or a dict of them): for custom or
    test extractors. A tensor output is named ``"pool"`` (and also serves as ``"embedding"``)."""

    def __init__(self, module: nn.Module, kind: str, input_size: int, crop: str = "none",
                 extractor_id: Optional[str] = None, device: Union[str, torch.device] = "cpu"):
        self.module = module.to(device).eval()
        self.kind = kind
        self.input_size = int(input_size)
        self.crop = crop
        self.device = torch.device(device)
        self.extractor_id = extractor_id or f"{kind}:{type(module).__name__}:{weights_fingerprint(module)}"

    def features(self, pixels: Tensor) -> dict[str, Tensor]:
        out = self.module(pixels.to(self.device, torch.float32))
        if isinstance(out, Tensor):
            return {"pool": out, "embedding": out}
        return dict(out)


# ---- resizing -------------------------------------------------------------------------------


def _as_hwc(image: Tensor) -> Tensor:
    """One image ``[H, W, C]`` (C = 1, 3 or 4; float 0..1 or uint8) -> float ``[H, W, 3]`` in 0..1."""
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be [H, W, 3] (ComfyUI IMAGE rows), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    image = image.detach().to("cpu", torch.float32)
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, 3)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    return image.clamp(0.0, 1.0)


def _center_square(image: Tensor) -> Tensor:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


def resize_image(image: Tensor, size: int, mode: str, crop: str = "none") -> Tensor:
    """Resize one image ``[H, W, 3]`` (0..1) to ``[3, size, size]`` float32 in 0..1 (see the module
    docstring for the two modes)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    image = _as_hwc(image)
    if crop == "center":
        image = _center_square(image)
    if mode == "clean":
        values = image.numpy() * 255.0
        if values.shape[:2] != (size, size):
            channels = [np.asarray(Image.fromarray(np.ascontiguousarray(values[..., c]), mode="F")
                                   .resize((size, size), resample=Image.BICUBIC)) for c in range(3)]
            values = np.stack(channels, axis=-1)
        return torch.from_numpy(np.clip(values, 0.0, 255.0) / 255.0).float().permute(2, 0, 1).contiguous()
    # legacy: the uint8 values a saved image would hold (truncation, as ComfyUI's SaveImage), then bilinear.
    quantised = torch.floor((image * 255.0).clamp(0.0, 255.0)) / 255.0
    x = quantised.permute(2, 0, 1).unsqueeze(0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x[0].contiguous()


def preprocess_images(images: Union[Tensor, Sequence[Tensor]], size: int, mode: str, crop: str = "none") -> Tensor:
    """A batch ``[B, H, W, 3]`` or a list of ``[H, W, 3]`` images (sizes may differ) -> ``[B, 3, size, size]``."""
    rows = list(images.unbind(0)) if isinstance(images, Tensor) else list(images)
    if not rows:
        return torch.zeros(0, 3, size, size)
    return torch.stack([resize_image(image, size, mode, crop) for image in rows])


# ---- accumulation ---------------------------------------------------------------------------


class FeatureAccumulator:
    """Feature rows of one extractor, appended batch by batch (float32, CPU)."""

    def __init__(self, extractor_id: str):
        self.extractor_id = extractor_id
        self._chunks: dict[str, list[Tensor]] = {}
        self._cache: dict[str, Tensor] = {}
        self.count = 0

    def add(self, features: dict[str, Tensor]) -> None:
        sizes = {int(v.shape[0]) for v in features.values()}
        if len(sizes) != 1:
            raise ValueError(f"feature outputs disagree on the batch size: {sizes}")
        for name, value in features.items():
            rows = value.detach().to("cpu", torch.float32).reshape(value.shape[0], -1)
            self._chunks.setdefault(name, []).append(rows)
        self.count += sizes.pop()
        self._cache.clear()

    @property
    def names(self) -> list[str]:
        return list(self._chunks)

    def get(self, name: str) -> Tensor:
        if name not in self._chunks:
            raise KeyError(f"no '{name}' features (have {self.names})")
        if name not in self._cache:
            self._cache[name] = torch.cat(self._chunks[name])
        return self._cache[name]

    def as_dict(self) -> dict[str, Tensor]:
        return {name: self.get(name) for name in self._chunks}


def extract_features(batches: Iterable[Union[Tensor, Sequence[Tensor]]], extractors: Sequence[FeatureExtractor],
                     resize_mode: str, total: Optional[int] = None, batch_size: int = 16,
                     progress: Optional[Progress] = None) -> dict[str, FeatureAccumulator]:
    """Stream images through the extractors; keep features only.

    Args:
        batches: IMAGE batches ``[B, H, W, 3]`` or lists of ``[H, W, 3]`` images (any sizes).
        extractors: one per feature kind (``"inception"``, ``"clip"``).
        resize_mode: ``"clean"`` or ``"legacy"``.
        total: the number of images, for progress (None if unknown).
        batch_size: images per forward pass.
        progress: ``progress(done, total)`` after each forward pass; may raise to cancel.

    Returns:
        ``{kind: FeatureAccumulator}``.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    kinds = [e.kind for e in extractors]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"one extractor per feature kind, got {kinds}")
    accumulators = {e.kind: FeatureAccumulator(e.extractor_id) for e in extractors}
    done = 0
    with torch.inference_mode():
        for batch in batches:
            rows = list(batch.unbind(0)) if isinstance(batch, Tensor) else list(batch)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                for extractor in extractors:
                    pixels = preprocess_images(chunk, extractor.input_size, resize_mode, extractor.crop)
                    accumulators[extractor.kind].add(extractor.features(pixels))
                done += len(chunk)
                if progress is not None:
                    progress(done, total if total is not None else done)
    return accumulators


def list_image_files(folder: Union[str, os.PathLike]) -> list[Path]:
    """Image files (``IMAGE_EXTENSIONS``) directly in ``folder``, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' does not exist")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_image(path: Path) -> Tensor:
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy())            # uint8 [H, W, 3]


def iter_image_folder(files: Sequence[Path], batch_size: int = 16) -> Iterator[list[Tensor]]:
    """Lists of uint8 ``[H, W, 3]`` images read ``batch_size`` files at a time (one batch in memory)."""
    for start in range(0, len(files), batch_size):
        yield [_read_image(p) for p in files[start:start + batch_size]]


# ---- reference statistics files -------------------------------------------------------------


class ReferenceStatsError(ValueError):
    """A reference statistics file is missing, not one, or was made with another extractor or resize.

    ``problem`` and ``fix`` as in the pack's other errors; the message is ``"<problem> Fix: <fix>"``.
    """

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)


@dataclass
class ReferenceStats:
    """Saved reference features: ``features[kind][name]`` ``[N, D]`` float32, per kind the extractor
    id, the resize mode and where they came from. ``fid_statistics`` holds the float64 mean and
    covariance of the Inception pool features when those were saved."""

    features: dict[str, dict[str, Tensor]]
    extractor_ids: dict[str, str]
    resize_mode: str
    source: str = ""
    fid_statistics: Optional[tuple[np.ndarray, np.ndarray]] = None
    path: Optional[Path] = None
    counts: dict[str, int] = field(default_factory=dict)

    def require(self, extractor: FeatureExtractor, resize_mode: str) -> dict[str, Tensor]:
        """The features of ``extractor``'s kind, or :class:`ReferenceStatsError` when they were made
        with another extractor or resize mode (their metrics would not be comparable)."""
        where = f"'{self.path.name}'" if self.path else "the reference statistics"
        if extractor.kind not in self.features:
            raise ReferenceStatsError(
                f"{where} holds no {extractor.kind} features (it has: {', '.join(self.features) or 'none'}).",
                f"save the reference again with a {extractor.kind} extractor connected, or leave out the metrics "
                f"that need {extractor.kind} features.")
        saved = self.extractor_ids.get(extractor.kind, "")
        if saved != extractor.extractor_id:
            raise ReferenceStatsError(
                f"{where} was made with the extractor {saved!r}, not with the connected {extractor.extractor_id!r}; "
                "features of different extractors are not comparable.",
                "connect the extractor (same weights file) the reference was made with, or save the reference "
                "statistics again with this one.")
        if self.resize_mode != resize_mode:
            raise ReferenceStatsError(
                f"{where} was made with resize mode '{self.resize_mode}', not '{resize_mode}'; FID and its relatives "
                "change with the resize.",
                f"set resize_mode to '{self.resize_mode}', or save the reference statistics again with "
                f"'{resize_mode}'.")
        return self.features[extractor.kind]


def save_reference_stats(path: Union[str, os.PathLike], features: dict[str, FeatureAccumulator], resize_mode: str,
                         source: str = "") -> Path:
    """Write reference features (and the FID mean/covariance of Inception features) atomically."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    tensors: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for kind, accumulator in features.items():
        for name, value in accumulator.as_dict().items():
            tensors[f"{kind}.{name}"] = value.contiguous()
        counts[kind] = accumulator.count
        if kind == "inception" and "pool" in accumulator.names and accumulator.count >= 2:
            mu, sigma = gaussian_statistics(accumulator.get("pool"))
            tensors["inception.fid_mu"] = torch.from_numpy(mu)
            tensors["inception.fid_sigma"] = torch.from_numpy(np.ascontiguousarray(sigma))
    if not tensors:
        raise ValueError("no features to save")
    metadata = {
        "format": REFERENCE_FORMAT,
        "format_version": str(REFERENCE_FORMAT_VERSION),
        "resize_mode": resize_mode,
        "extractors": json.dumps({kind: acc.extractor_id for kind, acc in features.items()}),
        "counts": json.dumps(counts),
        "source": source,
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_reference_stats(path: Union[str, os.PathLike]) -> ReferenceStats:
    """Read a file written by :func:`save_reference_stats` (safetensors only; nothing is unpickled)."""
    path, metadata, tensors = read_format_file(
        path, REFERENCE_FORMAT, "reference statistics file", "reference statistics file",
        "select a file written by Probe-Select Save Reference Stats.", ReferenceStatsError)
    version = int(metadata.get("format_version", "0"))
    if version > REFERENCE_FORMAT_VERSION:
        raise ReferenceStatsError(f"'{path.name}' has format version {version}, newer than this pack reads "
                                  f"({REFERENCE_FORMAT_VERSION}).", "update Probe-Select.")
    features: dict[str, dict[str, Tensor]] = {}
    fid_mu = fid_sigma = None
    for key, value in tensors.items():
        kind, name = key.split(".", 1)
        if key == "inception.fid_mu":
            fid_mu = value.double().numpy()
        elif key == "inception.fid_sigma":
            fid_sigma = value.double().numpy()
        else:
            features.setdefault(kind, {})[name] = value.float()
    return ReferenceStats(
        features=features,
        extractor_ids=json.loads(metadata.get("extractors", "{}")),
        resize_mode=metadata.get("resize_mode", ""),
        source=metadata.get("source", ""),
        fid_statistics=(fid_mu, fid_sigma) if fid_mu is not None and fid_sigma is not None else None,
        path=path,
        counts={k: int(v) for k, v in json.loads(metadata.get("counts", "{}")).items()},
    )
