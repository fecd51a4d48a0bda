"""Benchmark plumbing that decides what a report says: recipe mapping and row merging."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.common import earlier_rows, markdown_table, write_csv
from benchmarks.common import kept_notes
from benchmarks.methods import ROOT, ROW_KEY, method_matrix, recipe_for, seed_summary, update_curves


def test_methods_map_to_their_recipes_and_variants():
    assert recipe_for("quickstart", "lora") == (ROOT / "recipes" / "quickstart.yaml", [])
    for name, method in (("nosuch", "lora"), ("quickstart.yaml", "full")):  # refused before hours of other runs
        with pytest.raises(SystemExit, match=f"no recipes/{name}.yaml for --recipes {name}"):
            recipe_for(name, method)
    assert recipe_for("quickstart", "prefix")[0].name == "quickstart-prefix.yaml"
    recipe, overrides = recipe_for("quickstart", "qlora-int8")
    assert recipe.name == "quickstart-qlora.yaml" and overrides == ["quantization.bits=8"]
    recipe, overrides = recipe_for("support-desk", "dora")  # no dedicated recipe: the recipe's LoRA, as DoRA
    assert recipe.name == "support-desk.yaml" and overrides == ["adapter.use_dora=true"]
    recipe, overrides = recipe_for("support-desk", "prefix")  # data of support-desk, settings of quickstart-prefix
    assert recipe.name == "support-desk.yaml" and overrides[0].startswith('adapter={"method": "prefix_tuning"')
    from peftkit.config import load_recipe

    loaded = load_recipe(recipe, overrides)
    assert loaded.adapter.method == "prefix_tuning" and loaded.train.lr == 5e-3 and "support-desk" in loaded.data.train
    with pytest.raises(SystemExit, match="quickstart-nosuch.yaml"):
        recipe_for("support-desk", "nosuch")
    assert recipe_for("quickstart", "lora-replay")[1][0].startswith("data.replay.path=")
    # contrast replays each recipe's own training prompts, not the quickstart's
    for name in ("quickstart", "support-desk"):
        replay = recipe_for(name, "lora-contrast")[1][0]
        assert replay == f"data.replay.path={ROOT / 'recipes' / 'data' / name / 'train.jsonl'}"


def test_rows_of_an_earlier_invocation_are_kept_unless_measured_again(tmp_path):
    stem = tmp_path / "2026-01-01_cpu2_methods"
    write_csv(stem, [
        {"recipe": "quickstart", "method": "lora", "heldout_accuracy": 0.6, "run_dir": "a"},
        {"recipe": "quickstart", "method": "full", "heldout_accuracy": 0.4, "run_dir": "b"},
    ])
    kept = earlier_rows(stem, [{"recipe": "quickstart", "method": "full"}], ("recipe", "method"))
    assert kept == [{"recipe": "quickstart", "method": "lora", "heldout_accuracy": 0.6, "run_dir": "a"}]
    assert markdown_table(kept, ["method", "heldout_accuracy"])[2] == "| lora | 0.6 |"
    # Seeds are part of a row's identity: another seed adds a row, the same seed replaces it.
    write_csv(stem, [{"recipe": "quickstart", "method": "lora", "seed": 42, "heldout_accuracy": 0.6, "run_dir": "a"}])
    assert len(earlier_rows(stem, [{"recipe": "quickstart", "method": "lora", "seed": 1}], ROW_KEY)) == 1
    assert earlier_rows(stem, [{"recipe": "quickstart", "method": "lora", "seed": 42}], ROW_KEY) == []


def test_seed_summary_reports_mean_and_spread_of_repeated_runs():
    rows = [{"recipe": "q", "method": "lora", "seed": s, "heldout_accuracy": acc, "forgetting_points": f,
             "forgetting_confident_points": c, "eval_loss": 1.0}
            for s, acc, f, c in ((42, 0.6, 30.0, 6.25), (1, 0.7, 20.0, 0.0), (2, 0.65, "", None))]
    rows.append({"recipe": "q", "method": "full", "seed": 42, "heldout_accuracy": 0.7, "forgetting_points": 20.0, "eval_loss": 1.0})
    lines = seed_summary(rows)
    assert lines[2] == ("| recipe | method | seeds | heldout_accuracy_% | forgetting_points | forgetting_confident_points"
                        " | eval_loss |")
    assert lines[4] == "| q | lora | 42 1 2 | 65.0 ± 5.0 | 25.0 ± 7.1 | 3.1 ± 4.4 | 1.000 ± 0.000 |"
    assert len(lines) == 6  # full ran once: no spread to report
    assert seed_summary(rows[3:]) == []


def test_method_matrix_grids_recipes_by_methods_with_the_target_ratios():
    def row(recipe, method, seed, accuracy, forgetting):
        return {"recipe": recipe, "method": method, "seed": seed, "heldout_accuracy": accuracy, "forgetting_points": forgetting}

    rows = [row("q", "lora", 42, 0.6, 30.0), row("q", "lora", 1, 0.7, 20.0), row("q", "full", 42, 0.8, 10.0),
            row("q", "qlora", 42, 0.55, ""), row("s", "full", 42, 0.5, 40.0)]
    lines = method_matrix(rows)
    assert lines[2] == "| recipe | lora | qlora | full | lora / full | qlora - lora |"
    assert lines[4] == "| q | 65.0 / 25.0 (n=2) | 55.0 | 80.0 / 10.0 | 81.2 % | -10.0 |"
    assert lines[5] == "| s |  |  | 50.0 / 40.0 |  |  |"
    assert method_matrix(rows[:4]) == []  # one recipe: the seed summary says it all
    with_r64 = method_matrix([*rows, row("q", "qlora-r64", 42, 0.66, "")])
    assert with_r64[2].endswith("| qlora-r64 | lora / full | qlora - lora | qlora-r64 - lora |")
    assert with_r64[4].endswith("| 66.0 | 81.2 % | -10.0 | +1.0 |")


def test_hand_written_notes_survive_a_rewritten_report(tmp_path):
    report = tmp_path / "r.md"
    assert kept_notes(report) == ""
    report.write_text("# table\n| a |\n\n## Reading the table\n\n- a note\n")
    assert kept_notes(report) == "\n## Reading the table\n\n- a note\n"


def test_loss_curves_outlive_their_run_directories(tmp_path):
    """Run directories are scratch: a report redrawn after they are gone still plots earlier curves."""
    import json
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
        {"step": 5, "loss": 2.5}, {"step": 5, "eval_loss": 2.9}, {"step": 10, "loss": 1.5}]) + "\n")
    row = {"recipe": "quickstart", "method": "lora", "seed": 1, "run_dir": str(run)}
    store = tmp_path / "curves.json"
    assert update_curves([row], store) == {"quickstart/lora/1": [[5, 2.5], [10, 1.5]]}
    shutil.rmtree(run)
    other = {**row, "method": "dora", "run_dir": str(tmp_path / "gone")}
    assert update_curves([row, other], store) == {"quickstart/lora/1": [[5, 2.5], [10, 1.5]]}
    assert json.loads(store.read_text()) == {"quickstart/lora/1": [[5, 2.5], [10, 1.5]]}


def test_csv_has_every_rows_columns_and_sweep_means_use_what_was_measured(tmp_path):
    from benchmarks.sweep import mean_lines

    rows = [{"setting": "default", "recipe": "a", "heldout_after": 0.5},
            {"setting": "default", "recipe": "b", "heldout_after": 0.7, "forgetting_points": 12.0},
            {"setting": "r32", "recipe": "a", "heldout_after": 0.4, "forgetting_points": ""}]
    write_csv(tmp_path / "s", rows)
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "setting,recipe,heldout_after,forgetting_points"
    assert mean_lines(rows) == ["- `default`: held-out 0.600 over 2 recipes; forgetting 12.0 points over 1",
                                "- `r32`: held-out 0.400 over 1 recipes (`default` on the same recipes: held-out 0.500 over 1 recipes)"]


def test_sweep_tradeoff_plot_only_with_forgetting_measured(tmp_path):
    from benchmarks.sweep import tradeoff_plot

    rows = [{"setting": "default", "recipe": "a", "heldout_after": 0.5, "forgetting_points": ""}]
    assert not tradeoff_plot(rows, tmp_path / "t.png") and not (tmp_path / "t.png").exists()
    rows.append({"setting": "replay", "recipe": "a", "heldout_after": 0.6, "forgetting_points": 12.1})
    assert tradeoff_plot(rows, tmp_path / "t.png") and (tmp_path / "t.png").stat().st_size > 1000


def test_quant_error_metrics_and_round_trip(tiny_model_dir):
    import torch

    from benchmarks.quant_error import prediction_error, round_trip
    from tests.unit.adapters_fixtures import load_tiny

    torch.manual_seed(0)
    reference = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert prediction_error(reference, reference, mask) == {"kl_per_token": 0.0, "mean_abs_logit_diff": 0.0, "top1_agreement": 1.0}
    shifted = reference.clone()
    shifted[..., 0] += 100.0  # token 0 always wins
    worse = prediction_error(shifted, reference, mask)
    assert worse["kl_per_token"] > 1 and worse["top1_agreement"] < 0.5

    model = load_tiny(tiny_model_dir)
    originals = {n: m.weight.data.clone() for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    round_trip(model, originals, keep=lambda name: name.endswith("down_proj"))
    for name, module in model.named_modules():
        if name in originals:
            same = torch.equal(module.weight.data, originals[name])
            assert same == name.endswith("down_proj"), name
            error = (module.weight.data - originals[name]).norm() / originals[name].norm()
            assert error < 0.35, (name, float(error))  # the same matrix, on a grid:
            blocks = module.weight.data.flatten().view(-1, 64)
            assert same or max(len(block.unique()) for block in blocks) <= 16, name  # 4 bits: 16 values per block


def test_original_base_rows_reuse_the_qlora_run_and_its_original_base_eval(tmp_path, monkeypatch):
    """`qlora@original` evaluates the `qlora` run's adapter on the unquantized weights; it never retrains
    an existing run, and its accuracy/loss come from that evaluation, not from the training summary."""
    import json

    import benchmarks.methods as methods

    run_dir = tmp_path / "quickstart-qlora-seed3"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("train: {seed: 3}\n")
    summary = {"trainable_params": 10, "trainable_share": 0.01, "peak_memory_mb": 1.0, "tokens_per_second": 5.0,
               "train_seconds": 2.0, "eval_loss_after": 1.5, "heldout_accuracy_after": 0.5, "heldout_accuracy_before": 0.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    commands = []

    def fake_run(cmd, timeout=0):
        commands.append(cmd)
        report = {"before": {"heldout_accuracy": 0.1}, "after": {"loss": 1.2, "heldout_accuracy": 0.6, "general_accuracy": 0.9},
                  "forgetting_points": 9.1}
        (run_dir / "eval_original_base.json").write_text(json.dumps(report))

    monkeypatch.setattr(methods, "run", fake_run)
    row = methods.measure("quickstart", "qlora@original", [], tmp_path, seed=3)
    assert len(commands) == 1 and commands[0][-4:] == ["eval", str(run_dir), "--qlora-base", "original"]
    assert row["method"] == "qlora@original" and row["seed"] == 3
    assert (row["heldout_accuracy"], row["heldout_accuracy_base"], row["eval_loss"]) == (0.6, 0.1, 1.2)
    assert row["tokens_per_second"] == 5.0 and row["forgetting_points"] == 9.1


def test_bits_per_weight_counts_block_and_row_scales():
    from benchmarks.quant_error import bits_per_weight
    from peftkit.config.schema import QuantizationConfig

    shapes = [(2, 4), (6, 4)]  # 8 rows, 32 weights
    assert bits_per_weight(QuantizationConfig(bits=8), shapes) == 8 + 32 * 8 / 32
    assert bits_per_weight(QuantizationConfig(bits=4, double_quant=False), shapes) == 4.5  # fp32 absmax per 64
    assert bits_per_weight(QuantizationConfig(bits=4, blocksize=32), shapes) == round(4 + 8 / 32 + 32 / (256 * 32), 3)


def test_rephrase_probe_scores_each_wording(monkeypatch):
    from benchmarks.rephrase_probe import WORDINGS, rephrase_scores
    from peftkit.data.build import HeldoutItem
    from peftkit.evaluate import generation

    def fake_generate(model, tokenizer, conversations, **kwargs):  # right only when asked plainly or briefly
        return [generation.Reply("It is Paris." if c[-1]["content"] in ("Capital of France?", "Capital of France? Answer briefly.")
                                 else "I do not know.", finished=True) for c in conversations]

    monkeypatch.setattr(generation, "generate_replies", fake_generate)
    items = [HeldoutItem(({"role": "user", "content": "Capital of France?"},), ("Paris",)),
             HeldoutItem(({"role": "user", "content": "Capital of Peru?"},), ("Lima",))]
    rows = rephrase_scores(None, None, items, max_new_tokens=8, batch_size=4)
    assert [r["wordings_correct"] for r in rows] == [f"2 / {len(WORDINGS)}", f"0 / {len(WORDINGS)}"]
    assert [rows[0][f"w{j}"] for j in range(len(WORDINGS))] == [1, 0, 1, 0, 0]


def test_subspace_probe_finds_inputs_inside_and_outside_the_fitted_subspace():
    """Inputs the covariance was fitted on lie inside its full-energy subspace; with fewer fitted tokens than
    input dimensions, other inputs keep energy outside it."""
    from benchmarks.subspace_probe import ENERGIES, PROJECTIONS, layer_inputs, residual_shares, subspaces
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama(vocab_size=400).eval()
    fitted = [{"input_ids": list(range(10, 22)), "labels": [-100] * 4 + list(range(14, 22))}]
    other = [{"input_ids": list(range(200, 212)), "labels": [-100] * 4 + list(range(204, 212))}]
    covariances: dict = {}
    layer_inputs(model, fitted, lambda n, x: covariances.__setitem__(n, covariances.get(n, 0) + x.T @ x), answers_only=False)
    assert covariances and {n.rsplit(".", 1)[-1] for n in covariances} == set(PROJECTIONS)
    bases = subspaces(covariances)
    assert all(len(b) == len(ENERGIES) and b[-1].shape[1] <= 12 for b in bases.values())
    inside, outside = residual_shares(model, fitted, bases), residual_shares(model, other, bases)
    assert all(shares[-1] < 1e-3 for shares in inside.values())
    assert all(shares[-1] > 0.05 for shares in outside.values())
    assert all(shares == sorted(shares, reverse=True) for shares in outside.values()), "more energy kept, less outside"


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_scale_probe_moves_along_the_line_from_base_to_tuned(dora, tiny_model_dir):
    """Scale 0 is the base model and scale 1 the tuned one; the scales come back afterwards; DoRA is refused."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from benchmarks.adapter_scale_probe import scaled_lora

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=dora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(1))

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits

    tuned = logits()
    if dora:
        with pytest.raises(SystemExit, match="DoRA"), scaled_lora(model, 0.5):
            pass
        return
    with model.disable_adapter():
        base = logits()
    assert (tuned - base).abs().max() > 1e-3
    with scaled_lora(model, 0.0):
        assert torch.allclose(logits(), base, atol=1e-6)
    with scaled_lora(model, 0.5):
        half = logits()
    assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, tuned, atol=1e-4)
    assert torch.equal(logits(), tuned)


