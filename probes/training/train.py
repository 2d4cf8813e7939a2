"""Training a probe on cached activations and evaluator scores.

Data comes in as plain tensors (:class:`TrainArrays`): pooled features, checkpoint t, prompt id,
raw evaluator score and optionally a text embedding per row. :func:`train_probe` trains with the
listwise ranking loss within prompts (+ InfoNCE text alignment, + optional Pearson), AdamW with
warmup and a cosine schedule, an EMA of the weights, and early stopping on the validation
within-prompt Spearman. It writes the best (EMA) probe so far with :func:`probes.io.save_probe`
every time validation improves, and optionally a resumable training state.

Recipe (see docs/method.md): the reference trained a 6.1 M-parameter probe with AdamW at lr
1e-5..5e-5, weight decay 1e-2, cosine schedule, EMA 0.999, early stopping on validation Spearman.
Our probes are smaller and train from scratch on fewer rows, so the default lr here is 3e-4.

Determinism: given ``TrainConfig.seed`` (and the same device and thread count), a run gives the
same weights every time, and a run resumed from a saved state ends with the same weights as an
uninterrupted one: the initial weights come from the seed, the prompt order of epoch e from
``(seed, e)``, and the learning rate, EMA decay and loss annealing are functions of the step and
epoch counters, which the state saves.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import atomic_write
from ..io import ProbeMetadata, save_probe
from .losses import ProbeLoss, anneal
from .metrics import global_spearman, selection_summary, within_prompt_spearman
from ..model import Probe, ProbeConfig, build_probe

__all__ = ["TrainConfig", "TrainArrays", "TrainResult", "train_probe", "predict", "evaluate_probe"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

STATE_FORMAT = "probe-select-train-state"
STATE_VERSION = 1
STATE_JSON = "train_state.json"


@dataclass
class TrainConfig:
    """How to train a probe.

    Attributes:
        epochs: number of passes over the training prompts.
        batch_prompts: prompts per batch. A batch holds every row (seed) of each of its prompts,
            since the ranking loss compares seeds of one prompt.
        lr: peak AdamW learning rate. 3e-4 suits the small probes trained here from scratch; the
            reference used 1e-5..5e-5 for its 6.1 M-parameter probe.
        weight_decay: AdamW weight decay, applied to weight matrices and conv kernels only (not
            to biases and norm scales).
        warmup_fraction: fraction of all steps spent in linear warmup from ~0 to ``lr``.
        schedule: ``"cosine"`` (decay to ``lr * min_lr_ratio`` at the last step) or ``"constant"``.
        min_lr_ratio: final learning rate of the cosine schedule, as a fraction of ``lr``.
        ema_decay: decay of the exponential moving average of the weights. The EMA weights are the
            ones validated and saved. The decay of update k is ``min(ema_decay, (1 + k) / (10 + k))``
            so that early updates are not dominated by the random initialisation; 0 disables EMA.
        alpha_max, tau_min: ranking-loss annealing (see :func:`probes.losses.anneal`); alpha in
            z units.
        lambda_align: weight of the InfoNCE text alignment (probes with a text branch only).
        lambda_pearson: weight of ``1 - Pearson(pred, y)`` over each batch; 0 = off.
        top_weight: weight the ranking loss toward each prompt's best rows (see
            :func:`probes.losses.listwise_ranking_loss`); 0 = unweighted.
        temperature: InfoNCE temperature.
        grad_clip: clip the global gradient norm to this value; 0 = no clipping.
        patience: stop after this many epochs without a better validation within-prompt
            Spearman; 0 = never stop early.
        min_delta: an improvement must exceed the best so far by more than this.
        seed: seeds the initial weights and the prompt order.
        device: torch device to train on.
        save_state_every: with a ``state_dir``, save the training state every this many epochs
            (and after the last one).
        score_mean, score_std: fixed normalisation of the evaluator score (e.g. ImageReward
            0.3594, 0.9424). None: the mean / standard deviation of the training targets.
        eval_batch_size: rows per forward pass at validation.
    """

    epochs: int = 30
    batch_prompts: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.05
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    ema_decay: float = 0.999
    alpha_max: float = 0.2
    tau_min: float = 0.1
    lambda_align: float = 10.0
    lambda_pearson: float = 0.0
    top_weight: float = 0.0
    temperature: float = 0.07
    grad_clip: float = 1.0
    patience: int = 10
    min_delta: float = 0.0
    seed: int = 0
    device: str = "cpu"
    save_state_every: int = 1
    score_mean: Optional[float] = None
    score_std: Optional[float] = None
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_prompts", "save_state_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"TrainConfig.patience must be an integer >= 0, got {self.patience!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"TrainConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.alpha_max < 0 or not 0 < self.tau_min <= 1:
            raise ValueError(f"TrainConfig: need alpha_max >= 0 and 0 < tau_min <= 1, got {self.alpha_max}, {self.tau_min}")
        if not (math.isfinite(self.top_weight) and self.top_weight >= 0):
            raise ValueError(f"TrainConfig.top_weight must be finite and >= 0, got {self.top_weight}")
        if (self.score_mean is None) != (self.score_std is None):
            raise ValueError("TrainConfig: give both score_mean and score_std, or neither")
        if self.score_std is not None and not (math.isfinite(self.score_std) and self.score_std > 0):
            raise ValueError(f"TrainConfig.score_std must be finite and > 0, got {self.score_std}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainArrays:
    """One split of training data, as plain tensors (one row per candidate image).

    Attributes:
        features: ``[N, C, P, P]`` pooled activations (fp16 is fine).
        t: checkpoint of each row, ``[N]``, or one float for all rows.
        group: ``[N]`` integer prompt id, or a sequence of N hashable ids (e.g. prompt id strings);
            rows with the same id are seeds of one prompt.
        target: ``[N]`` raw evaluator score (evaluator units; z-scored by the trainer).
        text: ``[N, D]`` text embedding of each row's prompt, or None.
        x0: ``[N, c, S, S]`` pooled x0 prediction latent of each row (fp16 is fine), or None;
            required by probes whose ``config.inputs`` include ``"x0"``.
    """

    features: Tensor
    t: Union[Tensor, float]
    group: Tensor
    target: Tensor
    text: Optional[Tensor] = None
    x0: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if not isinstance(self.features, Tensor) or self.features.ndim != 4:
            raise ValueError(f"TrainArrays.features must be a [N, C, P, P] tensor, got {getattr(self.features, 'shape', type(self.features))}")
        n = self.features.shape[0]
        if isinstance(self.t, Tensor):
            if self.t.ndim > 1 or (self.t.ndim == 1 and self.t.shape[0] != n):
                raise ValueError(f"TrainArrays.t must be a float or [N={n}], got shape {tuple(self.t.shape)}")
        group = self.group
        if not isinstance(group, Tensor):
            # Any sequence of hashable prompt ids (e.g. DatasetArrays.prompt_ids, strings) becomes
            # integer ids in order of first appearance.
            ids: dict = {}
            group = torch.tensor([ids.setdefault(g, len(ids)) for g in group], dtype=torch.long)
        if group.shape != (n,) or group.is_floating_point():
            raise ValueError(f"TrainArrays.group must be [N={n}] integers, got {tuple(group.shape)} {group.dtype}")
        self.group = group
        target = torch.as_tensor(self.target)
        if target.shape != (n,):
            raise ValueError(f"TrainArrays.target must be [N={n}], got {tuple(target.shape)}")
        if not torch.isfinite(target.float()).all():
            raise ValueError("TrainArrays.target has NaN or infinite scores; drop those rows before training")
        self.target = target
        if self.text is not None and (self.text.ndim != 2 or self.text.shape[0] != n):
            raise ValueError(f"TrainArrays.text must be [N={n}, D], got {tuple(self.text.shape)}")
        if self.x0 is not None and (self.x0.ndim != 4 or self.x0.shape[0] != n):
            raise ValueError(f"TrainArrays.x0 must be the pooled x0 latent [N={n}, c, S, S], got {tuple(self.x0.shape)}")

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def num_prompts(self) -> int:
        return int(torch.unique(self.group).numel())


@dataclass
class TrainResult:
    """What :func:`train_probe` did.

    Attributes:
        history: one dict per epoch run (0-based ``epoch``): train_loss, ranking, align, pearson,
            val_within_spearman, val_global_spearman, val_top1, val_oracle_gain, lr, tau, alpha,
            seconds, samples_per_s.
        best_epoch: epoch (0-based) of the saved probe; -1 if it was saved mid-epoch after a stop
            before the first validation.
        best_metrics: validation metrics of the saved probe.
        probe_path: the probe file.
        stopped: ``"completed"``, ``"early_stopping"`` or ``"should_stop"``.
        score_mean, score_std: the fixed target normalisation stored in the probe.
        resumed_from_epoch: number of epochs restored from a saved state (0 = fresh run).
    """

    history: list[dict]
    best_epoch: int
    best_metrics: dict
    probe_path: Path
    stopped: str = "completed"
    score_mean: float = 0.0
    score_std: float = 1.0
    resumed_from_epoch: int = 0


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class _Split:
    """A split ready for training: normal (non-inference) tensors, contiguous prompt ids, z targets."""

    features: Tensor  # [N, C, P, P], CPU, as given (fp16)
    t: Tensor  # [N] float32
    group: Tensor  # [N] long, 0..G-1
    z: Tensor  # [N] float32
    raw: Tensor  # [N] float32
    text: Optional[Tensor]  # [N, D] float32
    prompt_rows: list[Tensor]  # rows of each prompt
    x0: Optional[Tensor] = None  # [N, c, S, S], CPU, as given (fp16); only for probes that read x0

    def __len__(self) -> int:
        return self.features.shape[0]


def _normal(tensor: Tensor) -> Tensor:
    """Inference tensors (made under ComfyUI's inference mode) cannot be saved for backward."""
    return tensor.clone() if tensor.is_inference() else tensor


def _prepare(data: TrainArrays, name: str, config: ProbeConfig, mean: float, std: float) -> _Split:
    features = _normal(data.features.detach())
    expected = (config.in_channels, config.feature_size, config.feature_size)
    if config.reads_activations and tuple(features.shape[1:]) != expected:
        raise ValueError(
            f"{name} features have shape (C, P, P) = {tuple(features.shape[1:])} but the ProbeConfig "
            f"reads {expected}; set in_channels/feature_size to match the cached activations."
        )
    n = features.shape[0]
    if n == 0:
        raise ValueError(f"{name} split is empty")
    t = data.t
    t = torch.full((n,), float(t)) if not isinstance(t, Tensor) or t.ndim == 0 else _normal(t.detach()).float().cpu()
    _, group = torch.unique(_normal(data.group.detach()).cpu(), return_inverse=True)
    raw = _normal(data.target.detach()).float().cpu()
    text = None
    if config.has_text:
        if data.text is None:
            raise ValueError(f"the probe has a text branch (text_dim={config.text_dim}) but the {name} split has no text embeddings")
        if data.text.shape[1] != config.text_dim:
            raise ValueError(f"{name} text embeddings have width {data.text.shape[1]}, the probe expects {config.text_dim}")
        text = _normal(data.text.detach()).float().cpu()
    elif data.text is not None:
        logger.info("%s split has text embeddings but the probe has no text branch (text_dim=0); ignoring them", name)
    x0 = None
    if config.reads_x0:
        if data.x0 is None:
            raise ValueError(
                f"the probe reads the x0 latent (inputs {'+'.join(config.inputs)}) but the {name} split has no x0 "
                f"latents; train it on a dataset collected with x0 (x0_size > 0), or choose probe inputs "
                f"'activations'")
        if tuple(data.x0.shape[1:]) != config.x0_shape:
            raise ValueError(f"{name} x0 latents have shape (c, S, S) = {tuple(data.x0.shape[1:])} but the ProbeConfig "
                             f"reads {config.x0_shape}; set x0_channels/x0_size to match the dataset")
        x0 = _normal(data.x0.detach()).cpu()
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group).tolist()
    prompt_rows = list(torch.split(order, counts))
    return _Split(features=features.cpu(), t=t, group=group.long(), z=(raw - mean) / std, raw=raw,
                  text=text, prompt_rows=prompt_rows, x0=x0)


