"""Image evaluators: the scores of finished images that probes learn to predict.

Every evaluator scores each image against its prompt on its own. Scores are never softmaxed or
normalised across the batch, so an image gets the same score alone or among N others and scores
of different runs and batch sizes can be compared.

- :class:`CLIPScoreEvaluator` (open_clip): ``100 * max(cos(image, text), 0)``.
- :class:`ImageRewardEvaluator` (package ``image-reward``): the standardised ImageReward reward.
- :class:`HPSv2Evaluator` (package ``hpsv2``): ``100 * cos(image, text)`` of HPS v2.0 or v2.1.
- :class:`PickScoreEvaluator` (package ``transformers``): ``logit_scale * cos(image, text)``.
- :func:`scores_from_floats` wraps numbers from any other scorer.

Weights are only ever read from local files (or from models already in the user's open_clip /
Hugging Face cache); nothing is downloaded. This module never unpickles anything: ImageReward and
HPSv2 weights are read from ``.safetensors`` (see :func:`conversion_command` for their ``.pt``
releases). The optional packages are imported only when their evaluator is built; a missing
package or file raises :class:`EvaluatorUnavailable`, whose message says what to install and
where to put which file.

Images use ComfyUI's IMAGE layout: ``[B, H, W, 3]`` floats in 0..1.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .scoring import order_scores

__all__ = [
    "EVALUATORS_DIR_HINT",
    "ImageScores",
    "EvaluatorUnavailable",
    "ImageEvaluator",
    "CLIPScoreEvaluator",
    "ImageRewardEvaluator",
    "HPSv2Evaluator",
    "PickScoreEvaluator",
    "scores_from_floats",
    "clip_preprocess",
    "conversion_command",
]

logger = logging.getLogger(__name__)

EVALUATORS_DIR_HINT = "ComfyUI/models/evaluators"
CLIP_MAX_TOKENS = 77
IMAGEREWARD_MAX_TOKENS = 35
HPS_WEIGHTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}   # files of huggingface.co/xswu/HPSv2

Progress = Callable[[int, int], None]


# ---- results --------------------------------------------------------------------------------


@dataclass
class ImageScores:
    """One score per image, in the evaluator's own units (higher is better).

    Attributes:
        scores: ``[B]`` float32 CPU tensor, aligned with the image batch. Never normalised across
            the batch.
        evaluator: name of the evaluator, including anything that changes its scale (model,
            version), e.g. ``"hpsv2.1"`` or ``"clipscore:ViT-L-14:laion2b_s32b_b82k"``.
        prompts: the prompt each image was scored against (``B`` entries).
    """

    scores: Tensor
    evaluator: str
    prompts: list[str]

    def __post_init__(self) -> None:
        scores = torch.as_tensor(self.scores).detach()
        if scores.ndim != 1:
            raise ValueError(f"ImageScores.scores must be [B], got shape {tuple(scores.shape)}")
        self.scores = scores.to(device="cpu", dtype=torch.float32)
        self.prompts = [str(p) for p in self.prompts]
        if len(self.prompts) != len(self):
            raise ValueError(f"ImageScores: {len(self)} scores but {len(self.prompts)} prompts")
        self.evaluator = str(self.evaluator)

    def __len__(self) -> int:
        return self.scores.shape[0]

    def tolist(self) -> list[float]:
        return [float(s) for s in self.scores]

    def order(self, descending: bool = True) -> Tensor:
        """Image indices from best to worst (stable; NaN last), ``[B]`` int64."""
        return order_scores(self.scores, descending)


class EvaluatorUnavailable(RuntimeError):
    """An evaluator can't be built here: its package or weights are missing, or the weights don't fit.

    ``problem`` says what is wrong; ``fix`` says exactly what to ``pip install`` and where to put
    which file. The message is ``"<problem> Fix: <fix>"``.
    """

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}")


def conversion_command(pt_path: str) -> str:
    """A one-line command that turns a ``.pt`` state dict into the ``.safetensors`` file we read.

    It runs ``torch.load(..., weights_only=True)`` (PyTorch's restricted loader) once, on the
    user's machine, on a file the user chose.
    """
    src = os.path.abspath(pt_path)
    dst = os.path.splitext(src)[0] + ".safetensors"
    return (
        'python -c "import torch; from safetensors.torch import save_file; '
        f"sd = torch.load(r'{src}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        f"save_file({{k: v.clone().contiguous() for k, v in sd.items()}}, r'{dst}')\""
    )


def _import(module: str, pip_name: str, evaluator: str, then: str):
    """Import an optional package, or raise EvaluatorUnavailable saying what to pip install."""
    try:
        return importlib.import_module(module)
    except Exception as e:      # ImportError, or a package that fails while importing its own dependencies
        reason = str(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"
        raise EvaluatorUnavailable(
            f"{evaluator} needs the Python package '{pip_name}' (module '{module}'), which can't be imported "
            f"({reason}).",
            f"run `pip install {pip_name}` in ComfyUI's Python environment and restart ComfyUI; then {then}",
        ) from e


def _require_file(path: Optional[str], evaluator: str, what: str, where: str) -> str:
    if not path or not os.path.isfile(path):
        shown = f"'{path}' is not a file" if path else "no weights file was given"
        raise EvaluatorUnavailable(f"{evaluator}: {shown}.", f"put {what} in {where} and select it.")
    return path


def _require_safetensors(path: str, evaluator: str) -> dict[str, Tensor]:
    """Read a state dict from .safetensors; refuse pickled checkpoints (we never unpickle)."""
    if not path.lower().endswith((".safetensors", ".sft")):
        raise EvaluatorUnavailable(
            f"{evaluator}: '{os.path.basename(path)}' is a pickled PyTorch checkpoint; this pack only reads "
            ".safetensors weights (loading a pickle can run code).",
            f"convert it once and put the .safetensors file in {EVALUATORS_DIR_HINT}: {conversion_command(path)}",
        )
    from safetensors.torch import load_file

    state = load_file(path, device="cpu")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ---- images and prompts ---------------------------------------------------------------------


def _check_images(images: Tensor) -> Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` (or one ``[H, W, C]``) -> float ``[B, H, W, 3]`` in 0..1."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, H, W, 3], got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be [B, H, W, 3] (ComfyUI IMAGE), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    images = images.float()
    if images.shape[-1] == 1:
        images = images.expand(*images.shape[:-1], 3)
    elif images.shape[-1] == 4:                      # drop alpha
        images = images[..., :3]
    return images.clamp(0.0, 1.0)


def _expand_prompts(prompts: Union[str, Sequence[str]], n: int) -> list[str]:
    """One prompt per image: a single prompt is shared by every image."""
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = [str(p) for p in prompts]
    if len(prompts) == 1:
        return prompts * n
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images; give one prompt for all images or one per image")
    return prompts


def _to_pil(images: Tensor) -> list:
    """``[B, H, W, 3]`` in 0..1 -> PIL images, quantised the way ComfyUI's SaveImage does."""
    import numpy as np
    from PIL import Image

    arrays = (255.0 * images.detach().float().cpu().numpy()).clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def _to_uint8_arrays(images: Tensor) -> list:
    import numpy as np

    arrays = (255.0 * images.detach().float().cpu().numpy()).clip(0, 255).astype(np.uint8)
    return list(arrays)


def clip_preprocess(images: Tensor, size: Union[int, Sequence[int]], mean: Sequence[float], std: Sequence[float],
                    interpolation: str = "bicubic", resize_mode: str = "shortest", fill: float = 0.0) -> Tensor:
    """open_clip's evaluation transform, applied to a tensor batch (no PIL round trip).

    Args:
        images: ``[B, H, W, 3]`` floats in 0..1 (ComfyUI IMAGE), on the device to compute on.
        size: model input side (int) or ``(height, width)``.
        mean, std: per-channel normalisation of the model.
        interpolation: ``"bicubic"`` or ``"bilinear"`` (antialiased, as PIL resizes).
        resize_mode: ``"shortest"`` (resize the short side to ``size``, centre crop; the CLIP
            default), ``"longest"`` (fit the long side, pad with ``fill``) or ``"squash"``.

    Returns:
        ``[B, 3, h, w]`` float32, normalised. Each image is processed on its own.
    """
    x = images.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    th, tw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = "bilinear" if interpolation == "bilinear" else "bicubic"

    def resize(t: Tensor, hw: tuple[int, int]) -> Tensor:
        if tuple(t.shape[-2:]) == hw:
            return t
        return F.interpolate(t, size=hw, mode=mode, align_corners=False, antialias=True)

    if resize_mode == "squash" or (resize_mode == "shortest" and th != tw):
        x = resize(x, (th, tw))
    elif resize_mode == "longest":
        scale = min(th / h, tw / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = resize(x, (nh, nw))
        top, left = (th - nh) // 2, (tw - nw) // 2
        x = F.pad(x, (left, tw - nw - left, top, th - nh - top), value=fill)
    else:
        # torchvision Resize(int): the short side becomes `size`, the long side int(size * long / short).
        if h <= w:
            nh, nw = th, int(th * w / h)
        else:
            nh, nw = int(th * h / w), th
        x = resize(x, (nh, nw))
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        x = x[..., top:top + th, left:left + tw]
    x = x.clamp(0.0, 1.0)          # bicubic overshoots; PIL clamps to uint8
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _open_clip_token_count(tokenizer, prompt: str) -> Optional[int]:
    """Tokens of ``prompt`` including start/end tokens, without truncation (None if unknown)."""
    try:
        if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):      # open_clip SimpleTokenizer
            return len(tokenizer.encode(prompt)) + 2
        inner = getattr(tokenizer, "tokenizer", None)                                # open_clip HFTokenizer
        if inner is not None:
            return len(inner(prompt)["input_ids"])
    except Exception:   # a token count is only used for a warning
        logger.debug("could not count the tokens of %r", prompt, exc_info=True)
    return None


# ---- base -----------------------------------------------------------------------------------


class ImageEvaluator:
    """Scores images against prompts, one number per image.

    Subclasses set :attr:`name` and :attr:`max_prompt_tokens`, implement :meth:`_score_batch` and,
    for the truncation warning, :meth:`count_tokens`. :meth:`score` checks the inputs, warns about
    prompts the evaluator truncates, runs batches of :attr:`batch_size` images (results do not
    depend on it) and returns :class:`ImageScores`.

    With ``offload_device`` set (e.g. ``"cpu"`` while ``device`` is a GPU), the model is kept there
    and moved to ``device`` only while scoring.
    """

    name: str = "evaluator"
    max_prompt_tokens: int = CLIP_MAX_TOKENS
    batch_size: int = 8

    def __init__(self, device: Union[str, torch.device] = "cpu",
                 offload_device: Union[str, torch.device, None] = None, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device) if offload_device is not None else None
        if self.offload_device == self.device:
            self.offload_device = None
        self.batch_size = batch_size

    @property
    def load_device(self) -> torch.device:
        """Where the model lives between calls."""
        return self.offload_device or self.device

    # -- for subclasses --
    def modules(self) -> list[nn.Module]:
        """The torch modules to move between ``offload_device`` and ``device``."""
        return []

    def count_tokens(self, prompt: str) -> Optional[int]:
        """Number of tokens of ``prompt`` as the evaluator's tokenizer sees it (None if unknown)."""
        return None

    def _score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``[b, H, W, 3]`` images (on :attr:`device`) and b prompts -> ``[b]`` scores."""
        raise NotImplementedError

    def _move(self, device: torch.device) -> None:
        for module in self.modules():
            module.to(device)

    # -- public --
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.modules() for p in m.parameters())

    def warn_long_prompts(self, prompts: Sequence[str]) -> list[str]:
        """Log a warning for every distinct prompt longer than :attr:`max_prompt_tokens`; return them."""
        long = []
        for prompt in dict.fromkeys(prompts):
            n = self.count_tokens(prompt)
            if n is not None and n > self.max_prompt_tokens:
                long.append(prompt)
                shown = prompt if len(prompt) <= 160 else prompt[:157] + "..."
                logger.warning(
                    "%s reads at most %d tokens; this prompt has %d and is truncated, so the score ignores "
                    "its end: %r", self.name, self.max_prompt_tokens, n, shown)
        return long

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        if self.offload_device is None:
            yield
            return
        self._move(self.device)
        try:
            yield
        finally:
            self._move(self.offload_device)

    def score(self, images: Tensor, prompts: Union[str, Sequence[str]],
              progress: Optional[Progress] = None) -> ImageScores:
        """Score each image against its prompt.

        Args:
            images: ``[B, H, W, 3]`` floats in 0..1 (ComfyUI IMAGE).
            prompts: ``B`` prompts, or one prompt for all images.
            progress: called as ``progress(done, B)`` after each batch (also a place to raise
                an interruption).

        Returns:
            :class:`ImageScores` with ``B`` scores in batch order.
        """
        images = _check_images(images)
        n = images.shape[0]
        prompts = _expand_prompts(prompts, n)
        self.warn_long_prompts(prompts)
        values = []
        with self._on_device(), torch.inference_mode():
            for start in range(0, n, self.batch_size):
                end = min(start + self.batch_size, n)
                chunk = images[start:end].to(self.device)
                values.append(self._score_batch(chunk, prompts[start:end]).detach().float().cpu().reshape(-1))
                if progress is not None:
                    progress(end, n)
        scores = torch.cat(values) if values else torch.zeros(0)
        return ImageScores(scores=scores, evaluator=self.name, prompts=prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r})"


# ---- CLIPScore ------------------------------------------------------------------------------


def _filter_kwargs(fn, kwargs: dict) -> dict:
    # Only keywords the installed open_clip names: it forwards unknown ones to the model class.
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _cached_pretrained(open_clip, model_name: str, tag: str, cache_dir: Optional[str]):
    """(local path or "" if not cached, tag config) of an open_clip pretrained tag; (None, {}) if unknown.

    Looks only in the caches open_clip downloads to (Hugging Face hub cache, ``~/.cache/clip``);
    never downloads.
    """
    get_cfg = getattr(open_clip, "get_pretrained_cfg", None)
    cfg = dict(get_cfg(model_name, tag) or {}) if get_cfg else {}
    if not cfg:
        return None, {}
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"], cfg
    hub = cfg.get("hf_hub") or ""
    if hub:
        repo, filename = os.path.split(hub)
        if filename:
            stem, ext = os.path.splitext(filename)
            names = [filename] if ext == ".safetensors" else [stem + ".safetensors", filename]
        else:
            names = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            for name in names:
                path = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
                if isinstance(path, str) and os.path.isfile(path):
                    return path, cfg
    url = cfg.get("url") or ""
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path, cfg
    return "", cfg


class CLIPScoreEvaluator(ImageEvaluator):
    """CLIPScore with an open_clip model: ``100 * max(cos(image_emb, text_emb), 0)``.

    The scale is the usual one of CLIPScore tables and of torchmetrics' ``CLIPScore`` (Hessel et
    al. 2021 write ``w * max(cos, 0)`` with w = 2.5; divide by 40 for that scale). Images are
    preprocessed from the tensor with the model's size, mean and std (resize, centre crop,
    normalise). Prompts longer than the text context (77 tokens) are truncated; a warning names
    them.

    Args:
        model_name: an open_clip architecture, e.g. ``"ViT-B-32"``, ``"ViT-L-14"``; use a
            ``-quickgelu`` name (``"ViT-B-32-quickgelu"``) for OpenAI's original weights from a file.
        weights: a local checkpoint file with both towers (``.safetensors`` preferred), or an
            open_clip pretrained tag (e.g. ``"laion2b_s34b_b79k"``) whose weights are already in the
            open_clip / Hugging Face cache. Nothing is downloaded.
        device: where to compute.
        allow_random_weights: with ``weights=None``, build random weights (tests only: the
            scores mean nothing).
        offload_device: where to keep the model between calls (see :class:`ImageEvaluator`).
        precision: open_clip precision (``"fp32"``, ``"fp16"``, ``"bf16"``).
        cache_dir: the Hugging Face / open_clip cache to look in for a pretrained tag.
    """

    def __init__(self, model_name: str = "ViT-B-32", weights: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", allow_random_weights: bool = False, *,
                 offload_device: Union[str, torch.device, None] = None, precision: str = "fp32",
                 cache_dir: Optional[str] = None, batch_size: int = 8):
        super().__init__(device, offload_device, batch_size)
        where = (f"put a full open_clip checkpoint of {model_name} (image and text towers, e.g. "
                 f"open_clip_model.safetensors from its Hugging Face repo) in {EVALUATORS_DIR_HINT} "
                 "(or ComfyUI/models/clip) and select it, or name an open_clip pretrained tag whose weights are "
                 "already in your open_clip / Hugging Face cache.")
        open_clip = _import("open_clip", "open_clip_torch", "CLIPScore", where)
        if model_name not in open_clip.list_models():
            raise EvaluatorUnavailable(f"CLIPScore: open_clip has no model '{model_name}'.",
                                       "use an open_clip model name such as ViT-B-32, ViT-L-14 or ViT-H-14.")
        extra: dict = {}
        if weights is None or str(weights).strip() == "":
            if not allow_random_weights:
                tags = list(getattr(open_clip, "list_pretrained_tags_by_model", lambda _m: [])(model_name))
                tag_hint = f" (tags of {model_name}: {', '.join(tags[:6])})" if tags else ""
                raise EvaluatorUnavailable(f"CLIPScore: no weights given for {model_name}.", where + tag_hint)
            pretrained, label = None, "random-weights"
            logger.warning("CLIPScore %s with random weights: the scores mean nothing (tests only).", model_name)
        elif os.path.isfile(weights):
            pretrained, label = weights, os.path.splitext(os.path.basename(weights))[0]
        else:
            path, cfg = _cached_pretrained(open_clip, model_name, weights, cache_dir)
            if path is None:
                raise EvaluatorUnavailable(f"CLIPScore: '{weights}' is neither a file nor an open_clip pretrained tag "
                                           f"of {model_name}.", where)
            if not path:
                raise EvaluatorUnavailable(
                    f"CLIPScore: the weights of pretrained tag '{weights}' ({model_name}) are not in your open_clip / "
                    "Hugging Face cache, and this pack never downloads.",
                    f"download them yourself (source: {cfg.get('hf_hub') or cfg.get('url')}), or {where}")
            pretrained, label = path, weights
            extra = {"force_quick_gelu": bool(cfg.get("quick_gelu", False)), "image_mean": cfg.get("mean"),
                     "image_std": cfg.get("std"), "image_interpolation": cfg.get("interpolation"),
                     "image_resize_mode": cfg.get("resize_mode")}
            extra = {k: v for k, v in extra.items() if v is not None}
        kwargs = _filter_kwargs(open_clip.create_model_and_transforms,
                                {"precision": precision, "device": self.load_device, "weights_only": True,
                                 "cache_dir": cache_dir, **extra})
        try:
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EvaluatorUnavailable(
                f"CLIPScore: '{weights}' could not be loaded as open_clip {model_name}: {first[:300]}",
                f"use a full open_clip checkpoint of {model_name}; ComfyUI/models/clip usually holds text encoders "
                "only (clip_l.safetensors, ...), which have no image tower, and OpenAI's original weights need the "
                "-quickgelu model name.") from e
        model.eval()
        self.model = model
        self.model_name = model_name
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg_fn = getattr(open_clip, "get_model_preprocess_cfg", None)
        pp = dict(cfg_fn(model)) if cfg_fn else {}
        visual = getattr(model, "visual", model)
        self.image_size = pp.get("size") or getattr(visual, "image_size", 224)
        self.image_mean = tuple(pp.get("mean") or getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        self.image_std = tuple(pp.get("std") or getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        self.interpolation = pp.get("interpolation", "bicubic")
        self.resize_mode = pp.get("resize_mode", "shortest")
        self.max_prompt_tokens = int(getattr(self.tokenizer, "context_length", None)
                                     or getattr(model, "context_length", None) or CLIP_MAX_TOKENS)
        self.name = f"clipscore:{model_name}:{label}"

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def count_tokens(self, prompt: str) -> Optional[int]:
        return _open_clip_token_count(self.tokenizer, prompt)

    def preprocess(self, images: Tensor) -> Tensor:
        return clip_preprocess(images, self.image_size, self.image_mean, self.image_std,
                               self.interpolation, self.resize_mode)

    def _score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(images).to(dtype)
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        tokens = self.tokenizer(unique).to(self.device)
        image_emb = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        cosine = (image_emb * text_emb[index]).sum(-1)
        return 100.0 * cosine.clamp(min=0.0)


# ---- ImageReward ----------------------------------------------------------------------------


class ImageRewardEvaluator(ImageEvaluator):
    """ImageReward v1.0 (package ``image-reward``): the BLIP-based reward, standardised as the
    package does (``(mlp(feature) - 0.1672) / 1.0333``).

    ImageReward tokenises prompts to at most 35 tokens (BERT, including [CLS]/[SEP]); longer
    prompts are truncated and a warning names them. Its scores are meaningful for comparing images
    of one prompt.

    Args:
        weights_path: ``ImageReward.safetensors`` (the ``ImageReward.pt`` of
            huggingface.co/THUDM/ImageReward converted once; see :func:`conversion_command`).
        med_config: the BERT config ``med_config.json`` of the same repository; by default the file
            of that name next to the weights. The ``bert-base-uncased`` tokenizer must be in the
            Hugging Face cache.
    """

    name = "imagereward"
    max_prompt_tokens = IMAGEREWARD_MAX_TOKENS

    def __init__(self, weights_path: Optional[str], device: Union[str, torch.device] = "cpu",
                 med_config: Optional[str] = None, *, offload_device: Union[str, torch.device, None] = None,
                 batch_size: int = 8):
        super().__init__(device, offload_device, batch_size)
        where = (f"put ImageReward.safetensors (ImageReward.pt from huggingface.co/THUDM/ImageReward, converted to "
                 f".safetensors) and med_config.json (same repository) together in {EVALUATORS_DIR_HINT}.")
        _import("ImageReward", "image-reward", "ImageReward", where)
        model_module = _import("ImageReward.ImageReward", "image-reward", "ImageReward", where)
        _require_file(weights_path, "ImageReward", "ImageReward.safetensors (and med_config.json beside it)",
                      EVALUATORS_DIR_HINT)
        med_config = med_config or os.path.join(os.path.dirname(os.path.abspath(weights_path)), "med_config.json")
        if not os.path.isfile(med_config):
            raise EvaluatorUnavailable(
                f"ImageReward: its BERT config '{med_config}' is missing (without it the package would download it).",
                "put med_config.json from huggingface.co/THUDM/ImageReward next to the ImageReward weights file.")
        state = _require_safetensors(weights_path, "ImageReward")
        try:
            model = model_module.ImageReward(med_config=med_config, device=self.load_device)
        except OSError as e:
            raise EvaluatorUnavailable(
                f"ImageReward: its BLIP model could not be built ({str(e).splitlines()[0][:300]}).",
                "ImageReward needs the bert-base-uncased tokenizer in your Hugging Face cache; add it there "
                "(e.g. `huggingface-cli download bert-base-uncased`) and retry.") from e
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing:
            raise EvaluatorUnavailable(
                f"ImageReward: '{os.path.basename(weights_path)}' lacks {len(missing)} weights of the ImageReward model "
                f"(e.g. {missing[0]}); it is not an ImageReward checkpoint.",
                f"use ImageReward.pt from huggingface.co/THUDM/ImageReward converted to .safetensors: "
                f"{conversion_command('ImageReward.pt')}")
        model.to(self.load_device).eval()
        self.model = model

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def _move(self, device: torch.device) -> None:
        self.model.to(device)
        self.model.device = device      # ImageReward keeps its device as an attribute

    def count_tokens(self, prompt: str) -> Optional[int]:
        try:
            return len(self.model.blip.tokenizer(prompt)["input_ids"])
        except Exception:
            return None

    def _score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        # The package's ImageReward.score() for a batch: one image and prompt per row.
        model = self.model
        pixels = torch.stack([model.preprocess(p) for p in _to_pil(images)]).to(self.device)
        text = model.blip.tokenizer(prompts, padding="max_length", truncation=True,
                                    max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt").to(self.device)
        image_embeds = model.blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = model.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                      encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                      return_dict=True)
        features = out.last_hidden_state[:, 0, :].float()
        rewards = (model.mlp(features) - model.mean) / model.std
        return rewards.reshape(-1)


# ---- HPSv2 ----------------------------------------------------------------------------------


class HPSv2Evaluator(ImageEvaluator):
    """Human Preference Score v2 (package ``hpsv2``): ``100 * cos(image, text)`` of its ViT-H-14.

    The package returns the plain cosine (about 0.27); the factor 100 gives the units of the HPS
    papers and leaderboards (e.g. 26.95). v2.0 and v2.1 scores are not comparable, so the version
    is part of :attr:`name` (``"hpsv2.0"`` / ``"hpsv2.1"``). Prompts over 77 tokens are truncated.

    Args:
        weights_path: the HPS checkpoint as ``.safetensors`` (``HPS_v2.1_compressed.pt`` or
            ``HPS_v2_compressed.pt`` of huggingface.co/xswu/HPSv2, converted once; see
            :func:`conversion_command`).
        version: ``"v2.0"`` or ``"v2.1"``, the version of that file.
    """

    max_prompt_tokens = CLIP_MAX_TOKENS
    architecture = "ViT-H-14"

    def __init__(self, weights_path: Optional[str], version: str = "v2.1", device: Union[str, torch.device] = "cpu",
                 *, offload_device: Union[str, torch.device, None] = None, batch_size: int = 8):
        super().__init__(device, offload_device, batch_size)
        if version not in HPS_WEIGHTS:
            raise ValueError(f"HPSv2 version must be one of {sorted(HPS_WEIGHTS)}, got {version!r}")
        self.version = version
        self.name = f"hps{version}"
        stem = os.path.splitext(HPS_WEIGHTS[version])[0]
        where = (f"put {stem}.safetensors ({HPS_WEIGHTS[version]} from huggingface.co/xswu/HPSv2, converted to "
                 f".safetensors) in {EVALUATORS_DIR_HINT}.")
        _import("hpsv2", "hpsv2", f"HPS{version}", where)
        oc = _import("hpsv2.src.open_clip", "hpsv2", f"HPS{version}", where)
        _require_file(weights_path, f"HPS{version}", f"{stem}.safetensors", EVALUATORS_DIR_HINT)
        state = _require_safetensors(weights_path, f"HPS{version}")
        # As hpsv2.img_score.initialize_model, but without the pretrained tag (it would download the
        # LAION ViT-H-14): the HPS checkpoint holds the whole model.
        model, _, preprocess_val = oc.create_model_and_transforms(
            self.architecture, None, precision="fp32", device=self.load_device, jit=False,
            force_quick_gelu=False, force_custom_text=False, force_patch_dropout=False, force_image_size=None,
            pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True, aug_cfg={},
            output_dict=True, with_score_predictor=False, with_region_predictor=False)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise EvaluatorUnavailable(
                f"HPS{version}: '{os.path.basename(weights_path)}' is not an HPSv2 checkpoint "
                f"({str(e).splitlines()[0][:300]}).",
                where) from e
        model.to(self.load_device).eval()
        self.model = model
        self.preprocess = preprocess_val
        self.tokenizer = oc.get_tokenizer(self.architecture)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def count_tokens(self, prompt: str) -> Optional[int]:
        return _open_clip_token_count(self.tokenizer, prompt)

    def _score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = torch.stack([self.preprocess(p) for p in _to_pil(images)]).to(self.device)
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        tokens = self.tokenizer(unique).to(self.device)
        out = self.model(pixels, tokens)
        if isinstance(out, dict):
            image_emb, text_emb = out["image_features"], out["text_features"]
        else:
            image_emb, text_emb = out[0], out[1]
        image_emb = F.normalize(image_emb.float(), dim=-1)
        text_emb = F.normalize(text_emb.float(), dim=-1)
        return 100.0 * (image_emb * text_emb[index]).sum(-1)


# ---- PickScore ------------------------------------------------------------------------------


class PickScoreEvaluator(ImageEvaluator):
    """PickScore v1 (``transformers`` CLIP): ``logit_scale * cos(image, text)`` per image.

    This is the logit PickScore's authors softmax over a set of images; the softmax depends on
    batch size and is not used. Prompts over 77 tokens are truncated.

    Args:
        model_dir: a local folder with the PickScore_v1 model (huggingface.co/yuvalkirstain/PickScore_v1),
            or that repository id when it is already in the Hugging Face cache. Nothing is downloaded.
        processor_dir: the CLIP processor (image preprocessing and tokenizer); PickScore uses
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s. Defaults to ``model_dir``.
    """

    name = "pickscore"
    max_prompt_tokens = CLIP_MAX_TOKENS

    def __init__(self, model_dir: Optional[str], processor_dir: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", *, offload_device: Union[str, torch.device, None] = None,
                 batch_size: int = 8):
        super().__init__(device, offload_device, batch_size)
        where = ("put the PickScore_v1 model (huggingface.co/yuvalkirstain/PickScore_v1) in a folder, e.g. "
                 f"{EVALUATORS_DIR_HINT}/PickScore_v1, and the processor files of "
                 "laion/CLIP-ViT-H-14-laion2B-s32B-b79K (preprocessor_config.json and tokenizer files) in another "
                 "folder, or have both repositories in your Hugging Face cache.")
        transformers = _import("transformers", "transformers", "PickScore", where)
        if not model_dir:
            raise EvaluatorUnavailable("PickScore: no model folder given.", where)
        processor_dir = processor_dir or model_dir
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(processor_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise EvaluatorUnavailable(
                f"PickScore: no CLIP processor could be read from '{processor_dir}' ({str(e).splitlines()[0][:300]}).",
                where) from e
        try:
            model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise EvaluatorUnavailable(
                f"PickScore: no model could be read from '{model_dir}' ({str(e).splitlines()[0][:300]}).", where) from e
        if not hasattr(model, "logit_scale"):
            raise EvaluatorUnavailable(f"PickScore: '{model_dir}' holds a {type(model).__name__}, not a CLIP model.",
                                       where)
        self.model = model.float().to(self.load_device).eval()
        config = getattr(getattr(model, "config", None), "text_config", None)
        self.max_prompt_tokens = int(getattr(config, "max_position_embeddings", CLIP_MAX_TOKENS) or CLIP_MAX_TOKENS)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def count_tokens(self, prompt: str) -> Optional[int]:
        try:
            return len(self.processor.tokenizer(prompt)["input_ids"])
        except Exception:
            return None

    def _score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        image_inputs = self.processor(images=_to_uint8_arrays(images), return_tensors="pt")
        text_inputs = self.processor(text=unique, padding=True, truncation=True,
                                     max_length=self.max_prompt_tokens, return_tensors="pt")
        out = self.model(input_ids=text_inputs["input_ids"].to(self.device),
                         attention_mask=text_inputs["attention_mask"].to(self.device),
                         pixel_values=image_inputs["pixel_values"].to(self.device, torch.float32))
        image_emb = F.normalize(out.image_embeds.float(), dim=-1)
        text_emb = F.normalize(out.text_embeds.float(), dim=-1)
        return self.model.logit_scale.exp().float() * (image_emb * text_emb[index]).sum(-1)


# ---- other scorers --------------------------------------------------------------------------


def _flatten(values) -> list[float]:
    if isinstance(values, Tensor):
        return [float(v) for v in values.detach().reshape(-1).cpu()]
    if isinstance(values, (list, tuple)):
        out = []
        for v in values:
            out.extend(_flatten(v))
        return out
    try:
        import numpy as np

        if isinstance(values, np.ndarray):
            return [float(v) for v in values.reshape(-1)]
    except ImportError:
        pass
    return [float(values)]


def scores_from_floats(values, evaluator_name: str, prompts: Union[str, Sequence[str]]) -> ImageScores:
    """Wrap the numbers of another scorer (one per image, higher is better) as :class:`ImageScores`.

    Args:
        values: floats (a list, nested lists, a tensor or an array), one per image in batch order.
        evaluator_name: what produced them (kept with the scores, e.g. for training data).
        prompts: one prompt for all images or one per image.

    Raises:
        ValueError: no values, a non-finite value, or an empty evaluator name.
    """
    scores = _flatten(values)
    if not scores:
        raise ValueError("scores_from_floats: no scores given")
    bad = [i for i, v in enumerate(scores) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"scores_from_floats: score {bad[0]} is {scores[bad[0]]}; every score must be a finite number")
    name = str(evaluator_name).strip()
    if not name:
        raise ValueError("scores_from_floats: name the evaluator that produced the scores")
    return ImageScores(scores=torch.tensor(scores, dtype=torch.float32), evaluator=name,
                       prompts=_expand_prompts(prompts, len(scores)))
