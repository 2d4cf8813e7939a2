"""Analysis toolkit: pure-PyTorch/numpy math behind the analysis nodes (no ComfyUI import here).

- :mod:`.image_metrics`: FID, KID, Inception Score, precision/recall, density/coverage, CMMD, CLIPScore.
- :mod:`.features`: resizing (clean / legacy), streaming feature accumulation, reference statistics files.
- :mod:`.inception`: the standard FID InceptionV3, from a local, hash-checked weights file.
- :mod:`.ood`: Mahalanobis out-of-distribution scores against a fitted reference.
"""
