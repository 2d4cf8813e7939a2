"""Human Preference Score v2 (package ``hpsv2``): ``100 * cos(image, text)`` of its ViT-H-14."""
from __future__ import annotations

import os
from typing import Optional, Union

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
    read_safetensors,
    require_file,
    to_pil,
)

HPS_WEIGHTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}   # files of huggingface.co/xswu/HPSv2


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
        import_optional("hpsv2", "hpsv2", f"HPS{version}", where)
        oc = import_optional("hpsv2.src.open_clip", "hpsv2", f"HPS{version}", where)
        require_file(weights_path, f"HPS{version}", f"{stem}.safetensors", EVALUATORS_DIR_HINT)
        state = read_safetensors(weights_path, f"HPS{version}")
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
        return open_clip_token_count(self.tokenizer, prompt)

    def _score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = torch.stack([self.preprocess(p) for p in to_pil(images)]).to(self.device)
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
