"""PickScore v1 (``transformers`` CLIP): ``logit_scale * cos(image, text)`` per image."""
from __future__ import annotations

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
    to_uint8_arrays,
)


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
        transformers = import_optional("transformers", "transformers", "PickScore", where)
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
        image_inputs = self.processor(images=to_uint8_arrays(images), return_tensors="pt")
        text_inputs = self.processor(text=unique, padding=True, truncation=True,
                                     max_length=self.max_prompt_tokens, return_tensors="pt")
        out = self.model(input_ids=text_inputs["input_ids"].to(self.device),
                         attention_mask=text_inputs["attention_mask"].to(self.device),
                         pixel_values=image_inputs["pixel_values"].to(self.device, torch.float32))
        image_emb = F.normalize(out.image_embeds.float(), dim=-1)
        text_emb = F.normalize(out.text_embeds.float(), dim=-1)
        return self.model.logit_scale.exp().float() * (image_emb * text_emb[index]).sum(-1)
