"""Several processes (GPUs or CPU cores) training one probe with PyTorch's DistributedDataParallel.

Started by ``torchrun`` (or anything that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``); without those variables everything here is a no-op and training runs in one
process, as it always did. On CPU the backend is gloo (how the tests run it), on CUDA NCCL.

Every rank builds the same epoch plan from the same seed and takes its own share of the batches
(:func:`rank_share`): rank r trains on batches r, r + W, r + 2W, ... so each prompt group is read by
exactly one rank per epoch. DDP averages the gradients, so the ranks' weights (and EMAs) stay equal.

A rank that dies or hangs must not leave the others waiting forever: collectives run with a
timeout, and any failure in one is re-raised as :class:`DistributedError`, which says which rank saw
it and that the job has to be restarted (resuming from its last saved state).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DistributedError", "DistContext", "init_distributed", "rank_share", "ProbeDDP"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A multi-process training job lost one of its processes (or could not start)."""


@dataclass
class DistContext:
    """Where this process stands in the job: ``rank`` of ``world_size`` (1 = not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_max(self, value: float, what: str) -> float:
        """The largest ``value`` over all ranks (``what`` names the step for error messages)."""
        if not self.active:
            return value
        tensor = torch.tensor([float(value)])
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        except Exception as error:  # gloo / NCCL raise RuntimeError subclasses that vary by version
            raise self.lost(what, error) from None
        return float(tensor.item())

    def lost(self, what: str, error: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.world_size}: the other training processes stopped answering during "
            f"{what} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). One of them "
            f"died or hung; stop the job and start it again (it resumes from the last saved training state)."
        )

    def shutdown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as error:  # a broken group may not tear down cleanly; nothing to save
                logger.debug("destroy_process_group failed: %s", error)
            self.initialized_here = False


def init_distributed(device: torch.device, timeout_s: float) -> DistContext:
    """Join the job described by the environment (``torchrun``'s variables); no-op without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    except Exception as error:
        raise DistributedError(
            f"rank {rank} of {world} could not join the training job ({error}); check MASTER_ADDR/MASTER_PORT "
            f"and that all {world} processes were started."
        ) from None
    logger.info("joined distributed training: rank %d of %d (%s)", rank, world, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, initialized_here=True)


def rank_share(plan: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's batches of an epoch plan: positions ``rank, rank + W, ...``.

    Every rank gets ``ceil(len(plan) / W)`` batches (DDP needs the same number of steps on every
    rank); ranks short of one repeat the plan's first batches, as ``DistributedSampler`` pads.
    """
    if world_size <= 1:
        return list(plan)
    steps = -(-len(plan) // world_size)
    return [plan[(rank + world_size * step) % len(plan)] for step in range(steps)] if plan else []


class ProbeDDP(DistributedDataParallel):
    """DDP around a :class:`~probe_select.probes.model.Probe` that still answers the loss's
    questions about the probe (``config``, the MLPs it hooks)."""

    @property
    def config(self):
        return self.module.config

    @property
    def image_mlp(self):
        return self.module.image_mlp

    @property
    def image_embedding(self):
        return self.module.image_embedding

    @property
    def text_mlp(self):
        return self.module.text_mlp


def wrap_model(model: torch.nn.Module, context: DistContext, device: torch.device) -> torch.nn.Module:
    """``model`` itself in one process; a :class:`ProbeDDP` of it in a job of several."""
    if not context.active:
        return model
    device_ids: Optional[list[int]] = [device.index or 0] if device.type == "cuda" else None
    try:
        return ProbeDDP(model, device_ids=device_ids)
    except Exception as error:
        raise context.lost("the start of training (broadcast of the initial weights)", error) from None
