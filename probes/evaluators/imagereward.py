"""ImageReward v1.0 (package ``image-reward``): the BLIP-based reward, standardised as the package does."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .base import (
    EVALUATORS_DIR_HINT,
    EvaluatorUnavailable,
    ImageEvaluator,
    conversion_command,
    import_optional,
    read_safetensors,
    require_file,
    to_pil,
)

IMAGEREWARD_MAX_TOKENS = 35


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
        import_optional("ImageReward", "image-reward", "ImageReward", where)
        model_module = import_optional("ImageReward.ImageReward", "image-reward", "ImageReward", where)
        require_file(weights_path, "ImageReward", "ImageReward.safetensors (and med_config.json beside it)",
                      EVALUATORS_DIR_HINT)
        med_config = med_config or os.path.join(os.path.dirname(os.path.abspath(weights_path)), "med_config.json")
        if not os.path.isfile(med_config):
            raise EvaluatorUnavailable(
                f"ImageReward: its BERT config '{med_config}' is missing (without it the package would download it).",
                "put med_config.json from huggingface.co/THUDM/ImageReward next to the ImageReward weights file.")
        state = read_safetensors(weights_path, "ImageReward")
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
        pixels = torch.stack([model.preprocess(p) for p in to_pil(images)]).to(self.device)
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
