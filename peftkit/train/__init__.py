"""Training: trainer assembly, callbacks, checkpoints and the run directory."""
