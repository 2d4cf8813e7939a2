"""Tiny text encoder of the proxy world, trained jointly with each diffusion model.

Word ids (``tokens.tokenize``, the fixed proxy-world vocabulary, padded to ``TEXT_LENGTH``) ->
token embedding + learned position embedding -> 2 pre-norm transformer layers -> final LayerNorm:

* ``context``: per-token features ``[B, TEXT_LENGTH, CONTEXT_DIM]`` (the cross-attention input,
  ComfyUI's ``c_crossattn``);
* ``pooled`` (``pooling``): ``"mean"``, a linear map of the mean over the token positions
  ``[B, POOLED_DIM]`` (SD3's ``pooled_output`` -> ``y``, trained with the DiT); or ``"tokens"``, the
  token features in order, flattened ``[B, TEXT_LENGTH * CONTEXT_DIM]`` (the UNet family's: the
  SD1.x UNet ignores ``pooled_output``, so only a probe reads it).

Why two: a mean over positions barely depends on word order ("a red cross below a yellow cross" and
its swap are 0.035 apart against a median of 4.3 between prompts), so a probe reading it cannot tell
which shape a relation names first. A real SD1.x pooled output is CLIP's end-of-text token after
causal attention, which does depend on order; ``"tokens"`` is the proxy world's order-aware stand-in
(bench/results/distilled_probe.md, "What the probe reads of its teacher").

Padding tokens are ordinary inputs (no attention mask), so the empty prompt ``""`` (all padding) has
a well-defined embedding: it is the unconditional embedding that classifier-free guidance uses as
the negative; training replaces ~10% of the prompts with ``""`` to learn it.

:meth:`TextEncoder.conditioning` returns a ComfyUI CONDITIONING ``[[context [1, L, C],
{"pooled_output": pooled [1, P]}]]``, ready for ``nodes.common_ksampler``.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Union

import torch
import torch.nn as nn

from .tokens import MAX_WORDS, VOCAB, tokenize_batch

TEXT_LENGTH = MAX_WORDS     # 8 words: the longest prompt of the grammar
CONTEXT_DIM = 64            # token width (cross-attention context)
POOLED_DIM = 64             # pooled vector width (SD3 adm / y)
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_FF = 128
POOLINGS = ("mean", "tokens")


class TextEncoder(nn.Module):
    """Token embedding + 2-layer transformer -> (context [B, L, C], pooled [B, P]); P is ``pooled_dim``
    under ``pooling="mean"`` and ``L * C`` under ``"tokens"`` (:attr:`pooled_width`)."""

    def __init__(self, width: int = CONTEXT_DIM, pooled_dim: int = POOLED_DIM, length: int = TEXT_LENGTH,
                 layers: int = TEXT_LAYERS, heads: int = TEXT_HEADS, ff: int = TEXT_FF, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.width, self.pooled_dim, self.length = int(width), int(pooled_dim), int(length)
        self.pooling = pooling
        self.token_embedding = nn.Embedding(len(VOCAB), width)
        self.position_embedding = nn.Parameter(torch.zeros(1, length, width))
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=ff, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        ])
        self.final_norm = nn.LayerNorm(width)
        # Built under either pooling so that every weights file holds the same tensors; "tokens" leaves it unread.
        self.pool_proj = nn.Linear(width, pooled_dim)

    def init_weights(self, generator: torch.Generator) -> None:
        """Deterministic initialisation from ``generator`` (N(0, 1/fan_in) matrices, zero biases,
        unit norms, N(0, 1) token embeddings, N(0, 0.02) position embeddings)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name == "token_embedding.weight":
                    p.copy_(torch.randn(p.shape, generator=generator))
                elif name == "position_embedding":
                    p.copy_(0.02 * torch.randn(p.shape, generator=generator))
                elif name.endswith("bias"):
                    p.zero_()
                elif p.ndim <= 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))

    @property
    def pooled_width(self) -> int:
        """Width of the pooled output this encoder returns."""
        return self.length * self.width if self.pooling == "tokens" else self.pooled_dim

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def tokens(self, prompts: Union[str, Sequence[str]]) -> torch.LongTensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        return tokenize_batch(list(prompts), self.length).to(self.device)

    def forward(self, ids: torch.LongTensor):
        """ids [B, L] -> (context [B, L, C], pooled [B, P])."""
        h = self.token_embedding(ids) + self.position_embedding[:, : ids.shape[1]]
        for layer in self.layers:
            h = layer(h)
        h = self.final_norm(h)
        if self.pooling == "tokens":
            return h, h.flatten(1)
        return h, self.pool_proj(h.mean(1))

    def encode(self, prompts: Union[str, Sequence[str]]):
        """Prompts (a string or a list) -> (context [B, L, C], pooled [B, P])."""
        return self(self.tokens(prompts))

    def conditioning(self, prompt: str) -> List:
        """ComfyUI CONDITIONING of one prompt: ``[[context [1, L, C], {"pooled_output": [1, P]}]]``.
        ``""`` gives the unconditional embedding (the negative for CFG)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        with torch.no_grad():
            context, pooled = self.encode([prompt])
        return [[context.detach().float().cpu(), {"pooled_output": pooled.detach().float().cpu()}]]
