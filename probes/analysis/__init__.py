"""Analysis toolkit: the pure-PyTorch/numpy math behind the analysis nodes (no ComfyUI import here).

- :mod:`.image_metrics`: FID, KID, Inception Score, precision/recall, density/coverage, CMMD, CLIPScore.
- :mod:`.features`: resizing (clean / legacy), streaming feature accumulation, reference statistics files.
- :mod:`.inception`: the standard FID InceptionV3, from a local, hash-checked weights file.
- :mod:`.ood`: Mahalanobis out-of-distribution scores against a fitted reference.
- :mod:`.schedules`: sigma / alpha / log-SNR per step for eps, v-prediction and flow models.
- :mod:`.attention`: per-token cross-attention maps and their spatial sharpness.
- :mod:`.pca`: the first three principal components of activations as RGB.
- :mod:`.latent`: slerp and semantic directions.
"""
