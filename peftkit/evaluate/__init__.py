"""Evaluation: held-out loss, generation-based fact accuracy."""

from peftkit.evaluate.generation import Reply, generate_replies, heldout_accuracy, is_correct

__all__ = ["Reply", "generate_replies", "heldout_accuracy", "is_correct"]
