"""The standard FID InceptionV3, loaded from a local weights file that is checked by its hash.

FID, KID, Inception Score and precision/recall are only comparable with published numbers when
they use the exact network of the original TensorFlow FID code (``inception-2015-12-05``). Its
PyTorch port is the file ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; the same
bytes are torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``), 95,628,359 bytes with
SHA-256 :data:`INCEPTION_SHA256`. This module never downloads it: a missing file raises
:class:`InceptionWeightsError` naming the file, where to put it and how to check it.

The network is torchvision's InceptionV3 with the changes of the TensorFlow graph (average pools
that do not count padding in the A, C and E blocks, a max pool in the last E block), 1008 output
classes, and the TensorFlow input scaling ``(x - 128) / 128`` on 0..255 values. The file is read
with ``torch.load(weights_only=True)`` only after its SHA-256 matched, so only these known bytes
are ever unpickled.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models import inception as tv_inception

__all__ = [
    "INCEPTION_FILENAME",
    "INCEPTION_ALT_FILENAME",
    "INCEPTION_SHA256",
    "INCEPTION_SIZE",
    "INCEPTION_INPUT_SIZE",
    "InceptionWeightsError",
    "FIDInceptionV3",
    "sha256_of_file",
    "load_fid_inception",
]

logger = logging.getLogger(__name__)

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_ALT_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_SIZE = 95_628_359
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILENAME
INCEPTION_INPUT_SIZE = 299
INCEPTION_DIR_HINT = "ComfyUI/models/inception"


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights are missing or are not the standard file.

    ``problem`` says what is wrong, ``fix`` what to do; the message is ``"<problem> Fix: <fix>"``.
    """

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}")


def _check_command(path: str) -> str:
    return (f"check it with `sha256sum {path}` (Linux), `shasum -a 256 {path}` (macOS) or "
            f"`certutil -hashfile {path} SHA256` (Windows): it must print {INCEPTION_SHA256}")


def missing_weights_fix(folder_hint: str = INCEPTION_DIR_HINT) -> str:
    path = os.path.join(folder_hint, INCEPTION_FILENAME)
    return (f"download {INCEPTION_FILENAME} ({INCEPTION_SIZE:,} bytes) yourself from {INCEPTION_URL}, put it in "
            f"{folder_hint}/ and {_check_command(path)}. This pack never downloads weights.")


class _FIDInceptionA(tv_inception.InceptionA):
    """InceptionA whose average pool leaves padding out of the mean (as the TensorFlow graph)."""

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class _FIDInceptionC(tv_inception.InceptionC):
    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class _FIDInceptionE(tv_inception.InceptionE):
    """InceptionE; the first one (Mixed_7b) average-pools without padding, the last (Mixed_7c)
    max-pools: a quirk of the TensorFlow graph that FID values depend on."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__(in_channels)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3. Input ``[B, 3, 299, 299]`` floats in 0..1 (already resized); output the
    2048-d pool features (FID, KID, precision/recall) and the 1008 logits without the fc bias
    (Inception Score, as the original TensorFlow code). Parameter names are those of the weights file.
    """

    def __init__(self) -> None:
        super().__init__()
        conv = tv_inception.BasicConv2d
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = tv_inception.InceptionB(288)
        self.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = tv_inception.InceptionD(768)
        self.Mixed_7b = _FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = _FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        x = (pixels * 255.0 - 128.0) / 128.0       # the TensorFlow graph's input scaling
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return {"pool": pool, "logits": pool @ self.fc.weight.T}


def sha256_of_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_fid_inception(path: Optional[Union[str, os.PathLike]], device: Union[str, torch.device] = "cpu",
                       expected_sha256: str = INCEPTION_SHA256,
                       folder_hint: str = INCEPTION_DIR_HINT) -> FIDInceptionV3:
    """Build the FID InceptionV3 from the local standard weights file.

    Args:
        path: the weights file (``pt_inception-2015-12-05-6726825d.pth``). None or a missing file
            raises :class:`InceptionWeightsError` saying where to put it.
        expected_sha256: the hash the file must have (the standard file's; tests pass another one
            for a file they write).
        folder_hint: the folder named in the error messages.
    """
    if path is None or not os.path.isfile(path):
        shown = f"'{path}' does not exist" if path else "no weights file was selected"
        raise InceptionWeightsError(f"the FID Inception weights {INCEPTION_FILENAME} are needed but {shown}.",
                                    missing_weights_fix(folder_hint))
    path = os.fspath(path)
    digest = sha256_of_file(path)
    if digest != expected_sha256:
        raise InceptionWeightsError(
            f"'{os.path.basename(path)}' is not the standard FID Inception file (its SHA-256 is {digest[:16]}..., "
            f"expected {expected_sha256[:16]}...); FID from other weights is not comparable with published values.",
            missing_weights_fix(folder_hint))
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    result = model.load_state_dict(state, strict=False)
    # BatchNorm counters are absent from some conversions and unused in eval mode.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise InceptionWeightsError(
            f"'{os.path.basename(path)}' does not fit the FID InceptionV3 (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}).", missing_weights_fix(folder_hint))
    model.eval().requires_grad_(False)
    return model.to(device)