def test_table_report_keeps_todays_earlier_rows_and_writes_csv_and_markdown(tmp_path, monkeypatch, capsys):
    import benchmarks.common as common

    monkeypatch.setattr(common, "results_stem", lambda kind: tmp_path / f"day_{kind}")
    common.write_table_report("probe", [{"run": "a", "scale": 1.0, "x": 1}, {"run": "a", "scale": 0.5, "x": 2}],
                              ("run", "scale"), "# Probe\n\n", ["run", "scale", "x"])
    common.write_table_report("probe", [{"run": "a", "scale": 0.5, "x": 3}], ("run", "scale"), "# Probe\n\n",
                              ["run", "scale", "x"])
    text = (tmp_path / "day_probe.md").read_text()
    assert text.startswith("# Probe\n\n| run | scale | x |") and "| a | 1.0 | 1 |" in text and "| a | 0.5 | 3 |" in text
    assert "| a | 0.5 | 2 |" not in text and (tmp_path / "day_probe.csv").read_text().count("\n") == 3
    assert "# Probe" in capsys.readouterr().out


def test_sharpness_probe_sees_a_sharper_model_and_not_an_untrained_adapter(tiny_model_dir, tiny_tokenizer):
    """An adapter that changes nothing measures as the base; doubling the output logits lowers the entropy
    and widens the margin along the same answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from benchmarks.sharpness_probe import answer_sharpness

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    conversations = [[{"role": "user", "content": "where is the library"}], [{"role": "user", "content": "one two"}]]
    answers = ["the library opens at nine", "three four five"]
    entropy, margin, tokens = answer_sharpness(base, tiny_tokenizer, conversations, answers)
    assert tokens == sum(len(tiny_tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    assert entropy > 0 and margin >= 0
    untouched = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval(),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: the base model
    same = answer_sharpness(untouched, tiny_tokenizer, conversations, answers)
    assert same[0] == pytest.approx(entropy, abs=1e-5) and same[1] == pytest.approx(margin, abs=1e-5)
    with torch.no_grad():
        base.lm_head.weight.mul_(2.0)
    sharper, wider, _ = answer_sharpness(base, tiny_tokenizer, conversations, answers)
    assert sharper < entropy and wider > margin


def _tiny_runs(tiny_recipe, tmp_path, seeds):
    from peftkit.config import recipe_from_dict
    from peftkit.train.run import train

    runs = []
    for seed in seeds:
        recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "system_prompt": "be brief."},
                  "train": {**tiny_recipe["train"], "seed": seed, "max_steps": 2},
                  "eval": {"before": False, "max_new_tokens": 4}, "output_dir": str(tmp_path / f"seed{seed}")}
        runs.append(train(recipe_from_dict(recipe)).run_dir)
    return runs


def test_seed_soup_evaluates_the_average_of_its_members_end_to_end(tiny_recipe, tmp_path):
    from benchmarks.seed_soup import soup_row
    from peftkit.cli import main

    runs = _tiny_runs(tiny_recipe, tmp_path, (0, 1))
    with pytest.raises(SystemExit, match="has no eval.json"):
        soup_row("tiny", runs)
    for run_dir in runs:
        assert main(["eval", str(run_dir)]) == 0
    row = soup_row("tiny", runs)
    assert row["group"] == "tiny" and row["members"] == "seed0 seed1"
    assert len(row["member_forgetting"].split(" / ")) == 2
    assert 0 <= row["soup_heldout"] <= 100 and 0 <= row["soup_check_accuracy"] <= 100
    assert -100 <= row["soup_forgetting"] <= 100


def test_adapter_scale_probe_rows_start_at_the_base_model_end_to_end(tiny_recipe, tmp_path):
    from benchmarks.adapter_scale_probe import probe_rows

    (run_dir,) = _tiny_runs(tiny_recipe, tmp_path, (0,))
    rows = probe_rows(run_dir, [1.0, 0.5])
    assert [r["scale"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["forgetting"] == 0 and rows[0]["forgetting_in_role"] == 0, "scale 0 is the base model itself"
    assert all(r["run"] == "seed0" and r["heldout"] is not None for r in rows)


def test_noise_floor_counts_losses_overall_and_among_confident_answers_and_restores_the_weights(
        tiny_model_dir, tiny_tokenizer, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks import noise_floor
    from peftkit.data.build import HeldoutItem
    from peftkit.evaluate import generation, margins

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = {}

    def answers(model, tokenizer, items, *, label, **kwargs):  # every perturbation loses q0 and q1; q2 is never known
        seen[label] = float(next(model.parameters()).sum())
        right = [True, True, False] if label == "base model" else [False, False, False]
        return [generation.Reply("paris" if ok else "rome", True, (5,)) for ok in right]

    monkeypatch.setattr(generation, "answer_items", answers)
    monkeypatch.setattr(margins, "decision_margins", lambda model, tok, items, replies: [2.0, 0.05, None])
    items = [HeldoutItem(({"role": "user", "content": f"q{i}"},), ("paris",), None) for i in range(3)]
    rows, margin_rows = noise_floor.floor_rows(model, tiny_tokenizer, items, max_new_tokens=4, batch_size=2,
                                               seeds=[0, 1], set_name="tiny")
    assert [(r["perturbation"], r["seed"]) for r in rows] == [
        ("bf16 weights", ""), ("fp16 weights", ""), *((name, s) for name in ("noise 0.1 %", "noise 0.3 %", "noise 1 %")
                                                      for s in (0, 1))]
    assert all(r["known"] == 2 and r["lost"] == 2 and r["forgetting"] == 100.0 for r in rows)
    assert all(r["confident"] == 1 and r["lost_confident"] == 1 and r["forgetting_confident"] == 100.0 for r in rows)
    assert rows[0]["lost_questions (base margin)"] == "q0 (2.00); q1 (0.05)"
    assert [m["confident"] for m in margin_rows] == [True, False, False]
    assert seen["noise 1 %"] != seen["base model"], "the perturbed model is the one asked"
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters()), "the base weights come back"


def test_the_architecture_matrix_builds_each_family_and_a_valid_recipe(tmp_path, tiny_tokenizer):
    """Every family of `benchmarks.architectures` builds from its config with the shared tokenizer, and the recipe
    it trains validates against that model (a failure here would show up as a misleading `refused` row)."""
    from transformers import AutoConfig

    from benchmarks.architectures import FAMILIES, build_family, recipe
    from peftkit.config import load_recipe

    for name in ("gemma3-vision", "gpt2", "llama-3.1-rope"):
        model_dir = build_family(name, tmp_path, tiny_tokenizer)
        assert AutoConfig.from_pretrained(model_dir).model_type == FAMILIES[name][0]
        path = tmp_path / f"{name}.yaml"
        path.write_text(recipe(name, model_dir, tmp_path / "runs" / name))
        loaded = load_recipe(path)
        assert loaded.model.name == str(model_dir) and loaded.train.max_steps == 3


def test_gpu_checks_skip_what_does_not_fit_record_failures_and_report_what_ran(tmp_path, monkeypatch):
    from benchmarks import gpu

    def lora(ctx, timeout):
        (ctx.logs / "lora.metrics.jsonl").write_text('{"step": 5, "loss": 2.0}\n{"step": 10, "loss": 1.5}\n')
        return {"method": "lora", "trainable_share": 0.035, "heldout_accuracy_before": 0.0, "heldout_accuracy_after": 0.6,
                "eval_loss_after": 1.1, "tokens_per_second": 900.0, "train_seconds": 20.0, "peak_memory_mb": 1500.0}

    def broken(ctx, timeout):
        raise gpu.StepFailed("exit 1: CUDA error: out of memory")

    def speed(variant, rate):
        return lambda ctx, timeout: {"variant": variant, "train_seconds": 10.0, "supervised_tokens_per_second": rate,
                                     "eval_loss": 1.2, "peak_gpu_mb": 900.0, "dtype": "bfloat16"}

    steps = {"lora": (1, lora), "zero2": (1, broken), "speed-reference": (1, speed("reference", 100.0)),
             "speed-peftkit": (1, speed("peftkit", 250.0)), "full": (10_000, lora)}
    monkeypatch.setattr(gpu, "STEPS", steps)
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir(), results.mkdir()
    records = gpu.run_steps(gpu.Context(out, results, []), list(steps), budget=600)
    assert [r["status"] for r in records] == ["ok", "failed", "ok", "ok", "skipped"]
    assert "out of memory" in records[1]["error"] and "estimate 10000 s" in records[4]["reason"]
    assert len((results / gpu.RESULTS_FILE).read_text().splitlines()) == 5  # a line per step, written as it ends

    stem = tmp_path / "report" / "2026-01-01_gpu_gpu"
    text = gpu.report(results, stem).read_text()  # from the results folder alone: logs come out of logs.tar.gz
    assert "| lora | 3.500 | 0.0 | 60.0 | 1.1 |" in text
    assert "| peftkit | 10.0 | 250.0 | 2.5 |" in text  # 2.5x the reference
    assert "| zero2 | failed |" in text and "| full | skipped |" in text
    assert (tmp_path / "report" / "2026-01-01_gpu_gpu_loss.png").stat().st_size > 0


def test_the_architectures_table_says_what_llama_cpp_made_of_each_gguf(tmp_path):
    from benchmarks.architectures import in_llama_cpp

    path = tmp_path / "verification.json"
    assert in_llama_cpp(path) == "-"  # no GGUF export (refused, or training failed)
    path.write_text(json.dumps({"llama_cpp": {"ran": False, "why": "llama-cpp-python is not installed"}}))
    assert in_llama_cpp(path) == "not run: llama-cpp-python is not installed"
    path.write_text(json.dumps({"llama_cpp": {"ran": True, "passed": True, "max_abs_diff": 0.02, "greedy_agreement": 1.0,
                                              "max_abs_reference_logit": 20.0, "tokenizer_match": False}}))
    assert in_llama_cpp(path) == "ok: max diff 1.0e-03 of the largest logit, agreement 100%, tokenization differs"


def test_bucket_memory_steps_the_same_batch_in_each_variant(tiny_recipe, tmp_path):
    """The memory comparison is only fair if every variant trains the same rows to the same loss."""
    import yaml

    from benchmarks.bucket_memory import VARIANTS, measure, parse_lengths

    assert parse_lengths(["40x2", "10x3", "7"]) == [40, 40, 10, 10, 10, 7]
    with pytest.raises(SystemExit, match="LENGTHxCOUNT"):
        parse_lengths(["40*2"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    rows = {v: measure(str(recipe), v, [40, 40, 10, 10]) for v in VARIANTS}
    assert {v: (r["buckets"], r["padded_tokens"]) for v, r in rows.items()} == {
        "buckets": (2, 100), "buckets-one-backward": (2, 100), "padded": (1, 160)}
    losses = [r["loss"] for r in rows.values()]
    assert losses[0] > 0 and max(losses) - min(losses) < 1e-3
    assert all(r["peak_rss_mb"] >= r["loaded_rss_mb"] > 0 for r in rows.values())


def test_bucket_memory_reports_the_median_peak_and_its_range():
    from benchmarks.bucket_memory import summarise

    runs = [{"variant": "padded", "loaded_rss_mb": l, "peak_rss_mb": p, "peak_gpu_mb": None}
            for l, p in [(600.0, 10100.0), (610.0, 9000.0), (620.0, 10500.0)]]
    row = summarise(runs)
    assert (row["peak_rss_mb"], row["peak_rss_mb_range"], row["repeats"], row["loaded_rss_mb"]) == (
        10100.0, "9000.0-10500.0", 3, 610.0)


def test_shared_cpu_runs_two_overlapping_trainings_and_reads_their_summaries(tmp_path, tiny_model_dir):
    from benchmarks.shared_cpu import run_pair
    from peftkit.utils.threads import usable_cpus
    from tests.train_procs import tiny_recipe_file

    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train={"num_threads": None})
    rows = run_pair(str(recipe), steps=2, offset=0.0, variant="all-cores", folder=tmp_path)
    assert [row["run"] for row in rows] == ["A", "B"]
    assert all(row["threads"] == usable_cpus() and row["train_seconds"] > 0 for row in rows)


def test_shared_cpu_says_why_a_run_failed_and_leaves_no_training_behind(tmp_path):
    from benchmarks.shared_cpu import run_pair

    with pytest.raises(SystemExit, match="run all-cores-A failed:\n.*does not exist"):
        run_pair(str(tmp_path / "missing.yaml"), steps=1, offset=0.0, variant="all-cores", folder=tmp_path)


def test_speed_rounds_rotate_the_variant_order_and_pair_each_ratio_with_its_own_rounds_reference(tmp_path, monkeypatch):
    from benchmarks import speed

    assert speed.run_order(["reference", "peftkit"], [42, 1, 2]) == [
        ("reference", 42), ("peftkit", 42), ("peftkit", 1), ("reference", 1), ("reference", 2), ("peftkit", 2)]
    assert speed.run_order(["reference", "peftkit"], None) == [("reference", None), ("peftkit", None)]

    rates = {("reference", 42): 40.0, ("peftkit", 42): 60.0, ("reference", 1): 20.0, ("peftkit", 1): 36.0,
             ("reference", 2): 40.0, ("peftkit", 2): 64.0}
    losses = {"reference": 1.10, "peftkit": 1.11}
    ran = []

    def fake_run(recipe, variant, epochs, seed=None):
        ran.append((variant, seed))
        return {"variant": variant, "seed": seed, "train_seconds": 10.0, "supervised_tokens_per_second": rates[variant, seed],
                "supervised_tokens": 100, "input_tokens": 400, "padded_tokens": 500, "computed_positions": 450,
                "eval_loss": losses[variant] + seed / 1000}

    monkeypatch.setattr(speed, "run_variant", fake_run)
    monkeypatch.setattr(speed, "matmul_peak_gflops", lambda: 100.0)
    monkeypatch.setattr(speed, "lora_flops_per_token", lambda recipe: (1e6, 1e5))
    monkeypatch.setattr(speed, "results_stem", lambda kind: tmp_path / f"day_{kind}")
    monkeypatch.setattr(sys, "argv", ["speed", "--variants", "reference", "peftkit", "--seeds", "42", "1", "2"])
    speed.main()
    assert ran == speed.run_order(["reference", "peftkit"], [42, 1, 2])
    text = (tmp_path / "day_speed.md").read_text()
    # paired within each round: 1.5x, 1.8x, 1.6x (the unpaired medians would give 60 / 40 = 1.5x)
    assert "| peftkit | 3 | 60.0 (36.0 to 64.0) | 1.60 (1.50 to 1.80) | 1.1120 (1.1110 to 1.1520) | 0.0100 |" in text
    assert "| reference | 3 | 40.0 (20.0 to 40.0) | 1.00 | 1.1020 (1.1010 to 1.1420) | 0.0000 |" in text
    assert "--seeds 42 1 2`" in text

    # without a reference run, each round's ratios are against the first variant named, of the same round
    monkeypatch.setattr(sys, "argv", ["speed", "--variants", "peftkit", "peftkit-no-bucket", "--seeds", "42", "1"])
    rates.update({("peftkit", 1): 30.0, ("peftkit-no-bucket", 42): 30.0, ("peftkit-no-bucket", 1): 45.0})  # 0.5x, 1.5x
    losses["peftkit-no-bucket"] = 1.12
    speed.main()
    text = (tmp_path / "day_speed.md").read_text()
    assert "| peftkit-no-bucket | 2 | 37.5 (30.0 to 45.0) | 1.00 (0.50 to 1.50) |" in text
