"""Fixed word vocabulary of the proxy-world grammar and a deterministic tokenizer.

Id 0 is padding, id 1 stands for any word outside the grammar. The vocabulary never depends on
data, so a model trained with it can be loaded anywhere.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from .grammar import COLORS, COUNT_WORDS, PLURALS, SHAPES

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

VOCAB: Tuple[str, ...] = (
    PAD, UNK,
    *[COUNT_WORDS[n] for n in sorted(COUNT_WORDS)],   # a two three
    "left", "right", "of", "above", "below",
    *COLORS,
    *SHAPES,
    *[PLURALS[s] for s in SHAPES],
)
WORD_TO_ID: Dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
MAX_WORDS = 8  # longest prompt: "a red circle left of a blue square"


def tokenize(prompt: str, length: int = 12) -> torch.LongTensor:
    """Word ids of ``prompt`` (lower-cased, split on whitespace), truncated or padded with 0 to
    ``length``."""
    ids = [WORD_TO_ID.get(w, UNK_ID) for w in prompt.lower().split()][:length]
    out = torch.zeros(length, dtype=torch.long)
    if ids:
        out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def tokenize_batch(prompts: Sequence[str], length: int = 12) -> torch.LongTensor:
    """LongTensor[len(prompts), length]."""
    if not prompts:
        return torch.zeros(0, length, dtype=torch.long)
    return torch.stack([tokenize(p, length) for p in prompts])


def detokenize(ids) -> str:
    words: List[str] = [VOCAB[int(i)] for i in ids if int(i) != PAD_ID]
    return " ".join(words)