def _batch(split: _Split, rows: Tensor, device: torch.device) -> dict[str, Any]:
    return {
        "features": split.features[rows].to(device),
        "t": split.t[rows].to(device),
        "group": split.group[rows].to(device),
        "z": split.z[rows].to(device),
        "text": split.text[rows].to(device) if split.text is not None else None,
        "x0": split.x0[rows].to(device) if split.x0 is not None else None,
    }


def _prompt_order(seed: int, epoch: int, num_prompts: int) -> Tensor:
    """Prompt order of ``epoch``: a function of (seed, epoch) only, so resuming needs no RNG."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919) % (2**63))
    return torch.randperm(num_prompts, generator=generator)


# --------------------------------------------------------------------------------------------
# Prediction and evaluation


def _predict_split(probe: Probe, split: _Split, batch_size: int, device: torch.device) -> Tensor:
    was_training = probe.training
    probe.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                rows = torch.arange(start, min(start + batch_size, len(split)))
                batch = _batch(split, rows, device)
                out.append(probe(batch["features"], batch["t"], batch["text"], batch["x0"]).float().cpu())
    finally:
        probe.train(was_training)
    return torch.cat(out)


def _metrics(pred: Tensor, split: _Split) -> dict[str, float]:
    pred_np, raw, group = pred.numpy(), split.raw.numpy(), split.group.numpy()
    summary = selection_summary(pred_np, raw, group)
    return {
        "within_spearman": within_prompt_spearman(pred_np, raw, group),
        "global_spearman": global_spearman(pred_np, raw),
        "top1": summary["top1_hit_rate"],
        "oracle_gain": summary["oracle_gain_fraction"],
        "selected": summary["selected"],
        "mean": summary["mean"],
        "best": summary["best"],
    }


def predict(probe: Probe, data: TrainArrays, batch_size: int = 256) -> Tensor:
    """Predicted z-scores ``[N]`` (float32, CPU) of every row of ``data``, in eval mode."""
    split = _prepare(data, "prediction", probe.config, 0.0, 1.0)
    device = next(probe.parameters()).device
    with torch.inference_mode(False):
        return _predict_split(probe, split, batch_size, device)


def evaluate_probe(probe: Probe, data: TrainArrays, batch_size: int = 256) -> dict[str, float]:
    """Within-prompt and global Spearman, top-1 hit rate and selection summary (in the units of
    ``data.target``) of ``probe`` on ``data``."""
    split = _prepare(data, "evaluation", probe.config, 0.0, 1.0)
    device = next(probe.parameters()).device
    with torch.inference_mode(False):
        return _metrics(_predict_split(probe, split, batch_size, device), split)


# --------------------------------------------------------------------------------------------
# Optimisation


def _lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup over the first ``warmup_fraction`` of the steps, then cosine (or constant)."""
    warmup = int(round(config.warmup_fraction * total_steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def make_optimizer(model: Probe, config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, foreach=False,
    )


def ema_update(ema: Probe, model: Probe, decay: float) -> None:
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters()):
            ema_param.lerp_(param.detach(), 1.0 - decay)


def _ema_decay(config: TrainConfig, updates: int) -> float:
    return min(config.ema_decay, (1.0 + updates) / (10.0 + updates))


# --------------------------------------------------------------------------------------------
# Resumable state


def _fingerprint(train: _Split, val: _Split, probe_config: ProbeConfig, config: TrainConfig, mean: float, std: float) -> str:
    """Identifies a run: a state is only resumed into the run that wrote it."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("device", "save_state_every", "eval_batch_size")}
    digest = hashlib.sha256()
    digest.update(json.dumps({"train": settings, "probe": probe_config.to_dict(), "norm": [mean, std]}, sort_keys=True).encode())
    for split in (train, val):
        digest.update(str(tuple(split.features.shape)).encode())
        for tensor in (split.raw, split.group, split.t, split.features[:8].float(), split.features[-8:].float()):
            digest.update(tensor.contiguous().numpy().tobytes())
        if split.text is not None:
            digest.update(split.text.contiguous().numpy().tobytes())
        if split.x0 is not None:
            digest.update(split.x0.float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def write_state_files(state_dir: Path, tensors: dict[str, Tensor], info: dict, tensor_file: str, state_format: str,
                      state_version: int, json_name: str, old_files: str) -> None:
    """A resumable training state: tensors first, then the JSON that names them (the commit point),
    then the older tensor files matching ``old_files`` go. Shared by the in-memory and streamed trainers."""
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    atomic_write(state_dir / tensor_file,
                 lambda temp: save_file(tensors, str(temp), metadata={"format": state_format}))
    info = {**info, "format": state_format, "version": state_version, "tensors": tensor_file}
    text = json.dumps(json_safe(info), indent=1, sort_keys=True)
    atomic_write(state_dir / json_name, lambda temp: temp.write_text(text, encoding="utf-8"))
    for old in state_dir.glob(old_files):
        if old.name != tensor_file:
            try:
                old.unlink()
            except OSError as error:
                logger.warning("could not remove old training state %s: %s", old, error)


def _save_state(state_dir: Path, tensors: dict[str, Tensor], info: dict) -> None:
    write_state_files(state_dir, tensors, info, f"train_state_e{info['completed_epochs']:04d}.safetensors",
                      STATE_FORMAT, STATE_VERSION, STATE_JSON, "train_state_e*.safetensors")
    logger.info("saved training state after epoch %d to %s", info["completed_epochs"] - 1, state_dir)


def read_state_files(state_dir: Path, fingerprint: str, state_format: str, state_version: int, json_name: str,
                     kind: str = "training state",
                     run_differs: str = "other data, probe config or training settings"
                     ) -> Optional[tuple[dict[str, Tensor], dict]]:
    """The state `write_state_files` left in ``state_dir``: None when there is none; a clear ValueError
    when it is unreadable, of another format or version, or from another run (``fingerprint``)."""
    path = state_dir / json_name
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if info.get("format") != state_format or int(info.get("version", 0)) > state_version:
            raise ValueError(f"not a {kind} of a supported version ({info.get('format')!r} v{info.get('version')})")
        tensors = load_file(str(state_dir / info["tensors"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"training state in {state_dir} is unreadable ({error}); delete the folder to start the "
            f"training from scratch."
        ) from None
    if info.get("fingerprint") != fingerprint:
        raise ValueError(
            f"training state in {state_dir} belongs to a different run ({run_differs}); use another state "
            f"folder, or delete it to start from scratch."
        )
    return tensors, info


def _load_state(state_dir: Path, fingerprint: str) -> Optional[tuple[dict[str, Tensor], dict]]:
    return read_state_files(state_dir, fingerprint, STATE_FORMAT, STATE_VERSION, STATE_JSON)


def restore_modules(tensors: dict[str, Tensor], model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> Optional[dict[str, Tensor]]:
    """Put a read training state back: weights, EMA, optimiser and torch's RNG. Returns the best weights
    so far (None before the first validation). Shared by the in-memory and streamed trainers."""
    model.load_state_dict(_split_prefix(tensors, "model."))
    ema.load_state_dict(_split_prefix(tensors, "ema."))
    _load_optimizer(optimizer, tensors)
    torch.set_rng_state(tensors["rng.torch"])
    return _split_prefix(tensors, "best.") or None


def _split_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{index}.{key}"] = torch.as_tensor(value)
    return out


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in _split_prefix(tensors, "optim.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def json_safe(value: Any) -> Any:
    """NaN and infinities become None (strict JSON has no NaN); numpy / torch scalars become numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.generic, Tensor)) and getattr(value, "ndim", 0) == 0:
        return json_safe(value.item())
    return value


