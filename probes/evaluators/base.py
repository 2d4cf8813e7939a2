"""What every image evaluator shares: the scores it returns, the error it raises, the base class.

Every evaluator scores each image against its prompt on its own. Scores are never softmaxed or
normalised across the batch, so an image gets the same score alone or among N others and scores
of different runs and batch sizes can be compared. :class:`ImageScores` orders images with the
same rule as probe scores (:func:`~probe_select.probes.scoring.order_scores`).

Also here: reading weights (optional packages, files, ``.safetensors`` only: nothing is unpickled),
the ComfyUI IMAGE and prompt checks, and :func:`scores_from_floats` for numbers from any other scorer.
The backends live next to this module, one per file.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import types
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

from ..scoring import order_scores

logger = logging.getLogger(__name__)

EVALUATORS_DIR_HINT = "ComfyUI/models/evaluators"
CLIP_MAX_TOKENS = 77

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


def import_optional(module: str, pip_name: str, evaluator: str, then: str) -> types.ModuleType:
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


def require_file(path: Optional[str], evaluator: str, what: str, where: str) -> str:
    """``path`` if it is a file, else EvaluatorUnavailable saying to put ``what`` in ``where``."""
    if not path or not os.path.isfile(path):
        shown = f"'{path}' is not a file" if path else "no weights file was given"
        raise EvaluatorUnavailable(f"{evaluator}: {shown}.", f"put {what} in {where} and select it.")
    return path


def read_safetensors(path: str, evaluator: str) -> dict[str, Tensor]:
    """Read a state dict from .safetensors; refuse pickled checkpoints (we never unpickle)."""
    if not path.lower().endswith((".safetensors", ".sft")):
        raise EvaluatorUnavailable(
            f"{evaluator}: '{os.path.basename(path)}' is a pickled PyTorch checkpoint; this pack only reads "
            ".safetensors weights (loading a pickle can run code).",
            f"convert it once and put the .safetensors file in {EVALUATORS_DIR_HINT}: {conversion_command(path)}",
        )
    state = load_file(path, device="cpu")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ---- images and prompts ---------------------------------------------------------------------


def check_images(images: Tensor) -> Tensor:
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


def expand_prompts(prompts: Union[str, Sequence[str]], n: int) -> list[str]:
    """One prompt per image: a single prompt is shared by every image."""
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = [str(p) for p in prompts]
    if len(prompts) == 1:
        return prompts * n
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images; give one prompt for all images or one per image")
    return prompts


def to_uint8_arrays(images: Tensor) -> list[np.ndarray]:
    """``[B, H, W, 3]`` in 0..1 -> B ``uint8`` ``[H, W, 3]`` arrays, quantised the way ComfyUI's SaveImage does."""
    arrays = (255.0 * images.detach().float().cpu().numpy()).clip(0, 255).astype(np.uint8)
    return list(arrays)


def to_pil(images: Tensor) -> list[Image.Image]:
    """``[B, H, W, 3]`` in 0..1 -> PIL images, quantised as :func:`to_uint8_arrays`."""
    return [Image.fromarray(a) for a in to_uint8_arrays(images)]



def open_clip_token_count(tokenizer, prompt: str) -> Optional[int]:
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
        images = check_images(images)
        n = images.shape[0]
        prompts = expand_prompts(prompts, n)
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

# ---- other scorers --------------------------------------------------------------------------


def _flatten(values) -> list[float]:
    if isinstance(values, Tensor):
        return [float(v) for v in values.detach().reshape(-1).cpu()]
    if isinstance(values, (list, tuple)):
        out = []
        for v in values:
            out.extend(_flatten(v))
        return out
    if isinstance(values, np.ndarray):
        return [float(v) for v in values.reshape(-1)]
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
                       prompts=expand_prompts(prompts, len(scores)))
