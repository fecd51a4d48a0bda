"""A model directory's safetensors weights read without loading the model: which files hold them (sharded or not),
and single tensors by name (LoftQ's full-precision originals, the GGUF LoRA export's base-weight check)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def weight_files(folder: Path) -> list[Path]:
    """The files of `folder`'s safetensors index, else its `*.safetensors` files; sorted, each once."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


class SafetensorsWeights:
    """Reads single tensors from a model directory's (possibly sharded) safetensors files; `files` (tensor name ->
    file) is empty where the directory has none."""

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: model_dir / file for name, file in weight_map.items()}
            return
        from safetensors import safe_open

        for path in weight_files(model_dir):
            with safe_open(str(path), framework="pt") as handle:
                self.files.update({name: path for name in handle.keys()})

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor `name`, also found under the name without its first part or with `model.` in front (a
        task head's checkpoint and a bare backbone's name the same weight differently); None where none is."""
        from safetensors import safe_open

        for candidate in (name, name.split(".", 1)[-1], f"model.{name}"):
            if candidate in self.files:
                with safe_open(str(self.files[candidate]), framework="pt") as handle:
                    return handle.get_tensor(candidate)
        return None
