"""Model references (built-in, local, GGUF, hub), quantization and tokenizer setup."""

from peftkit.models.load import load_model, load_tokenizer, resolve_device, resolve_dtype, save_tokenizer, weights_dtype
from peftkit.models.registry import BUILTINS, DEFAULT_MODEL, peftkit_home
from peftkit.models.resolve import ModelSource, materialize, resolve_model_ref

__all__ = [
    "BUILTINS",
    "DEFAULT_MODEL",
    "ModelSource",
    "load_model",
    "load_tokenizer",
    "save_tokenizer",
    "materialize",
    "peftkit_home",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_ref",
    "weights_dtype",
]
