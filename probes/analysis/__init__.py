"""Analysis toolkit math (pure PyTorch, no ComfyUI): schedules, attention maps, PCA, latent probing,
image-set metrics and out-of-distribution scores. The nodes in `nodes/` are thin wrappers over it."""
