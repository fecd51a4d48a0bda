"""Weight interpolation between the base model and a trained LoRA: how facts and forgetting trade along it.

Scaling a LoRA update by s in [0, 1] evaluates the model on the straight line from the base (s = 0) to the
tuned model (s = 1), as WiSE-FT does for full fine-tuning (Wortsman et al., 2022, "Robust fine-tuning of
zero-shot models"). If the domain facts are learnt early on that line and the general answers only move
late, an intermediate s keeps the facts and loses less, at no training cost; the merged export would then
carry `s * delta`. Measured like `peftkit eval`: held-out facts (with the recipe's system prompt), the
built-in forgetting set without and with the system prompt, and the independent check set.

    python -m benchmarks.adapter_scale_probe RUN_DIR [RUN_DIR ...] [--scales 1 0.8 0.6 0.4]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import write_table_report

ROOT = Path(__file__).resolve().parents[1]
CHECK_SET = ROOT / "benchmarks" / "data" / "general_check.jsonl"
COLUMNS = ["run", "scale", "heldout", "forgetting", "forgetting_in_role", "check_accuracy", "lost"]


@contextmanager
def scaled_lora(model: Any, scale: float) -> Iterator[None]:
    """Every LoRA layer's update multiplied by `scale` (its `scaling` factor), restored afterwards."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise SystemExit("the run has no LoRA layers; the probe scales LoRA updates only")
    if any(any(m.use_dora.values()) for m in layers):
        raise SystemExit("DoRA's update is not linear in its scaling factor; the probe takes plain LoRA runs")
    saved = [dict(m.scaling) for m in layers]
    try:
        for m in layers:
            for name in m.scaling:
                m.scaling[name] *= scale
        yield
    finally:
        for m, scaling in zip(layers, saved):
            m.scaling.update(scaling)


def _points(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 1)


def _lost(value: float | None, before: float | None) -> float | None:
    return None if value is None or before is None else round(100 * (before - value), 1)


def probe_rows(run_dir: Path, scales: list[float]) -> list[dict[str, Any]]:
    from peftkit.data.build import load_heldout
    from peftkit.evaluate.generation import heldout_accuracy
    from peftkit.evaluate.run_eval import GENERAL_SET, asked_in_role, builtin_resource
    from peftkit.runs import load_run

    run = load_run(run_dir)
    recipe = run.recipe
    system = recipe.data.system_prompt
    heldout = load_heldout(recipe.data.heldout, system) if recipe.data.heldout else []
    general = load_heldout(builtin_resource(GENERAL_SET), None)
    in_role = asked_in_role(general, system)
    check = load_heldout(CHECK_SET, None)

    def accuracy(items: list[Any], label: str) -> tuple[float | None, list[dict[str, Any]]]:
        if not items:
            return None, []
        return heldout_accuracy(run.model, run.tokenizer, items, max_new_tokens=recipe.eval.max_new_tokens,
                                batch_size=recipe.eval.batch_size, label=f"{label}, x{scale}")

    rows = []
    base: dict[str, float | None] = {}
    for scale in sorted({0.0, *scales}):
        with scaled_lora(run.model, scale):
            held, _ = accuracy(heldout, "held-out questions")
            gen, details = accuracy(general, "general questions")
            role, _ = accuracy(in_role, "general questions in role")
            chk, _ = accuracy(check, "check questions")
        if scale == 0.0:
            base = {"general": gen, "in_role": role}

        rows.append({
            "run": run_dir.name, "scale": scale, "heldout": _points(held),
            "forgetting": _lost(gen, base["general"]), "forgetting_in_role": _lost(role, base["in_role"]),
            "check_accuracy": _points(chk),
            "lost": "; ".join(d["question"] for d in details if not d["correct"]),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished LoRA run directories")
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.8, 0.6, 0.4],
                        help="update scales to evaluate (0, the base model, is always measured)")
    args = parser.parse_args()
    if any(not 0.0 <= s <= 2.0 for s in args.scales):
        raise SystemExit("--scales: give factors between 0 and 2")
    rows = [row for run_dir in args.run_dirs for row in probe_rows(run_dir, args.scales)]
    write_table_report("adapter_scale", rows, ("run", "scale"),
                       "# LoRA update scaled between the base (0) and the tuned model (1)\n\n"
                       "Held-out and check in % correct; forgetting in points lost against scale 0 (the base model) "
                       "on the built-in 33 general questions, asked without and with the recipe's system prompt.\n\n",
                       COLUMNS)


if __name__ == "__main__":
    main()
