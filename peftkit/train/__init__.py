"""Training: trainer assembly, callbacks, checkpoints and the run directory."""

RESUME_LAST = "last"
"""What a bare `--resume` means: the recipe's output_dir, which must hold a checkpoint. (Here, not in launch.py: the
command line reads it without importing torch.)"""
RESUME_KEYWORDS = (None, "auto", RESUME_LAST)
"""`--resume` values that name no run directory."""
