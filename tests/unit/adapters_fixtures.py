"""Helpers shared by the adapter tests (tiny model from tests/conftest.py, no network)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from peftkit.config.schema import ADAPTER_CLASSES

METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init": "gaussian"},
    "qlora": {"r": 4, "alpha": 8, "dropout": 0.0, "init": "gaussian", "gradient_checkpointing": False},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "prompt_tuning": {"num_virtual_tokens": 16},
    "ia3": {},
    "full": {},
    "partial": {"train_last_layers": 1, "train_head": True},
}
"""Small, quick settings per method; gaussian LoRA init so the adapter changes the output at once."""

LEARNING_RATES = {
    "lora": 2e-2, "qlora": 2e-2, "prefix_tuning": 5e-2, "prompt_tuning": 3e-1, "ia3": 5e-1, "full": 5e-3, "partial": 5e-3,
}

ALL_METHODS = tuple(cls.model_fields["method"].default for cls in ADAPTER_CLASSES)


def adapter_config(method: str, **overrides: Any) -> Any:
    cls = next(c for c in ADAPTER_CLASSES if c.model_fields["method"].default == method)
    return cls(**{**METHOD_SETTINGS[method], **overrides})


def load_tiny(model_dir: Path, method: str = "lora") -> Any:
    from peftkit.adapters import effective_quantization  # noqa: F401 - same loading path as training
    from peftkit.config.schema import ModelConfig, QuantizationConfig
    from peftkit.models import load_model

    quantization = QuantizationConfig(bits=4) if method == "qlora" else None
    torch.manual_seed(0)
    return load_model(ModelConfig(name=str(model_dir)), quantization, device="cpu", dtype=torch.float32)


def build(model_dir: Path, method: str, **overrides: Any) -> Any:
    from peftkit.adapters import build_adapter

    model = load_tiny(model_dir, method)
    torch.manual_seed(0)
    return build_adapter(model, adapter_config(method, **overrides), quantized=method == "qlora")


def chat_batch(tokenizer: Any, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A right-padded batch with assistant-only labels, exactly as training builds it."""
    from peftkit.data import PaddingCollator, tokenize_conversation

    rows = [tokenize_conversation(tokenizer, r["messages"], 64, "test")[0] for r in records]
    return PaddingCollator(tokenizer.pad_token_id)(rows)


def recipe_for(tiny_recipe: dict[str, Any], method: str, tmp_path: Path, **adapter: Any) -> dict[str, Any]:
    """The conftest tiny recipe with another adapter method, trained and evaluated on the same file."""
    recipe = copy.deepcopy(tiny_recipe)
    recipe["adapter"] = {"method": method, **METHOD_SETTINGS[method], **adapter}
    recipe["data"]["eval"] = recipe["data"]["train"]
    recipe["train"].update({"max_steps": 8, "lr": LEARNING_RATES[method], "warmup_ratio": 0.0, "scheduler": "constant"})
    recipe["output_dir"] = str(tmp_path / f"run-{method}")
    return recipe


class CaptureModel(TrainerCallback):
    """Keeps the trained model object, to compare it with what was saved."""

    def __init__(self) -> None:
        self.model: Any = None

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.model = model
