"""Do a domain's layer inputs lie outside the subspace that general conversations use?

Null-space methods against forgetting (AlphaEdit, Fang et al., 2025; LoRA-Null, 2025) restrict each
weight update to input directions that general text does not use, so ΔW·x ≈ 0 on general inputs. They
can only learn the domain if the domain's inputs have energy in those directions. This probe measures
that before anything is built: per adapted projection, the eigenvectors of the input covariance on
general conversations (the built-in replay set, prompts and written answers) that hold a given share of
its energy, and the share of each token's input energy left outside them, on answer tokens of held-out
general conversations and of the recipe's training conversations. A ratio (domain / general) well above
1 would leave room for a null-space adapter; near 1, blocking general directions blocks the domain too.

    python -m benchmarks.subspace_probe [--recipe recipes/quickstart.yaml] [--fit 400]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import environment, markdown_table, recipe_with_base_model, results_stem, write_csv

ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ("q_proj", "o_proj", "gate_proj", "down_proj")
"""One per distinct input: k/v share q's input, up shares gate's."""
ENERGIES = (0.9, 0.99, 0.999, 0.9999)


def layer_inputs(model: Any, rows: Sequence[dict[str, list[int]]], visit: Callable[[str, torch.Tensor], None],
                 answers_only: bool) -> None:
    """Run each row through the model and hand every projection's input (float64, one row per token) to `visit`."""
    modules = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS}
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def grab(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            captured[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for row in rows:
            with torch.no_grad():
                model(input_ids=torch.tensor([row["input_ids"]]))
            keep = torch.tensor([label != -100 for label in row["labels"]]) if answers_only else None
            for name, x in captured.items():
                visit(name, x if keep is None else x[keep])
    finally:
        for handle in handles:
            handle.remove()


def subspaces(covariances: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Per projection, the leading eigenvectors holding each share of ENERGIES."""
    out = {}
    for name, cov in covariances.items():
        values, vectors = torch.linalg.eigh(cov)
        values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
        cumulative = values.cumsum(0) / values.sum()
        out[name] = [vectors[:, : int((cumulative < e).sum()) + 1] for e in ENERGIES]
    return out


def residual_shares(model: Any, rows: Sequence[dict[str, list[int]]], bases: dict[str, list[torch.Tensor]]
                    ) -> dict[str, list[float]]:
    """Per projection, the mean over rows of the answer tokens' energy share outside each subspace."""
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}

    def visit(name: str, x: torch.Tensor) -> None:
        total = (x * x).sum()
        shares = [float((total - (x @ u).pow(2).sum()) / total) for u in bases[name]]
        sums[name] = [a + b for a, b in zip(sums.get(name, [0.0] * len(ENERGIES)), shares)]
        counts[name] = counts.get(name, 0) + 1

    layer_inputs(model, rows, visit, answers_only=True)
    return {name: [s / counts[name] for s in values] for name, values in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--fit", type=int, default=400, help="general conversations for the covariance (rest held out)")
    args = parser.parse_args()

    from peftkit.data.build import tokenize_examples
    from peftkit.data.formats import load_examples
    from peftkit.data.replay import load_replay, replay_path

    recipe, tokenizer, model = recipe_with_base_model(args.recipe)
    general = load_replay(str(replay_path("builtin:general")))
    random.Random(0).shuffle(general)
    max_len = recipe.data.max_seq_len
    fit_rows, _ = tokenize_examples(general[: args.fit], tokenizer, max_len, None)
    held_rows, _ = tokenize_examples(general[args.fit :], tokenizer, max_len, None)
    domain_rows, _ = tokenize_examples(load_examples(recipe.data.train, recipe.data.format), tokenizer, max_len,
                                       recipe.data.system_prompt)

    covariances: dict[str, torch.Tensor] = {}

    def accumulate(name: str, x: torch.Tensor) -> None:
        covariances[name] = covariances.get(name, 0) + x.T @ x

    layer_inputs(model, fit_rows, accumulate, answers_only=False)
    bases = subspaces(covariances)
    held, domain = residual_shares(model, held_rows, bases), residual_shares(model, domain_rows, bases)

    rows = []
    for projection in PROJECTIONS:
        names = [n for n in bases if n.rsplit(".", 1)[-1] == projection]
        for i, energy in enumerate(ENERGIES):
            mean = lambda values: sum(values[n][i] for n in names) / len(names)  # noqa: E731
            kept = sum(bases[n][i].shape[1] for n in names) / len(names)
            rows.append({"projection": projection, "input_dim": bases[names[0]][i].shape[0], "energy": energy,
                         "directions_kept": round(kept), "outside_general_heldout": round(mean(held), 5),
                         "outside_domain": round(mean(domain), 5), "ratio": round(mean(domain) / mean(held), 2)})
    stem = results_stem("subspace_probe")
    table = "\n".join(markdown_table(rows, list(rows[0])))
    text = (f"# Domain vs general layer inputs (`{Path(args.recipe).name}`, base `{recipe.model.name}`)\n\n"
            f"Covariance from {len(fit_rows)} general conversations; residual energy share on the answer tokens "
            f"of {len(held_rows)} held-out general and {len(domain_rows)} domain conversations, averaged over "
            f"the layers.\n\n{table}\n\n```\n{environment()}\n```\n")
    write_csv(stem, rows)
    Path(f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