# --------------------------------------------------------------------------------------------
# Training


_METADATA_KEYS = {"backbone_family", "tap", "checkpoint_t", "feature_shape", "pooling", "evaluator", "reduction"}


def _score_norm(train: TrainArrays, config: TrainConfig) -> tuple[float, float, str]:
    if config.score_mean is not None:
        return float(config.score_mean), float(config.score_std), "prior"
    target = train.target.detach().double()
    mean = float(target.mean())
    std = float(target.std(unbiased=False)) if target.numel() > 1 else 0.0
    if not std > 0:
        raise ValueError("training targets are constant: cannot z-score them; pass score_mean/score_std priors")
    return mean, std, "train_split"


def train_probe(
    train: TrainArrays,
    val: TrainArrays,
    probe_config: ProbeConfig,
    train_config: TrainConfig,
    metadata_base: dict,
    out_path: PathLike,
    state_dir: Optional[PathLike] = None,
    on_epoch: Optional[Callable[[int, dict], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> TrainResult:
    """Train a probe and save the best one (by validation within-prompt Spearman) to ``out_path``.

    Args:
        train, val: the splits (split by prompt: no prompt in both).
        probe_config: architecture; ``in_channels``/``feature_size`` must match the features.
        train_config: optimisation settings.
        metadata_base: what the probe reads and predicts: ``backbone_family``, ``tap``,
            ``checkpoint_t`` (default: the training rows' t, if they all share one), ``pooling``
            (default ``"adaptive_avg"``), ``evaluator``; ``feature_shape`` (optional) must match;
            ``reduction`` (optional): the data's channel reduction, recorded in the probe file.
        out_path: the probe file (``.safetensors``), rewritten atomically whenever validation
            improves, so an interrupted run always leaves the best probe so far.
        state_dir: folder for a resumable training state, saved every ``save_state_every`` epochs;
            a state already there (from the same run) is resumed.
        on_epoch: ``callback(epoch, metrics)`` after every epoch (``metrics`` is that epoch's
            history entry); an exception raised there propagates and ends training, with the best
            probe so far (and the state, if due) already saved.
        should_stop: checked before every batch; when it returns True, training stops and the best
            probe so far is kept (if no epoch has finished yet, the current EMA weights are
            validated and saved, so there is always a probe).

    Returns:
        :class:`TrainResult`.

    Runs with autograd enabled and outside inference mode whatever the caller's mode (ComfyUI
    runs nodes under ``torch.inference_mode()``). The global RNG state is left as it was.
    """
    unknown = set(metadata_base) - _METADATA_KEYS
    if unknown:
        raise ValueError(f"train_probe: unknown metadata_base keys {sorted(unknown)}; known: {sorted(_METADATA_KEYS)}")
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        return _train(train, val, probe_config, train_config, dict(metadata_base), Path(out_path),
                      Path(state_dir) if state_dir is not None else None, on_epoch, should_stop)


def _train(
    train_arrays: TrainArrays,
    val_arrays: TrainArrays,
    probe_config: ProbeConfig,
    config: TrainConfig,
    metadata_base: dict,
    out_path: Path,
    state_dir: Optional[Path],
    on_epoch: Optional[Callable[[int, dict], None]],
    should_stop: Optional[Callable[[], bool]],
) -> TrainResult:
    device = torch.device(config.device)
    mean, std, norm_source = _score_norm(train_arrays, config)
    train = _prepare(train_arrays, "train", probe_config, mean, std)
    val = _prepare(val_arrays, "validation", probe_config, mean, std)
    if "checkpoint_t" not in metadata_base:
        if not bool((train.t == train.t[0]).all()):
            raise ValueError("train_probe: the training rows have several t; pass metadata_base['checkpoint_t']")
        metadata_base["checkpoint_t"] = float(train.t[0])
    metadata_base.setdefault("pooling", "adaptive_avg")
    metadata_base.setdefault("feature_shape", (probe_config.in_channels, probe_config.feature_size, probe_config.feature_size))
    metadata_base["feature_shape"] = tuple(metadata_base["feature_shape"])

    torch.manual_seed(config.seed)
    model = build_probe(probe_config, seed=config.seed).to(device).train()
    ema = build_probe(probe_config, seed=config.seed).to(device).eval()
    ema.load_state_dict(model.state_dict())
    for param in ema.parameters():
        param.requires_grad_(False)
    optimizer = make_optimizer(model, config)
    loss_fn = ProbeLoss(lambda_align=config.lambda_align, lambda_pearson=config.lambda_pearson, temperature=config.temperature,
                        top_weight=config.top_weight)

    num_prompts = len(train.prompt_rows)
    steps_per_epoch = math.ceil(num_prompts / config.batch_prompts)
    total_steps = steps_per_epoch * config.epochs
    fingerprint = _fingerprint(train, val, probe_config, config, mean, std)

    summary_base = {
        "trainer": "probes.train",
        "epochs": config.epochs,
        "seed": config.seed,
        "data": {
            "train_rows": len(train), "train_prompts": num_prompts,
            "val_rows": len(val), "val_prompts": len(val.prompt_rows),
        },
        "loss": {
            "ranking": "listwise within prompt", "alpha_max": config.alpha_max, "tau_min": config.tau_min,
            "lambda_align": config.lambda_align if probe_config.has_text else 0.0,
            "lambda_pearson": config.lambda_pearson, "temperature": config.temperature,
            "top_weight": config.top_weight,
        },
        "optimizer": {
            "name": "AdamW", "lr": config.lr, "weight_decay": config.weight_decay, "schedule": config.schedule,
            "warmup_fraction": config.warmup_fraction, "ema_decay": config.ema_decay,
            "batch_prompts": config.batch_prompts, "grad_clip": config.grad_clip,
        },
        "score_norm_source": norm_source,
        "selection_metric": "val_within_spearman",
        "inputs": list(probe_config.inputs),
    }

    # Run state (everything a resume restores).
    history: list[dict] = []
    start_epoch = 0
    global_step = 0
    ema_updates = 0
    best_key = -math.inf
    best_epoch: Optional[int] = None
    best_metrics: dict = {}
    best_state: Optional[dict[str, Tensor]] = None
    epochs_since_best = 0
    finished: Optional[str] = None

    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        loaded = _load_state(state_dir, fingerprint)
        if loaded is not None:
            tensors, info = loaded
            best_state = restore_modules(tensors, model, ema, optimizer)
            start_epoch = int(info["completed_epochs"])
            global_step = int(info["global_step"])
            ema_updates = int(info["ema_updates"])
            best_epoch = info["best_epoch"]
            best_key = -math.inf if info["best_key"] is None else float(info["best_key"])
            best_metrics = info["best_metrics"]
            epochs_since_best = int(info["epochs_since_best"])
            history = info["history"]
            finished = info.get("finished")
            logger.info("resuming training from %s after epoch %d", state_dir, start_epoch - 1)

    def training_summary(epochs_run: int, stopped: str) -> dict:
        return json_safe({
            **summary_base, "epochs_run": epochs_run, "best_epoch": best_epoch, "stopped": stopped,
            "val": {key: best_metrics.get(key) for key in ("within_spearman", "global_spearman", "top1", "oracle_gain")},
        })

    def write_probe(weights: dict[str, Tensor], epochs_run: int, stopped: str) -> None:
        with torch.device("meta"):
            probe = Probe(probe_config)
        probe.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in weights.items()}, assign=True)
        metadata = ProbeMetadata(**metadata_base, score_mean=mean, score_std=std,
                                 training=training_summary(epochs_run, stopped), config=probe_config)
        save_probe(out_path, probe, metadata)

    def snapshot(module: Probe) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}

    stopped = finished or "completed"
    epoch = start_epoch
    while finished is None and epoch < config.epochs:
        tau, alpha = anneal(epoch, config.epochs, config.alpha_max, config.tau_min)
        model.train()
        order = _prompt_order(config.seed, epoch, num_prompts)
        sums = {"total": 0.0, "ranking": 0.0, "align": 0.0, "pearson": 0.0}
        batches = rows_seen = 0
        lr = _lr_at(global_step, total_steps, config)
        started = time.perf_counter()
        interrupted = False
        for start in range(0, num_prompts, config.batch_prompts):
            if should_stop is not None and should_stop():
                interrupted = True
                break
            rows = torch.cat([train.prompt_rows[k] for k in order[start:start + config.batch_prompts].tolist()])
            batch = _batch(train, rows, device)
            lr = _lr_at(global_step, total_steps, config)
            for group_ in optimizer.param_groups:
                group_["lr"] = lr
            _, terms = loss_fn(model, batch["features"], batch["t"], batch["z"], batch["group"], tau, alpha, batch["text"],
                               x0=batch["x0"])
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            ema_update(ema, model, _ema_decay(config, ema_updates) if config.ema_decay > 0 else 0.0)
            ema_updates += 1
            global_step += 1
            for key, value in terms.as_floats().items():
                sums[key] += value
            batches += 1
            rows_seen += len(rows)
        seconds = time.perf_counter() - started

        if interrupted:
            stopped = "should_stop"
            logger.info("training stopped by request in epoch %d after %d batches", epoch, batches)
            if best_state is None:
                # No epoch finished yet: validate and keep the current EMA weights, so that a probe
                # exists (marked best_epoch = -1: saved mid-epoch).
                best_metrics = _metrics(_predict_split(ema, val, config.eval_batch_size, device), val)
                best_epoch = -1
                best_state = snapshot(ema)
            break

        metrics = _metrics(_predict_split(ema, val, config.eval_batch_size, device), val)
        entry = {
            "epoch": epoch,
            "train_loss": sums["total"] / max(1, batches),
            "ranking": sums["ranking"] / max(1, batches),
            "align": sums["align"] / max(1, batches),
            "pearson": sums["pearson"] / max(1, batches),
            "val_within_spearman": metrics["within_spearman"],
            "val_global_spearman": metrics["global_spearman"],
            "val_top1": metrics["top1"],
            "val_oracle_gain": metrics["oracle_gain"],
            "lr": lr,
            "tau": tau,
            "alpha": alpha,
            "seconds": seconds,
            "samples_per_s": rows_seen / seconds if seconds > 0 else math.nan,
        }
        entry = json_safe(entry)
        history.append(entry)
        key = metrics["within_spearman"]
        key = -math.inf if key is None or math.isnan(key) else key
        if best_state is None or key > best_key + config.min_delta:
            best_key, best_epoch, best_metrics = key, epoch, json_safe(metrics)
            best_state = snapshot(ema)
            epochs_since_best = 0
            write_probe(best_state, epoch + 1, "running")
        else:
            epochs_since_best += 1
        logger.info(
            "epoch %d/%d: loss %.4f (rank %.4f, align %.4f), val within-prompt Spearman %.4f, global %.4f, "
            "top-1 %.3f; lr %.2e, tau %.3f, alpha %.3f; %.1f samples/s",
            epoch + 1, config.epochs, entry["train_loss"], entry["ranking"], entry["align"],
            metrics["within_spearman"], metrics["global_spearman"], metrics["top1"], lr, tau, alpha,
            entry["samples_per_s"] or 0.0,
        )
        if config.patience and epochs_since_best >= config.patience:
            finished = stopped = "early_stopping"
            logger.info("early stopping after epoch %d: no improvement for %d epochs (best epoch %d)", epoch, epochs_since_best, best_epoch)
        elif epoch + 1 == config.epochs:
            finished = stopped = "completed"

        if state_dir is not None and ((epoch + 1) % config.save_state_every == 0 or finished):
            tensors = {
                **{f"model.{k}": v for k, v in model.state_dict().items()},
                **{f"ema.{k}": v for k, v in ema.state_dict().items()},
                **{f"best.{k}": v for k, v in best_state.items()},
                **_optimizer_tensors(optimizer),
                "rng.torch": torch.get_rng_state(),
            }
            info = {
                "fingerprint": fingerprint, "completed_epochs": epoch + 1, "global_step": global_step,
                "ema_updates": ema_updates, "best_key": best_key, "best_epoch": best_epoch,
                "best_metrics": best_metrics, "epochs_since_best": epochs_since_best,
                "history": history, "finished": finished, "score_norm": [mean, std],
            }
            _save_state(state_dir, tensors, info)
        if on_epoch is not None:
            on_epoch(epoch, entry)
        epoch += 1

    # Final write: the best weights with the complete training summary.
    write_probe(best_state, len(history), stopped)
    logger.info("training %s; best epoch %s, val within-prompt Spearman %s; probe at %s",
                stopped, best_epoch, best_metrics.get("within_spearman"), out_path)
    return TrainResult(history=history, best_epoch=best_epoch, best_metrics=best_metrics, probe_path=out_path,
                       stopped=stopped, score_mean=mean, score_std=std, resumed_from_epoch=start_epoch)
