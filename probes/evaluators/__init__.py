"""Image evaluators: the scores of finished images that probes learn to predict.

Every evaluator scores each image against its prompt on its own. Scores are never softmaxed or
normalised across the batch, so an image gets the same score alone or among N others and scores
of different runs and batch sizes can be compared.

- :class:`CLIPScoreEvaluator` (open_clip, ``clipscore.py``): ``100 * max(cos(image, text), 0)``.
- :class:`ImageRewardEvaluator` (package ``image-reward``, ``imagereward.py``): the standardised
  ImageReward reward.
- :class:`HPSv2Evaluator` (package ``hpsv2``, ``hpsv2.py``): ``100 * cos(image, text)`` of HPS v2.0
  or v2.1.
- :class:`PickScoreEvaluator` (package ``transformers``, ``pickscore.py``): ``logit_scale * cos(image, text)``.
- :func:`scores_from_floats` wraps numbers from any other scorer.

The base class, :class:`ImageScores`, :class:`EvaluatorUnavailable` and the weight readers are in
``base.py``. Weights are only ever read from local files (or from models already in the user's
open_clip / Hugging Face cache); nothing is downloaded. Nothing is unpickled: ImageReward and HPSv2
weights are read from ``.safetensors`` (see :func:`conversion_command` for their ``.pt`` releases).
The optional packages are imported only when their evaluator is built; a missing package or file
raises :class:`EvaluatorUnavailable`, whose message says what to install and where to put which file.

Images use ComfyUI's IMAGE layout: ``[B, H, W, 3]`` floats in 0..1.
"""
from .base import (
    EVALUATORS_DIR_HINT,
    EvaluatorUnavailable,
    ImageEvaluator,
    ImageScores,
    conversion_command,
    scores_from_floats,
)
from .clipscore import CLIPScoreEvaluator, clip_preprocess
from .hpsv2 import HPSv2Evaluator
from .imagereward import ImageRewardEvaluator
from .pickscore import PickScoreEvaluator

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
