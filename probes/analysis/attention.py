"""Cross-attention maps: which image regions each prompt token draws on, and how sharp that is.

The recorder (ComfyUI side) hands over, for every attention call of interest, the query and key
tensors; here they become image-to-text attention probabilities, averaged over heads, reshaped to
the call's token grid, resized to the latent and summed over calls (layers) per sampling step.

Shapes: ``q`` is ``[B, Nq, heads * d]`` (``layout="flat"``) or ``[B, heads, Nq, d]``
(``layout="heads"``, what ComfyUI calls ``skip_reshape``); ``k`` alike with ``Nk`` keys. The
softmax runs over *all* keys of the call (for joint attention: text and image tokens), as in the
model, and only the chosen text columns are kept.
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FLAT", "HEADS", "text_attention_probs", "tokens_to_map", "AttentionMaps", "spatial_entropy",
    "Word", "words_from_pieces", "select_tokens", "TokenSelectionError", "heat_colors", "overlay",
]

FLAT, HEADS = "flat", "heads"


def _split_heads(x: Tensor, heads: int, layout: str) -> Tensor:
    if layout == HEADS:
        return x
    if layout != FLAT:
        raise ValueError(f"unknown attention layout {layout!r}")
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(1, 2)


def text_attention_probs(q: Tensor, k: Tensor, heads: int, layout: str, query_rows: slice,
                         text_columns: Tensor, batch_rows: Sequence[int]) -> Tensor:
    """Attention probabilities of image queries on chosen text keys, averaged over heads and rows.

    Args:
        q, k: query and key tensors of one attention call (see the module docstring).
        heads: number of heads.
        layout: FLAT or HEADS.
        query_rows: which queries are image tokens (all for a UNet cross-attention; the image part
            of a joint text+image sequence).
        text_columns: indices of the keys (within the call's key sequence) to keep.
        batch_rows: the batch rows to average (the positive prompt's rows).

    Returns:
        ``[Nq_image, len(text_columns)]`` float32: mean over the rows and heads of
        ``softmax(q k^T / sqrt(d))`` restricted to those keys.
    """
    qh = _split_heads(q, heads, layout)[list(batch_rows)][:, :, query_rows]
    kh = _split_heads(k, heads, layout)[list(batch_rows)]
    scale = qh.shape[-1] ** -0.5
    total = None
    # one head at a time: a joint-attention logit matrix of every head at once can be gigabytes
    for h in range(qh.shape[1]):
        logits = torch.einsum("bqd,bkd->bqk", qh[:, h].float(), kh[:, h].float()) * scale
        probs = logits.softmax(dim=-1)[..., text_columns.to(logits.device)].mean(dim=0)
        total = probs if total is None else total + probs
    return (total / qh.shape[1]).float()


def tokens_to_map(probs: Tensor, grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """``[h * w, T]`` row-major token probabilities -> ``[T, H, W]`` maps resized to ``out_hw``
    (bilinear; the area covered by a token keeps its value)."""
    h, w = grid_hw
    if probs.shape[0] != h * w:
        raise ValueError(f"{probs.shape[0]} image tokens do not fill a {h}x{w} grid")
    maps = probs.T.reshape(1, -1, h, w)
    if (h, w) != tuple(out_hw):
        maps = F.interpolate(maps, size=tuple(out_hw), mode="bilinear", align_corners=False)
    return maps[0]


@dataclass
class AttentionMaps:
    """Per-step sums of token maps over attention calls (layers), at a fixed output size."""

    size: tuple[int, int]
    tokens: int
    sums: dict = field(default_factory=dict)         # step -> [T, H, W] float32
    counts: dict = field(default_factory=dict)       # step -> number of calls added
    layers: set = field(default_factory=set)         # (factor, grid) seen, for the summary

    def add(self, step: int, maps: Tensor) -> None:
        maps = maps.detach().float().cpu()
        if step in self.sums:
            self.sums[step] += maps
        else:
            self.sums[step] = maps.clone()
        self.counts[step] = self.counts.get(step, 0) + 1

    @property
    def steps(self) -> list[int]:
        return sorted(self.sums)

    def mean(self, step: int) -> Tensor:
        """``[T, H, W]``: the maps of ``step`` averaged over every recorded call (layers, heads, evaluations)."""
        return self.sums[step] / self.counts[step]


def spatial_entropy(maps: Tensor) -> Tensor:
    """Normalised spatial entropy of each map ``[T, H, W]`` -> ``[T]`` in ``[0, 1]``.

    Each map is made a distribution over its pixels (``p = m / sum m``); the entropy ``-sum p log p``
    is divided by ``log(H W)``: 1 = spread evenly over the image, 0 = all on one pixel. Diffuse
    early, localised late shows as a falling curve.
    """
    flat = maps.flatten(1).double().clamp_min(0)
    p = flat / flat.sum(dim=1, keepdim=True).clamp_min(1e-30)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)
    return (entropy / math.log(flat.shape[1])).float() if flat.shape[1] > 1 else torch.zeros(flat.shape[0])


# ---------------------------------------------------------------------------------------------- tokens

@dataclass
class Word:
    text: str
    positions: list[int]


_PUNCT = str.maketrans("", "", string.punctuation)


def _normal(text: str) -> str:
    return text.lower().translate(_PUNCT).strip()


def words_from_pieces(pieces: Sequence[Optional[str]]) -> list[Word]:
    """Group subword pieces into words. ``pieces[i]`` is the token string at context position i, or
    None for a special token (start, end, padding), which belongs to no word.

    CLIP BPE marks a word's last piece with ``</w>``; SentencePiece (T5) marks a word's first piece
    with ``▁``. Pieces of punctuation only are words of their own.
    """
    words: list[Word] = []
    current: Optional[Word] = None
    for position, piece in enumerate(pieces):
        if piece is None:
            current = None
            continue
        starts = piece.startswith("\u2581")
        ends = piece.endswith("</w>")
        text = piece.replace("</w>", "").replace("\u2581", "")
        if current is None or starts or (text and not _normal(text)):
            current = Word(text, [position])
            words.append(current)
        else:
            current.text += text
            current.positions.append(position)
        if ends or (text and not _normal(text)):      # a word ends, or punctuation stands alone
            current = None
    return [w for w in words if _normal(w.text)]


class TokenSelectionError(ValueError):
    """A requested word is not in the prompt (or a token index is out of range)."""


def select_tokens(query: str, words: Optional[Sequence[Word]], token_count: int) -> list[tuple[str, list[int]]]:
    """Resolve a comma-separated query to ``(label, context positions)`` pairs.

    Entries are words or phrases of the prompt (case and punctuation ignored; a phrase matches
    consecutive words; every occurrence counts) or token indices ``#i``. An empty query means every
    word of the prompt. ``words`` is None when the prompt is unknown: then only ``#i`` works.
    """
    entries = [e.strip() for e in query.split(",") if e.strip()]
    if not entries:
        if not words:
            raise TokenSelectionError("no words given and the prompt text is unknown; pick tokens by index, e.g. #1, #2")
        return [(w.text, list(w.positions)) for w in words]
    selected = []
    for entry in entries:
        index = re.fullmatch(r"#(\d+)", entry)
        if index:
            position = int(index.group(1))
            if position >= token_count:
                raise TokenSelectionError(f"token #{position} is out of range: the conditioning has {token_count} tokens")
            selected.append((entry, [position]))
            continue
        if not words:
            raise TokenSelectionError(f"'{entry}' can't be looked up without the prompt text and its text encoder; "
                                      f"connect clip and prompt, or pick tokens by index (#3)")
        target = [_normal(part) for part in entry.split()]
        positions = []
        for start in range(len(words) - len(target) + 1):
            if [_normal(w.text) for w in words[start:start + len(target)]] == target:
                for w in words[start:start + len(target)]:
                    positions.extend(w.positions)
        if not positions:
            known = ", ".join(dict.fromkeys(w.text for w in words))
            raise TokenSelectionError(f"'{entry}' is not a word of the prompt. Its words: {known}")
        selected.append((entry, positions))
    return selected


# ---------------------------------------------------------------------------------------------- pictures

def heat_colors(values: Tensor) -> Tensor:
    """``[H, W]`` values in 0..1 -> ``[H, W, 3]`` colours (black-blue-red-yellow-white ramp)."""
    v = values.clamp(0, 1)[..., None]
    anchors = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.1, 0.8], [0.9, 0.1, 0.1], [1.0, 0.9, 0.1], [1.0, 1.0, 1.0]])
    position = v * (len(anchors) - 1)
    low = position.floor().clamp(max=len(anchors) - 2).long()
    frac = position - low
    return anchors[low[..., 0]] * (1 - frac) + anchors[low[..., 0] + 1] * frac


def overlay(image: Tensor, attention_map: Tensor, alpha: float = 0.55) -> Tensor:
    """Blend a map over an ``[H, W, 3]`` image in 0..1, stretched to its own min..max (as DAAM shows
    them: the spatial entropy, not the picture, says how sharp a map is)."""
    m = F.interpolate(attention_map[None, None].float(), size=image.shape[:2], mode="bilinear",
                      align_corners=False)[0, 0]
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    return (1 - alpha) * image.float() + alpha * heat_colors(m)
