"""CLIPScore with an open_clip model: ``100 * max(cos(image, text), 0)``.

Images are preprocessed from the tensor (:func:`clip_preprocess`, open_clip's evaluation transform
without a PIL round trip). Weights come from a local file or from an open_clip pretrained tag that
is already in the open_clip / Hugging Face cache (:func:`_cached_pretrained`); nothing is downloaded.
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import (
    CLIP_MAX_TOKENS,
    EVALUATORS_DIR_HINT,
    EvaluatorUnavailable,
    ImageEvaluator,
    import_optional,
    open_clip_token_count,
)

logger = logging.getLogger(__name__)


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
        try:    # local: optional (open_clip's own dependency), and only needed to look up a pretrained tag
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
        open_clip = import_optional("open_clip", "open_clip_torch", "CLIPScore", where)
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
        return open_clip_token_count(self.tokenizer, prompt)

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
