"""Small learnable datasets on disk for the streaming, distributed and compaction tests.

Every row's score is the mean of its channel-0 features at the last checkpoint plus a little noise,
so a probe can learn to rank seeds; rows come as ``shards`` shards of ``prompts_per_shard`` prompts
with ``seeds`` seeds each, written with the real :class:`DatasetWriter`.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tools  # noqa: E402,F401  (registers the package probe_select)
from probe_select.probes.model import ProbeConfig  # noqa: E402
from probe_select.probes.training.dataset import CandidateRows, DatasetManifest, DatasetWriter  # noqa: E402

FEATURE_SHAPE = (4, 4, 4)
CHECKPOINTS = [0.2, 0.5]
EVALUATORS = ["clipscore"]


def tiny_probe_config(text_dim: int = 0) -> ProbeConfig:
    return ProbeConfig(in_channels=FEATURE_SHAPE[0], feature_size=FEATURE_SHAPE[1], stem_width=8, widths=(8,),
                       attention=False, pooled_size=2, embed_dim=8, time_embed_dim=8, text_dim=text_dim,
                       head_hidden=(16,), mlp_hidden=16)


def make_manifest(text_dim: int = 0) -> DatasetManifest:
    return DatasetManifest(backbone_family="sd2", tap="output_blocks.7.0", feature_shape=FEATURE_SHAPE,
                           checkpoints=CHECKPOINTS, evaluators=EVALUATORS, text_dim=text_dim)


def shard_rows(shard: int, prompts_per_shard: int, seeds: int, text_dim: int = 0, seed: int = 0) -> CandidateRows:
    generator = torch.Generator().manual_seed(seed * 100_003 + shard)
    n = prompts_per_shard * seeds
    features = torch.randn(n, len(CHECKPOINTS), *FEATURE_SHAPE, generator=generator)
    score = features[:, -1, 0].mean(dim=(1, 2)) * 3 + 0.1 * torch.randn(n, generator=generator)
    prompts = [f"prompt {shard}-{i // seeds}" for i in range(n)]
    text = torch.randn(n, text_dim, generator=generator) if text_dim else None
    return CandidateRows(features=features, seeds=[1000 + i % seeds for i in range(n)], prompts=prompts,
                         text_embedding=text, scores={"clipscore": score})


def write_dataset(root: Path, shards: int = 6, prompts_per_shard: int = 8, seeds: int = 4, text_dim: int = 0,
                  writer_id: str = "w0", seed: int = 0) -> Path:
    writer = DatasetWriter(root, make_manifest(text_dim), writer_id=writer_id)
    for shard in range(shards):
        writer.append(shard_rows(shard, prompts_per_shard, seeds, text_dim, seed))
    return Path(root)
