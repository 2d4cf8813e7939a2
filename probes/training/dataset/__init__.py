"""Activation datasets for training probes: one manifest plus append-only safetensors shards.

Layout of a dataset directory::

    <root>/manifest.json                                 what every row holds (see DatasetManifest)
    <root>/shards/shard-<writer_id>-<seq:06d>.safetensors  one appended batch of rows each

Why shards: collecting data means sampling, finishing and scoring for hours, often from several
ComfyUI instances (or machines on a shared disk) at once, and any job may be killed at any moment.
Each append writes one new file, under a name no other writer uses, atomically (temporary file in
the same folder, then a rename). So a crash never leaves a visible partial shard (only a hidden
``.*.tmp`` file and safetensors' ``.tmpXXXXXX``, which readers ignore and the next writer or
reader deletes once stale: :func:`remove_stale_temporaries`), concurrent writers never touch each other's files, and no
lock is needed. Shards are never modified once visible. Readers list the shards in name order, so
rows come in the same order every time, and drop repeated ``(prompt_id, seed)`` rows, which is what
re-running a crashed collection job produces.

Shard content (all metadata values are strings; structured ones are JSON)::

    tensors   features        [R, K, C, P, P] float16 (K checkpoints, in manifest order)
              seeds           [R] int64
              text_embedding  [R, D] float16 (only when the manifest's text_dim > 0)
              x0              [R, K, c, S, S] float16 pooled x0 prediction latent (only when the
                              manifest has an x0_shape)
              score.<name>    [R] float32, one per evaluator of the manifest
    metadata  format, format_version, prompts, prompt_ids, checkpoints, writer, created

Only safetensors and JSON are ever read: nothing is unpickled.

The package, one module per job: :mod:`.manifest` (the manifest, the error type), :mod:`.rows` (rows
to append and their checks), :mod:`.shards` (shard files, headers, stale temporaries),
:mod:`.writer`, :mod:`.reader`, :mod:`.splits` (splits by prompt, probe/dataset checks). Import the
names from here.
"""
from .manifest import (
    DATASET_FORMAT,
    DATASET_FORMAT_VERSION,
    DATASETS_SUBFOLDER,
    MANIFEST_NAME,
    DatasetError,
    DatasetManifest,
    PathLike,
    read_manifest,
)
from .reader import DatasetArrays, ProbeDataset
from .rows import CandidateRows, prompt_id, rows_from_activations
from .shards import (
    SHARD_DIR,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    STALE_TEMP_SECONDS,
    list_shards,
    read_shard_header,
    remove_stale_temporaries,
)
from .splits import SPLIT_NAMES, check_probe_matches, probe_config_for, split_by_prompt
from .writer import DatasetWriter, default_writer_id

__all__ = [
    "DATASET_FORMAT",
    "DATASET_FORMAT_VERSION",
    "SPLIT_NAMES",
    "DatasetError",
    "DatasetManifest",
    "CandidateRows",
    "DatasetWriter",
    "ProbeDataset",
    "DatasetArrays",
    "read_manifest",
    "list_shards",
    "prompt_id",
    "default_writer_id",
    "split_by_prompt",
    "check_probe_matches",
    "probe_config_for",
    "DATASETS_SUBFOLDER",
    "MANIFEST_NAME",
    "PathLike",
    "SHARD_DIR",
    "SHARD_PREFIX",
    "SHARD_SUFFIX",
    "STALE_TEMP_SECONDS",
    "read_shard_header",
    "remove_stale_temporaries",
    "rows_from_activations",
]
