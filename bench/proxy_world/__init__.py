"""Proxy world: a text-to-image task with a prompt grammar (grammar.py), a fixed tokenizer
(tokens.py), an analytic renderer (render.py) and an analytic, smooth evaluator (evaluator.py),
for measuring early seed selection without pretrained weights. checks.py measures the evaluator.

Pure torch/numpy; never imports ComfyUI.
"""
from .grammar import (COLORS, COUNTS, RELATIONS, SHAPES, Obj, Scene, all_prompts, every_scene,
                      parse_prompt, prompt_of, sample_scene, split_prompts)
from .tokens import VOCAB, detokenize, tokenize, tokenize_batch
from .render import (BACKGROUND, COLOR_RGB, Placed, layout_scene, rasterize, render, render_batch,
                     render_layout)
from .evaluator import score, score_terms
from .checks import CORRUPTIONS, corrupt, evaluator_report

__all__ = [
    "COLORS", "COUNTS", "RELATIONS", "SHAPES", "Obj", "Scene", "all_prompts", "every_scene",
    "parse_prompt", "prompt_of", "sample_scene", "split_prompts", "VOCAB", "detokenize", "tokenize",
    "tokenize_batch", "BACKGROUND", "COLOR_RGB", "Placed", "layout_scene", "rasterize", "render",
    "render_batch", "render_layout", "score", "score_terms", "CORRUPTIONS", "corrupt",
    "evaluator_report",
]
