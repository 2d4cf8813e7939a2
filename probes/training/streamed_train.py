"""Training a probe on a dataset streamed from disk, in one process or several (DDP).

The same recipe as :func:`~.train.train_probe` (listwise ranking within prompts + InfoNCE + optional
Pearson, AdamW with warmup and cosine, EMA, early stopping on validation within-prompt Spearman),
but the rows never sit in memory together: each epoch follows :func:`~.streaming.epoch_plan` and
reads its batches through :class:`~.streaming.PlannedBatches` (optionally in DataLoader workers,
pinned and copied non-blocking to a GPU, under bf16/fp16 autocast there). Validation streams the
validation prompts the same way.

Resumable mid-epoch: the state (weights, EMA, optimizer, counters, the position in the epoch's
plan and the loss sums so far) is saved every ``StreamConfig.state_every_batches`` batches, at the
end of every ``save_state_every`` epochs and when ``should_stop`` stops the run; the plan is a
function of (seed, epoch), so a resumed run trains on exactly the batches an uninterrupted one
would have, in the same order, and ends with the same weights.

Several processes: under ``torchrun`` (see :mod:`.distributed`) each rank trains on its share of
each epoch's batches; rank 0 writes the probe and the state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..io import ProbeMetadata, save_probe
from ..model import Probe, ProbeConfig, build_probe
from .distributed import DistContext, init_distributed, rank_share, wrap_model
from .dataset import DatasetManifest, probe_config_for
from .losses import ProbeLoss, anneal
from .metrics import global_spearman, selection_summary, within_prompt_spearman
from .streaming import BatchSpec, FeatureReader, StreamConfig, StreamIndex, epoch_plan, make_loader, read_batch
from .train import (
    TrainConfig,
    TrainResult,
    _ema_decay,
    _lr_at,
    _optimizer_tensors,
    ema_update,
    json_safe,
    make_optimizer,
    read_state_files,
    restore_modules,
    write_state_files,
)

__all__ = ["StreamSource", "train_streamed", "predict_streamed", "autocast_dtype", "wants_streaming",
           "train_from_index", "predict_on_index"]

logger = logging.getLogger(__name__)

STREAM_STATE_FORMAT = "probe-select-stream-train-state"
STREAM_STATE_VERSION = 1
STREAM_STATE_JSON = "stream_train_state.json"


@dataclass
class StreamSource:
    """The data of a streamed run: an index, which prompt groups train and validate, what to read."""

    index: StreamIndex
    train_groups: list[int]
    val_groups: list[int]
    checkpoint_t: float
    evaluator: str
    use_text: bool = False
    visits: list[list[list[int]]] = field(default_factory=list)   # filled when record_visits

    @property
    def checkpoint_k(self) -> int:
        return self.index.manifest.checkpoint_index(self.checkpoint_t)


def autocast_dtype(device: torch.device, amp: str) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` on ``device`` (None = full precision). CPU never autocasts."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    non_blocking = device.type == "cuda"
    return {key: value.to(device, non_blocking=non_blocking) for key, value in batch.items()}


def predict_streamed(probe: Probe, spec: BatchSpec, group_ids: list[int], device: torch.device,
                     eval_batch_rows: int = 256, amp_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(pred z [n], raw score [n], prompt index [n])`` over the groups' rows, in group order, in eval mode."""
    index = spec.index
    largest = max((len(index.groups[g].rows) for g in group_ids), default=1)
    plan = epoch_plan(index, group_ids, seed=0, epoch=0, batch_prompts=max(1, eval_batch_rows // largest),
                      buffer_groups=1, shuffle=False)
    reader = FeatureReader(index, spec.checkpoint_k, spec.max_open_shards, spec.max_mapped_bytes, spec.io)
    was_training = probe.training
    probe.eval()
    preds, raws, groups = [], [], []
    offset = 0
    try:
        with torch.inference_mode(False), torch.no_grad():
            for group_ids_ in plan:
                batch = read_batch(reader, spec, group_ids_)
                on_device = _to_device(batch, device)
                context = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
                with context:
                    pred = probe(on_device["features"], on_device["t"], on_device.get("text"), on_device.get("x0"))
                preds.append(pred.detach().float().cpu())
                raws.append(batch["raw"])
                groups.append(batch["group"] + offset)
                offset += len(group_ids_)
    finally:
        reader.close()
        probe.train(was_training)
    if not preds:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(preds), torch.cat(raws), torch.cat(groups)


def _metrics(pred: Tensor, raw: Tensor, group: Tensor) -> dict[str, float]:
    pred_np, raw_np, group_np = pred.double().numpy(), raw.double().numpy(), group.numpy()
    summary = selection_summary(pred_np, raw_np, group_np)
    return {
        "within_spearman": within_prompt_spearman(pred_np, raw_np, group_np),
        "global_spearman": global_spearman(pred_np, raw_np),
        "top1": summary["top1_hit_rate"],
        "oracle_gain": summary["oracle_gain_fraction"],
        "selected": summary["selected"],
        "mean": summary["mean"],
        "best": summary["best"],
    }


def _score_norm(source: StreamSource, config: TrainConfig) -> tuple[float, float, str]:
    if config.score_mean is not None:
        return float(config.score_mean), float(config.score_std), "prior"
    target = source.index.scores(source.train_groups, source.evaluator).double()
    std = float(target.std(unbiased=False)) if target.numel() > 1 else 0.0
    if not std > 0:
        raise ValueError("training targets are constant: cannot z-score them; pass score_mean/score_std priors")
    return float(target.mean()), std, "train_split"


def _fingerprint(source: StreamSource, probe_config: ProbeConfig, config: TrainConfig, stream: StreamConfig,
                 world_size: int, mean: float, std: float) -> str:
    settings = {k: v for k, v in config.to_dict().items() if k not in ("device", "save_state_every", "eval_batch_size")}
    digest = hashlib.sha256(json.dumps({
        "train": settings, "probe": probe_config.to_dict(), "norm": [mean, std], "buffer": stream.buffer_groups,
        "world": world_size, "t": source.checkpoint_t, "evaluator": source.evaluator, "text": source.use_text,
        "groups": [[source.index.groups[g].prompt_id for g in ids] for ids in (source.train_groups, source.val_groups)],
        "rows": [len(source.index.groups[g].rows) for g in source.train_groups],
    }, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:32]


def _save_state(state_dir: Path, tensors: dict[str, Tensor], info: dict) -> None:
    write_state_files(state_dir, tensors, info, f"stream_state_e{info['epoch']:04d}_b{info['batch']:07d}.safetensors",
                      STREAM_STATE_FORMAT, STREAM_STATE_VERSION, STREAM_STATE_JSON, "stream_state_e*.safetensors")


def _load_state(state_dir: Path, fingerprint: str) -> Optional[tuple[dict[str, Tensor], dict]]:
    return read_state_files(state_dir, fingerprint, STREAM_STATE_FORMAT, STREAM_STATE_VERSION, STREAM_STATE_JSON,
                            kind="streamed training state",
                            run_differs="other data, probe config, training settings or number of processes")


def train_streamed(
    source: StreamSource,
    probe_config: ProbeConfig,
    train_config: TrainConfig,
    metadata_base: dict,
    out_path,
    *,
    stream_config: Optional[StreamConfig] = None,
    state_dir=None,
    on_epoch: Optional[Callable[[int, dict], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    record_visits: bool = False,
) -> TrainResult:
    """Train a probe on streamed data and save the best one (validation within-prompt Spearman).

    Arguments as :func:`~.train.train_probe`, with the data as a :class:`StreamSource` and the
    reading settings in ``stream_config``. Under ``torchrun`` it trains with DDP (see
    :mod:`.distributed`); only rank 0 writes files. With ``record_visits``, the prompt groups of every
    batch this rank trained on are appended to ``source.visits`` (one list per epoch).

    Raises:
        DistributedError: a process of a several-process job died or hung.
    """
    stream = stream_config or StreamConfig()
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        device = torch.device(train_config.device)
        context = init_distributed(device, stream.dist_timeout_s)
        try:
            return _run(source, probe_config, train_config, stream, dict(metadata_base), Path(out_path),
                        Path(state_dir) if state_dir is not None else None, on_epoch, should_stop, record_visits,
                        device, context)
        finally:
            context.shutdown()


def _run(source: StreamSource, probe_config: ProbeConfig, config: TrainConfig, stream: StreamConfig,
         metadata_base: dict, out_path: Path, state_dir: Optional[Path], on_epoch, should_stop, record_visits: bool,
         device: torch.device, context: DistContext) -> TrainResult:
    index = source.index
    manifest = index.manifest
    if not source.train_groups or not source.val_groups:
        raise ValueError(f"dataset {index.root}: the training and validation splits both need prompts")
    expected = (probe_config.in_channels, probe_config.feature_size, probe_config.feature_size)
    if probe_config.reads_activations and tuple(manifest.feature_shape) != expected:
        raise ValueError(f"dataset features are (C, P, P) = {tuple(manifest.feature_shape)} but the ProbeConfig "
                         f"reads {expected}; set in_channels/feature_size to match the dataset.")
    use_text = source.use_text and probe_config.has_text
    mean, std, norm_source = _score_norm(source, config)
    if probe_config.reads_x0 and tuple(manifest.x0_shape or ()) != probe_config.x0_shape:
        stored = tuple(manifest.x0_shape) if manifest.x0_shape else "no x0 latents"
        raise ValueError(f"the probe reads x0 latents (c, S, S) = {probe_config.x0_shape} but dataset {index.root} "
                         f"stores {stored}; collect the dataset with x0 (x0_size > 0) or choose probe inputs "
                         f"'activations'.")
    spec = BatchSpec(index=index, checkpoint_k=source.checkpoint_k, evaluator=source.evaluator, use_text=use_text,
                     score_mean=mean, score_std=std, max_open_shards=stream.max_open_shards,
                     max_mapped_bytes=stream.max_mapped_mb * 2**20, io=stream.io, use_x0=probe_config.reads_x0)
    metadata_base.setdefault("checkpoint_t", float(manifest.checkpoints[spec.checkpoint_k]))
    metadata_base.setdefault("pooling", manifest.pooling)
    metadata_base.setdefault("feature_shape", expected)
    metadata_base["feature_shape"] = tuple(metadata_base["feature_shape"])
    amp_dtype = autocast_dtype(device, stream.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    torch.manual_seed(config.seed)
    model = build_probe(probe_config, seed=config.seed).to(device).train()
    ema = build_probe(probe_config, seed=config.seed).to(device).eval()
    ema.load_state_dict(model.state_dict())
    for param in ema.parameters():
        param.requires_grad_(False)
    optimizer = make_optimizer(model, config)
    loss_fn = ProbeLoss(lambda_align=config.lambda_align, lambda_pearson=config.lambda_pearson,
                        temperature=config.temperature, top_weight=config.top_weight)
    num_batches = len(epoch_plan(index, source.train_groups, seed=config.seed, epoch=0,
                                 batch_prompts=config.batch_prompts, buffer_groups=stream.buffer_groups))
    steps_per_epoch = -(-num_batches // context.world_size)
    total_steps = steps_per_epoch * config.epochs
    fingerprint = _fingerprint(source, probe_config, config, stream, context.world_size, mean, std)
    train_rows = sum(len(index.groups[g].rows) for g in source.train_groups)
    val_rows = sum(len(index.groups[g].rows) for g in source.val_groups)
    summary_base = {
        "trainer": "probes.streamed_train", "epochs": config.epochs, "seed": config.seed,
        "processes": context.world_size, "buffer_groups": stream.buffer_groups,
        "data": {"train_rows": train_rows, "train_prompts": len(source.train_groups),
                 "val_rows": val_rows, "val_prompts": len(source.val_groups)},
        "optimizer": {"name": "AdamW", "lr": config.lr, "weight_decay": config.weight_decay,
                      "schedule": config.schedule, "batch_prompts": config.batch_prompts},
        "score_norm_source": norm_source, "selection_metric": "val_within_spearman",
    }

    run: dict[str, Any] = {
        "epoch": 0, "batch": 0, "global_step": 0, "ema_updates": 0, "best_key": None, "best_epoch": None,
        "best_metrics": {}, "epochs_since_best": 0, "history": [], "finished": None,
        "sums": {"total": 0.0, "ranking": 0.0, "align": 0.0, "pearson": 0.0}, "rows_seen": 0, "seconds": 0.0,
    }
    best_state: Optional[dict[str, Tensor]] = None
    resumed_epoch = 0
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        loaded = _load_state(state_dir, fingerprint)
        if loaded is not None:
            tensors, info = loaded
            best_state = restore_modules(tensors, model, ema, optimizer)
            run.update({key: info[key] for key in run})
            resumed_epoch = run["epoch"]
            logger.info("resuming streamed training from %s at epoch %d, batch %d", state_dir, run["epoch"], run["batch"])
    ddp_model = wrap_model(model, context, device)

    def snapshot(module: Probe) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}

    def save_state() -> None:
        if state_dir is None or not context.is_main:
            return
        tensors = {
            **{f"model.{k}": v for k, v in model.state_dict().items()},
            **{f"ema.{k}": v for k, v in ema.state_dict().items()},
            **({f"best.{k}": v for k, v in best_state.items()} if best_state else {}),
            **_optimizer_tensors(optimizer),
            "rng.torch": torch.get_rng_state(),
        }
        _save_state(state_dir, tensors, {**run, "fingerprint": fingerprint, "score_norm": [mean, std]})

    def write_probe(weights: dict[str, Tensor], stopped: str) -> None:
        if not context.is_main:
            return
        with torch.device("meta"):
            probe = Probe(probe_config)
        probe.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in weights.items()}, assign=True)
        training = json_safe({**summary_base, "epochs_run": len(run["history"]), "best_epoch": run["best_epoch"],
                              "stopped": stopped, "val": {k: run["best_metrics"].get(k) for k in
                                                           ("within_spearman", "global_spearman", "top1", "oracle_gain")}})
        save_probe(out_path, probe, ProbeMetadata(**metadata_base, score_mean=mean, score_std=std,
                                                  training=training, config=probe_config))

    def validate() -> dict:
        pred, raw, group = predict_streamed(ema, spec, source.val_groups, device, config.eval_batch_size, amp_dtype)
        return _metrics(pred, raw, group)

    stopped = run["finished"] or "completed"
    pin = device.type == "cuda"
    while run["finished"] is None and run["epoch"] < config.epochs:
        epoch = run["epoch"]
        tau, alpha = anneal(epoch, config.epochs, config.alpha_max, config.tau_min)
        plan = rank_share(epoch_plan(index, source.train_groups, seed=config.seed, epoch=epoch,
                                     batch_prompts=config.batch_prompts, buffer_groups=stream.buffer_groups),
                          context.rank, context.world_size)
        if record_visits:
            while len(source.visits) <= epoch:
                source.visits.append([])
        loader = make_loader(spec, plan, start=run["batch"], num_workers=stream.num_workers,
                             prefetch_batches=stream.prefetch_batches, pin_memory=pin)
        model.train()
        lr = _lr_at(run["global_step"], total_steps, config)
        started = time.perf_counter()
        interrupted = False
        for position, batch in loader:
            local_stop = bool(should_stop is not None and should_stop())
            if context.all_reduce_max(float(local_stop), f"epoch {epoch}, batch {position}") > 0:
                interrupted = True
                break
            if position != run["batch"]:
                raise RuntimeError(f"streamed batches out of plan order: got {position}, expected {run['batch']}")
            batch = _to_device(batch, device)
            lr = _lr_at(run["global_step"], total_steps, config)
            for group_ in optimizer.param_groups:
                group_["lr"] = lr
            amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
            try:
                with amp:
                    _, terms = loss_fn(ddp_model, batch["features"], batch["t"], batch["z"], batch["group"], tau, alpha,
                                       batch.get("text"), x0=batch.get("x0"))
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(terms.total).backward()
                    scaler.unscale_(optimizer)
                else:
                    terms.total.backward()
            except RuntimeError as error:
                if context.active:
                    raise context.lost(f"the gradient exchange of epoch {epoch}, batch {position}", error) from None
                raise
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            ema_update(ema, model, _ema_decay(config, run["ema_updates"]) if config.ema_decay > 0 else 0.0)
            run["ema_updates"] += 1
            run["global_step"] += 1
            run["batch"] += 1
            run["rows_seen"] += int(batch["features"].shape[0])
            for key, value in terms.as_floats().items():
                run["sums"][key] += value
            if record_visits:
                source.visits[epoch].append(batch["group_ids"].cpu().tolist())
            if stream.state_every_batches and run["batch"] % stream.state_every_batches == 0 and run["batch"] < len(plan):
                run["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                save_state()
        run["seconds"] += time.perf_counter() - started

        if interrupted:
            stopped = "should_stop"
            logger.info("streamed training stopped by request in epoch %d after %d batches", epoch, run["batch"])
            if best_state is None:
                run["best_metrics"], run["best_epoch"] = json_safe(validate()), -1
                best_state = snapshot(ema)
            save_state()
            break

        batches = max(1, run["batch"])
        metrics = validate()
        entry = json_safe({
            "epoch": epoch, **{("train_loss" if k == "total" else k): v / batches for k, v in run["sums"].items()},
            "val_within_spearman": metrics["within_spearman"], "val_global_spearman": metrics["global_spearman"],
            "val_top1": metrics["top1"], "val_oracle_gain": metrics["oracle_gain"], "lr": lr, "tau": tau,
            "alpha": alpha, "seconds": run["seconds"], "batches": run["batch"],
            "samples_per_s": run["rows_seen"] / run["seconds"] if run["seconds"] > 0 else None,
        })
        run["history"].append(entry)
        key = metrics["within_spearman"]
        key = -math.inf if key is None or math.isnan(key) else key
        best_key = -math.inf if run["best_key"] is None else run["best_key"]
        if best_state is None or key > best_key + config.min_delta:
            run.update(best_key=key, best_epoch=epoch, best_metrics=json_safe(metrics), epochs_since_best=0)
            best_state = snapshot(ema)
            write_probe(best_state, "running")
        else:
            run["epochs_since_best"] += 1
        logger.info("epoch %d/%d: loss %.4f, val within-prompt Spearman %.4f, %d rows at %.1f rows/s", epoch + 1,
                    config.epochs, entry["train_loss"], metrics["within_spearman"], run["rows_seen"],
                    entry["samples_per_s"] or 0.0)
        if config.patience and run["epochs_since_best"] >= config.patience:
            run["finished"] = stopped = "early_stopping"
        elif epoch + 1 == config.epochs:
            run["finished"] = stopped = "completed"
        run.update(epoch=epoch + 1, batch=0, rows_seen=0, seconds=0.0,
                   sums={"total": 0.0, "ranking": 0.0, "align": 0.0, "pearson": 0.0})
        if (epoch + 1) % config.save_state_every == 0 or run["finished"]:
            save_state()
        if on_epoch is not None:
            on_epoch(epoch, entry)

    write_probe(best_state, stopped)
    best_epoch = run["best_epoch"] if run["best_epoch"] is not None else -1
    return TrainResult(history=run["history"], best_epoch=best_epoch, best_metrics=run["best_metrics"],
                       probe_path=out_path, stopped=stopped, score_mean=mean, score_std=std,
                       resumed_from_epoch=resumed_epoch)



# --------------------------------------------------------------------------------------------
# Dataset -> probe, probe + dataset -> predictions (what the pipeline, the nodes and the CLI call)

# Stream by default once one checkpoint's features exceed this: below it the in-memory path is as
# fast and bit-for-bit what it always was; above it a machine of typical RAM cannot hold them.
STREAM_AUTO_BYTES = 4 * 2**30


def features_bytes(manifest: DatasetManifest, rows: int) -> int:
    """Bytes of one checkpoint's features of ``rows`` rows (what the in-memory path would hold)."""
    c, p, q = manifest.feature_shape
    return rows * c * p * q * 2


def wants_streaming(mode: str, manifest: DatasetManifest, rows: int) -> bool:
    """``mode``: ``"on"``, ``"off"`` or ``"auto"`` (stream above :data:`STREAM_AUTO_BYTES` of features at
    one checkpoint, or always in a several-process job, where each rank reads only its share)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"streaming must be 'auto', 'on' or 'off', got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or features_bytes(manifest, rows) > STREAM_AUTO_BYTES


def train_from_index(index: StreamIndex, checkpoint_t: float, evaluator: str, out_path, *, train_config: TrainConfig,
                     stream_config: Optional[StreamConfig] = None, use_text: bool = True, split_seed: int = 0,
                     fractions=(0.8, 0.1, 0.1), probe_config: Optional[ProbeConfig] = None, state_dir=None,
                     on_epoch=None, should_stop=None) -> tuple[TrainResult, dict]:
    """Streamed twin of :func:`~.pipeline.train_from_dataset`: the same prompt split (a hash of the
    prompt id), the same probe settings; returns ``(result, rows per split)``."""
    manifest = index.manifest
    splits = index.split_groups(fractions, seed=split_seed)
    if not splits["train"] or not splits["val"]:
        raise ValueError(f"dataset {index.root} has too few prompts ({len(index.groups)}) for a train/val/test "
                         f"split; collect more prompts")
    use_text = use_text and manifest.text_dim > 0
    probe_config = probe_config_for(manifest, probe_config, use_text, where=f"dataset {index.root}")
    t = float(manifest.checkpoints[manifest.checkpoint_index(checkpoint_t)])
    source = StreamSource(index, splits["train"], splits["val"], t, evaluator, use_text=use_text)
    metadata_base = {"backbone_family": manifest.backbone_family, "tap": manifest.tap, "checkpoint_t": t,
                     "feature_shape": tuple(manifest.feature_shape), "pooling": manifest.pooling,
                     "evaluator": evaluator, "reduction": manifest.reduction}
    result = train_streamed(source, probe_config, train_config, metadata_base, out_path, stream_config=stream_config,
                            state_dir=state_dir, on_epoch=on_epoch, should_stop=should_stop)
    sizes = {name: sum(len(index.groups[g].rows) for g in ids) for name, ids in splits.items()}
    return result, sizes


def predict_on_index(probe: Probe, metadata: ProbeMetadata, index: StreamIndex, group_ids: list[int],
                     batch_rows: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(predicted score in evaluator units, actual score, prompt index)`` per row of the groups,
    read through the streaming reader (bounded memory, whatever the dataset's size)."""
    device = next(probe.parameters()).device
    spec = BatchSpec(index=index, checkpoint_k=index.manifest.checkpoint_index(metadata.checkpoint_t),
                     evaluator=metadata.evaluator, use_text=bool(probe.config.text_dim and index.manifest.text_dim),
                     use_x0=probe.config.reads_x0)
    pred, raw, group = predict_streamed(probe, spec, group_ids, device, batch_rows)
    predicted = (pred.double() * metadata.score_std + metadata.score_mean).numpy()
    return predicted, raw.double().numpy(), group.numpy()
