"""Training probes (pure PyTorch): activation datasets (:mod:`.dataset`), losses, metrics, the
training loop (:mod:`.train`), evaluation and the dataset -> probe pipeline (:mod:`.pipeline`)."""
