"""Training data: file formats, chat templating with assistant-only labels, batching."""

from peftkit.data.build import DataBundle, HeldoutItem, PaddingCollator, build_datasets, load_heldout
from peftkit.data.chat import IGNORE_INDEX, tokenize_conversation, with_system_prompt
from peftkit.data.formats import Example, load_examples

__all__ = [
    "IGNORE_INDEX",
    "DataBundle",
    "Example",
    "HeldoutItem",
    "PaddingCollator",
    "build_datasets",
    "load_examples",
    "load_heldout",
    "tokenize_conversation",
    "with_system_prompt",
]
