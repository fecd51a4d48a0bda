"""Merging adapters into the base: numerics per method, QLoRA targets, weighted mixes, HF layout, safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig

from tests.conftest import build_tiny_tokenizer
from tests.unit.export_fixtures import adapter_logits, build_llama_dir, export_recipe, llama64_dir, make_run, token_ids  # noqa: F401
from peftkit.cli import main
from peftkit.errors import ExportError, RunDirError
from peftkit.export.hf import export_combined, export_hf
from peftkit.export.merge import combine_runs, merge_run

torch.set_num_threads(1)

METHODS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], use_dora=True,
                       task_type="CAUSAL_LM"),
    "rslora": LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True, task_type="CAUSAL_LM"),
    "ia3": IA3Config(task_type="CAUSAL_LM"),
}


def _merged_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_equals_adapter_logits_in_float32(method, export_recipe, tmp_path):
    run = make_run(tmp_path / method, export_recipe, METHODS[method])
    merged = merge_run(run)
    ids = token_ids()
    expected = adapter_logits(run, ids)
    assert (expected - _merged_logits(merged.model, ids)).abs().max() < 1e-5
    assert merged.merge_max_abs_diff < 1e-4  # longer chat prompts, logits up to ~10: float32 rounding
    # the adapter really changes the model, so the check above is not trivially true
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(export_recipe["model"]["name"]), dtype=torch.float32)
    assert (expected - _merged_logits(plain, ids)).abs().max() > 1e-2
    assert not any("lora_" in n or "ia3_" in n for n, _ in merged.model.named_parameters())


def test_merge_writes_verified_sharded_hf_directory(export_recipe, tmp_path):
    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"])
    result = export_hf(run, shard_size=60_000)
    out = run / "merged"
    assert result.path == out
    names = set(result.files)
    shards = sorted(n for n in names if n.startswith("model-") and n.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for name in ["model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "README.md", "verification.json"]:
        assert name in names, name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] and report["kind"] == "hf"
    assert report["max_abs_diff"] < 1e-4 and report["greedy_agreement"] == 1.0
    assert report["tokenizer_match"] and report["template_match"]
    assert report["prompts"] == 5  # 4 fixed prompts + the recipe's sample prompt
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "max abs logit diff" in card
    assert not list(run.glob(".tmp-*"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = token_ids()
    assert (_merged_logits(reloaded, ids) - adapter_logits(run, ids)).abs().max() < 1e-5
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    # a client that sends no system message gets the recipe's, as in training (not the base template's default)
    assert prompt.startswith(f"<|im_start|>system\n{export_recipe['data']['system_prompt']}<|im_end|>\n")
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert "| default system prompt | \"You are the library help desk.\"" in card


def test_half_precision_merge_writes_that_dtype(export_recipe, tmp_path):
    from safetensors import safe_open

    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"])
    export_hf(run, tmp_path / "bf16", dtype="bfloat16", check=False)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}


def test_qlora_merge_uses_dequantized_base_and_reports_both_errors(export_recipe, tmp_path, capsys):
    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True}
    run = make_run(tmp_path / "qrun", export_recipe, METHODS["lora"], quantization=quant, scale=0.05)
    merged = merge_run(run)
    q = merged.qlora
    assert q["base"] == "dequantized"
    assert q["dequantized_max_abs_diff"] < 1e-4, q  # reproduces the adapter on the 4-bit base
    assert q["original_max_abs_diff"] > 100 * q["dequantized_max_abs_diff"], q
    assert merged.merge_max_abs_diff < 1e-4

    original = merge_run(run, qlora_base="original")
    ids = token_ids()
    assert (_merged_logits(original.model, ids) - adapter_logits(run, ids)).abs().max() < 1e-5
    assert original.qlora["original_max_abs_diff"] == pytest.approx(q["original_max_abs_diff"], rel=1e-3)

    assert main(["merge", str(run), "--no-verify", "--out", str(tmp_path / "m")]) == 0
    printed = capsys.readouterr().out
    assert "dequantized 4-bit base" in printed and "original weights" in printed
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())


def test_an_8bit_lora_merge_verifies_against_the_dequantized_weights(export_recipe, tmp_path):
    """LLM.int8 layers quantize their inputs too, which no float32 export reproduces: the merged model must equal
    the adapter on the dequantized 8-bit weights, and the int8 gap is reported, not failed on."""
    run = make_run(tmp_path / "q8", export_recipe, METHODS["lora"], quantization={"bits": 8}, scale=0.05)
    result = export_hf(run, tmp_path / "merged")
    report = json.loads((tmp_path / "merged" / "verification.json").read_text())
    assert report["passed"] and report["max_abs_diff"] < 1e-4, report
    assert "dequantized 8-bit base" in report["reference"] or "dequantized 8-bit base" in json.dumps(report)
    assert result.qlora["dequantized_max_abs_diff"] > report["max_abs_diff"]  # the int8 activation gap, reported
    assert "| error if merged into dequantized 8-bit weights |" in (tmp_path / "merged" / "README.md").read_text()


def test_qlora_merge_reloads_the_base_with_the_trained_blocksize(export_recipe, tmp_path):
    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True, "blocksize": 32}
    run = make_run(tmp_path / "qrun", export_recipe, METHODS["lora"], quantization=quant, scale=0.05)
    q = merge_run(run).qlora
    assert q["dequantized_max_abs_diff"] < 1e-4, q


def test_qlora_merge_of_a_gpt2_conv1d_model_reloads_as_gpt2(export_recipe, tmp_path):
    """bitsandbytes holds GPT-2's Conv1D layers as transposed Linear4bit: the merged model must get Conv1D back."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM")
    run = make_run(tmp_path / "qrun", export_recipe, lora, model_dir=tmp_path / "gpt2", quantization=quant, scale=0.05)
    result = export_hf(run, tmp_path / "merged")  # verified in a fresh process against the adapter on the 4-bit base
    assert result.verification["passed"], result.verification
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert isinstance(reloaded.transformer.h[0].attn.c_attn, Conv1D)
    assert reloaded.transformer.h[0].attn.c_attn.weight.shape == (64, 192)  # (in, out), as GPT-2 stores it


def test_weighted_combination_is_the_weighted_sum_of_updates(export_recipe, tmp_path):
    run_a = make_run(tmp_path / "a", export_recipe, METHODS["lora"], seed=1)
    run_b = make_run(tmp_path / "b", export_recipe, METHODS["rslora"], seed=2)  # other rank, rsLoRA scaling
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(export_recipe["model"]["name"]), dtype=torch.float32).state_dict()
    merged_a = merge_run(run_a).model.state_dict()
    merged_b = merge_run(run_b).model.state_dict()
    combined = combine_runs([run_a, run_b], [0.7, 0.3])
    assert combined.combination["combination"] == "cat"
    state = combined.model.state_dict()
    for key in ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]:
        expected = plain[key] + 0.7 * (merged_a[key] - plain[key]) + 0.3 * (merged_b[key] - plain[key])
        assert (state[key] - expected).abs().max() < 1e-5, key
        assert (merged_a[key] - plain[key]).abs().max() > 1e-3  # the updates are real
    assert combined.merge_max_abs_diff < 1e-4

    out = tmp_path / "mix"
    assert main(["merge", "--adapters", str(run_a), str(run_b), "--weights", "0.7", "0.3", "--out", str(out),
                 "--no-verify"]) == 0
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ExportError, match="one weight per adapter"):
        export_combined([run_a, run_b], tmp_path / "x", weights=[1.0])
    with pytest.raises(ExportError, match="--weights must be finite numbers, got 1.0 nan"):
        combine_runs([run_a, run_b], [1.0, float("nan")])
    head = make_run(tmp_path / "head", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                 modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    with pytest.raises(ExportError, match=r"also trained whole modules \(lm_head, adapter.modules_to_save\)"):
        combine_runs([run_a, head], [0.5, 0.5])


def test_prefix_tuning_merge_is_refused_with_exit_2(export_recipe, tmp_path, capsys):
    run = make_run(tmp_path / "prefix", export_recipe, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    assert main(["merge", str(run)]) == 2
    err = capsys.readouterr().err
    assert "PREFIX_TUNING" in err and f"peftkit export {run.resolve()} --format adapter" in err
    assert "Traceback" not in err
    assert main(["export", str(run), "--format", "gguf"]) == 2
    assert not (run / "merged").exists()


def test_adapter_base_mismatch_is_reported_before_loading_weights(export_recipe, tiny_model_dir, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"])  # trained on hidden 64

    def no_weights(*args, **kwargs):
        raise AssertionError("weights must not be loaded before the mismatch check")

    monkeypatch.setattr("peftkit.models.load_model", no_weights)
    with pytest.raises(ExportError) as info:
        merge_run(run, base=str(tiny_model_dir))  # hidden 32
    message = str(info.value)
    assert "does not fit the base model" in message and "hidden_size: adapter's base has 64, this base has 32" in message
    assert "lora_A.weight` has shape [4, 128], but the base's Linear (in 64, out 32) needs [4, 64]" in message

    other_vocab = build_llama_dir(tmp_path / "vocab512", build_tiny_tokenizer(), vocab_size=512)
    with pytest.raises(ExportError, match="vocab_size: adapter's base has 400, this base has 512"):
        merge_run(run, base=str(other_vocab))


def test_a_base_folder_replaced_since_training_is_named_as_the_run_recorded_it(export_recipe, tmp_path):
    """The adapter names its base by folder; when that folder now holds another model, the error must still say what
    the adapter was trained on (the run's summary.json `base_config`), and each missing module once."""
    import shutil

    base = build_llama_dir(tmp_path / "base", build_tiny_tokenizer())
    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"], model_dir=base)
    (run / "summary.json").write_text(json.dumps({"base_config": {"model_type": "llama", "hidden_size": 64,
                                                                  "num_hidden_layers": 2, "vocab_size": 400}}))
    shutil.rmtree(base)
    build_llama_dir(base, build_tiny_tokenizer(), hidden=96, layers=1)
    with pytest.raises(ExportError) as info:
        merge_run(run)
    message = str(info.value)
    assert f"It was trained on {base} (llama, hidden 64, layers 2, vocab 400)" in message
    assert message.count("`model.layers.1.self_attn.q_proj`") <= 1


def test_existing_output_needs_force_and_run_files_are_protected(export_recipe, tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    monkeypatch.setattr("peftkit.export.hf.shipped_model", lambda *a, **k: pytest.fail("must refuse before merging"))
    assert main(["merge", str(run), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").is_file()
    with pytest.raises(ExportError, match="refusing to write"):
        export_hf(run, run / "adapter", force=True)
    monkeypatch.undo()
    with pytest.raises(ExportError, match="never deletes a folder it did not write"):
        export_hf(run, out, force=True, check=False)  # keep.txt is not peftkit's
    assert (out / "keep.txt").is_file()
    (out / "keep.txt").unlink()
    export_hf(run, out, force=True, check=False)  # an empty folder, then peftkit's own export, are replaced
    export_hf(run, out, force=True, check=False)
    assert (out / "model.safetensors").is_file()


def test_run_without_adapter_is_a_clear_error(export_recipe, tmp_path, capsys):
    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"])
    for path in (run / "adapter").iterdir():
        path.unlink()
    (run / "adapter").rmdir()
    with pytest.raises(RunDirError, match="no trained adapter"):
        merge_run(run)
    assert main(["export", str(run), "--format", "adapter"]) == 2
    assert "no trained adapter" in capsys.readouterr().err


def test_broken_export_fails_verification_and_leaves_nothing(export_recipe, tmp_path, monkeypatch):
    import peftkit.export.hf as hf

    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"])
    original = hf.save_model_dir

    def corrupting(model, tokenizer, folder, **kwargs):
        original(model, tokenizer, folder, **kwargs)
        config = json.loads((folder / "config.json").read_text())
        config["rms_norm_eps"] = 0.5  # a silently wrong config: loads fine, computes something else
        (folder / "config.json").write_text(json.dumps(config))

    monkeypatch.setattr(hf, "save_model_dir", corrupting)
    with pytest.raises(ExportError, match="verification of the merged model failed: max abs logit diff"):
        export_hf(run)
    assert not (run / "merged").exists()
    failed = json.loads((run / "merged.verification-failed.json").read_text())
    assert failed["passed"] is False and failed["max_abs_diff"] > failed["tolerance"]


def test_a_merge_that_lost_its_adapter_is_refused_at_every_export_dtype(export_recipe, tmp_path, monkeypatch):
    """The written files are checked at their own precision: in bfloat16 (10 % of the largest logit, no greedy
    agreement floor) a merge that had dropped the adapter passed. The float32 merge is judged before writing."""
    import peftkit.export.merge as merge_module

    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"], scale=0.008)  # a small update, within bf16's
    monkeypatch.setattr(merge_module, "merged_model", lambda peft_model, **kwargs: peft_model.unload())
    for dtype in ("bfloat16", "float32"):
        with pytest.raises(ExportError, match=r"the merged model does not reproduce .* \(float32, in memory\)"):
            export_hf(run, tmp_path / dtype, dtype=dtype)
        assert not (tmp_path / dtype).exists()
    export_hf(run, tmp_path / "unchecked", dtype="bfloat16", check=False)  # --no-verify writes it anyway


@pytest.mark.parametrize("adapter", [
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], task_type="CAUSAL_LM"),
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")])
def test_a_merge_that_unties_the_head_says_so_without_pefts_advice(export_recipe, tmp_path, caplog, adapter):
    """peft's warnings told the user to clone and untie the weights by hand, which the merge does itself."""
    import warnings

    run = make_run(tmp_path / "run", export_recipe, adapter)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO", logger="peftkit"):
        warnings.simplefilter("always")
        merged = merge_run(run)
    assert merged.model.config.tie_word_embeddings is False
    assert not [str(w.message) for w in caught if "tie_word_embeddings" in str(w.message)
                or "no longer tied" in str(w.message)]
    assert "tie_word_embeddings: false" in caplog.text


def test_merged_exports_keep_the_base_models_dtype_by_default():
    from types import SimpleNamespace

    from peftkit.errors import ExportError
    from peftkit.export.hf import export_dtype

    assert export_dtype("auto", SimpleNamespace(dtype="bfloat16")) == "bfloat16"  # not twice the size in float32
    assert export_dtype("auto", SimpleNamespace(dtype=None)) == "float32"
    assert export_dtype("auto", None) == "float32"
    assert export_dtype("float16", SimpleNamespace(dtype="bfloat16")) == "float16"  # an explicit --dtype wins
    with pytest.raises(ExportError, match="--dtype"):
        export_dtype("fp8", None)


def test_a_damaged_or_mismatched_adapter_is_one_message_before_any_model_loads(export_recipe, tmp_path, monkeypatch):
    from peftkit import runs

    run = make_run(tmp_path / "run", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               task_type="CAUSAL_LM"))
    weights = run / "adapter" / "adapter_model.safetensors"
    intact = weights.read_bytes()
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())

    def no_model(*args, **kwargs):
        raise AssertionError("the base model must not load for a damaged adapter")

    monkeypatch.setattr(runs, "load_base_model", no_model)
    weights.write_bytes(intact[:1000])  # a copy cut short
    with pytest.raises(ExportError, match="is damaged"):
        merge_run(run)
    with pytest.raises(RunDirError, match="is damaged"):
        runs.load_run(run)  # chat / eval
    weights.write_bytes(intact)
    config_path.write_text(json.dumps({**config, "r": 8}))  # a config from another run
    with pytest.raises(ExportError, match="says r=8, but the weights have rank 4"):
        merge_run(run)
    with pytest.raises(RunDirError, match="says r=8"):
        runs.load_run(run)


def test_merging_onto_other_weights_of_the_same_shape_is_warned(tiny_recipe, tmp_path, caplog):
    """A fine-tune of the base, or a base edited in place, loads into the same shapes: nothing else notices."""
    import shutil

    from safetensors.torch import load_file, save_file

    from peftkit.config import recipe_from_dict
    from peftkit.train.run import train

    run = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1},
                                  "eval": {"before": False}})).run_dir
    summary_path = run / "summary.json"
    assert json.loads(summary_path.read_text())["base_fingerprint"].startswith("v2-")
    assert json.loads(summary_path.read_text())["base_config"] == {"model_type": "llama", "hidden_size": 32,
                                                                   "num_hidden_layers": 2, "vocab_size": 400}
    assert not merge_run(run).primary.other_base
    assert "is not the one" not in caplog.text
    original = load_file(str(Path(tiny_recipe["model"]["name"]) / "model.safetensors"))
    norm = next(k for k in original if k.endswith("norm.weight"))
    for n, (key, factor) in enumerate([(norm, 1.001), ("model.layers.1.mlp.down_proj.weight", 1.001)]):
        other = tmp_path / f"other-base-{n}"  # a fine-tune's small change to a norm; a LoRA merged into the MLP
        shutil.copytree(tiny_recipe["model"]["name"], other)
        save_file({**original, key: original[key] * factor}, str(other / "model.safetensors"), metadata={"format": "pt"})
        caplog.clear()
        merged = merge_run(run, base=str(other))
        assert f"The base model {other} is not the one" in caplog.text, key
        assert merged.primary.other_base, "the merged model card says so (export_hf)"
    from peftkit.export.card import OTHER_BASE_NOTE, merged_card

    card = merged_card(merged, dtype="float32", verification=None, out=tmp_path / "merged")
    assert f"| base model | `{other}`{OTHER_BASE_NOTE} |" in card
    # A run recorded with the first fingerprint (norms and embeddings only) is compared in that version.
    from peftkit.models.fingerprint import files_fingerprint

    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "base_fingerprint": files_fingerprint(tiny_recipe["model"]["name"], 1)}))
    caplog.clear()
    merge_run(run)
    assert "is not the one" not in caplog.text


def test_pickled_bases_get_a_fingerprint_of_their_bytes(tiny_recipe, tmp_path, caplog):
    """`.bin` weights are not unpickled for it; sampled blocks of their bytes still tell an edited base apart."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from peftkit.models import resolve_model_ref
    from peftkit.models.fingerprint import files_fingerprint, warn_if_other_base

    def other_base(path):
        return resolve_model_ref(str(path), allow_pickle=True)

    weights = load_file(str(Path(tiny_recipe["model"]["name"]) / "model.safetensors"))
    bases = []
    for n, factor in enumerate([1.0, 1.0, 1.001]):
        base = tmp_path / f"pickled-{n}"
        shutil.copytree(tiny_recipe["model"]["name"], base)
        (base / "model.safetensors").unlink()
        edited = {**weights, "model.layers.1.mlp.down_proj.weight": weights["model.layers.1.mlp.down_proj.weight"] * factor}
        torch.save(edited, base / "pytorch_model.bin")
        bases.append(base)
    prints = [files_fingerprint(base) for base in bases]
    assert prints[0].startswith("bin-") and prints[0] == prints[1] != prints[2]
    assert files_fingerprint(bases[0], 1) is None, "version 1 never read .bin files: nothing to compare with"
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"base_fingerprint": prints[0]}))
    assert not warn_if_other_base(run, other_base(bases[1]), "same")
    assert warn_if_other_base(run, other_base(bases[2]), "edited") and "The base model edited is not the one" in caplog.text
    assert not warn_if_other_base(run, other_base(tiny_recipe["model"]["name"]), "safetensors"), "kinds not compared"


def test_a_model_with_its_own_code_merges_and_verifies_when_the_recipe_trusts_it(export_recipe, llama64_dir, tmp_path):
    """Verification reloaded the merged model without trust_remote_code, so every merge of such a model failed."""
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(llama64_dir, remote)
    (remote / "configuration_mine.py").write_text(
        "from transformers import LlamaConfig\n\nclass MyConfig(LlamaConfig):\n    model_type = 'my-own-llama'\n")
    (remote / "modeling_mine.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_mine import MyConfig\n\n"
        "class MyModel(LlamaForCausalLM):\n    config_class = MyConfig\n")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="my-own-llama", architectures=["MyModel"],
                  auto_map={"AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "modeling_mine.MyModel"})
    (remote / "config.json").write_text(json.dumps(config))
    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"])  # trained on the same weights
    import yaml

    recorded = yaml.safe_load((run / "recipe.yaml").read_text())
    recorded["model"] = {**recorded["model"], "name": str(remote), "trust_remote_code": True}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(remote)}))
    result = export_hf(run)
    assert result.verification["passed"], result.verification


def test_a_missing_base_and_a_qlora_run_without_bitsandbytes_name_the_flags_that_help(export_recipe, tmp_path, monkeypatch):
    import sys

    from peftkit.errors import MissingDependencyError, ModelNotFoundError
    from peftkit.export.merge import resolve_run
    from peftkit.runs import load_run

    run = make_run(tmp_path / "q", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                             task_type="CAUSAL_LM"), quantization={"bits": 4})
    with pytest.raises(ModelNotFoundError) as missing:
        resolve_run(run, str(tmp_path / "no-such-base"))
    assert str(missing.value).startswith(f"--base {tmp_path / 'no-such-base'}: ") and "model.name" not in str(missing.value)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(MissingDependencyError, match=r"trained on a 4-bit base.*pip install bitsandbytes.*--qlora-base original"):
        load_run(run)


def test_combinations_peft_would_get_wrong_are_refused_before_loading(export_recipe, tmp_path, monkeypatch):
    """peft's add_weighted_adapter copies the first adapter's layer placement to the combination: a run on other
    layers lost its updates there while the verification (against that same combination) passed."""
    from transformers import AutoTokenizer

    def lora(**kwargs):
        return LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **kwargs)

    everywhere = make_run(tmp_path / "all", export_recipe, lora(target_modules=["q_proj", "v_proj"]))
    layer1 = make_run(tmp_path / "l1", export_recipe, lora(target_modules=["q_proj", "v_proj"], layers_to_transform=1))
    regex = make_run(tmp_path / "rx", export_recipe, lora(target_modules=r".*\.(q_proj|v_proj)"))
    plain = make_run(tmp_path / "plain", export_recipe, METHODS["lora"])
    tokenizer = AutoTokenizer.from_pretrained(plain / "tokenizer")
    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(plain / "tokenizer")
    monkeypatch.setattr("peftkit.export.merge._load_base", lambda *a, **k: pytest.fail("refuse before loading"))
    for runs, message in [([layer1, everywhere], r"place their adapters differently \(adapter.layers: \[1\] against all"),
                          ([everywhere, layer1], r"adapter.layers: all against \[1\]"),
                          ([everywhere, regex], "one a regular expression, the other a list of names"),
                          ([everywhere, plain], "trained with different chat templates")]:
        with pytest.raises(ExportError, match=message):
            combine_runs(runs, [0.5, 0.5])
    monkeypatch.undo()
    # Runs that differ only in their system prompt combine (with a warning): their templates are the same.
    other_prompt = make_run(tmp_path / "sp", {**export_recipe, "data": {**export_recipe["data"],
                                                                      "system_prompt": "You are a pirate."}},
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert combine_runs([everywhere, other_prompt], [0.5, 0.5]).combination
    # Placements saved in another order (peft saves exclude_modules from a set) are the same placement.
    for run, order in ((everywhere, ["k_proj", "o_proj"]), (other_prompt, ["o_proj", "k_proj"])):
        config = run / "adapter" / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "exclude_modules": order}))
    from peftkit.export.merge import _check_same_placement, resolve_run

    _check_same_placement([resolve_run(everywhere), resolve_run(other_prompt)])
    every_layer = make_run(tmp_path / "l01", export_recipe, lora(target_modules=["q_proj", "v_proj"],
                                                                 layers_to_transform=[1, 0]))  # the tiny model's two
    (everywhere / "adapter" / "adapter_config.json").write_text(json.dumps({**json.loads(
        (everywhere / "adapter" / "adapter_config.json").read_text()), "exclude_modules": None}))
    _check_same_placement([resolve_run(everywhere), resolve_run(every_layer)])


def test_a_combined_model_card_names_every_run_and_no_single_run_gguf_command(export_recipe, tmp_path):
    run_a = make_run(tmp_path / "a", export_recipe, METHODS["lora"], seed=1)
    run_b = make_run(tmp_path / "b", export_recipe, METHODS["lora"], seed=2)
    out = tmp_path / "mix"
    export_combined([run_a, run_b], out, weights=[0.7, 0.3], check=False)
    card = (out / "README.md").read_text()
    title = next(line for line in card.splitlines() if line.startswith("# "))
    assert "cat combination of a, b merged into" in title  # one recipe's seeds: named by their run folders
    assert f"peftkit export {run_a}" not in card and "convert_hf_to_gguf.py" in card
    tags = card.split("---")[1]
    assert tags.count("- lora") == 1


def test_export_of_a_folder_that_is_no_run_leaves_nothing_there(export_recipe, tmp_path, capsys):
    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"])
    assert main(["merge", str(run), "--no-verify"]) == 0
    merged = run / "merged"
    before = sorted(p.name for p in merged.iterdir())
    assert main(["export", str(merged), "--format", "gguf"]) == 2
    assert main(["eval", str(merged)]) == 2
    assert sorted(p.name for p in merged.iterdir()) == before  # no lock file left behind
    capsys.readouterr()
    (merged / ".peftkit-lock").write_text("")  # left there by older versions: no user file
    assert main(["merge", str(run), "--force", "--no-verify"]) == 0
    other = make_run(tmp_path / "other", export_recipe, METHODS["lora"])
    (other / ".peftkit-run").write_text("x")
    assert main(["merge", str(run), "--out", str(other), "--force", "--no-verify"]) == 2
    assert "is a peftkit run directory" in capsys.readouterr().err
    for inside in (run / "adapter/sub", run / "checkpoints/new", other / "checkpoints/new"):
        assert main(["merge", str(run), "--out", str(inside), "--no-verify"]) == 2
        assert "which holds a run's own files" in capsys.readouterr().err
        assert not inside.exists()


def test_combined_qlora_adapters_say_which_weights_they_merged_into(export_recipe, tmp_path):
    runs = [make_run(tmp_path / name, export_recipe, METHODS["lora"], quantization={"bits": 4}, seed=seed)
            for name, seed in (("qa", 1), ("qb", 2))]
    with pytest.raises(ExportError, match="--qlora-base original applies to one run"):
        combine_runs(runs, [0.5, 0.5], qlora_base="original")
    out = tmp_path / "mix"
    export_combined(runs, out, weights=[0.5, 0.5], check=False)
    assert (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "| QLoRA merge target | dequantized 4-bit weights (what the adapters trained against) |" in card


def test_chat_takes_a_merged_folder_and_answers_as_the_run_does(export_recipe, tmp_path, capsys, monkeypatch):
    """`peftkit chat RUN/merged`: the exported weights, with the run's system prompt as the template's default,
    give the run's own greedy reply; the commands that need a run say what the folder is instead."""
    run = make_run(tmp_path / "run", export_recipe, METHODS["lora"], scale=0.05)
    export_hf(run)
    capsys.readouterr()
    asked = ["--prompt", "What is the wifi password?", "--max-new-tokens", "6"]
    assert main(["chat", str(run), *asked]) == 0
    from_run = capsys.readouterr().out
    assert main(["chat", str(run / "merged"), *asked]) == 0
    from_folder = capsys.readouterr().out
    assert from_folder.strip() and from_folder == from_run
    assert main(["chat", str(run / "merged"), *asked, "--system", "Answer in French."]) == 0
    assert capsys.readouterr().out != from_run, "--system replaces the template's default"

    assert main(["chat", str(run / "merged"), *asked, "--qlora-base", "original"]) == 2
    assert "model folder" in capsys.readouterr().err
    assert main(["eval", str(run / "merged")]) == 2
    err = capsys.readouterr().err
    assert "is a model folder" in err and "run directory it came from" in err
    adapter_only = tmp_path / "adapter-export"
    adapter_only.mkdir()
    (adapter_only / "adapter_config.json").write_text("{}")
    assert main(["chat", str(adapter_only)]) == 2
    assert "is an adapter folder" in capsys.readouterr().err

    # A full fine-tune's RUN/model holds weights without a tokenizer: chat goes to its run.
    import shutil

    shutil.copytree(run / "merged", run / "model", ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    assert main(["chat", str(run / "model"), *asked]) == 0
    assert capsys.readouterr().out == from_run
    monkeypatch.chdir(run / "model")  # `peftkit chat .` from inside it
    assert main(["chat", ".", *asked]) == 0
    assert capsys.readouterr().out == from_run


def test_combining_adapters_of_different_bases_suggests_base_only_where_it_can_work(export_recipe, tiny_model_dir,
                                                                                     tmp_path):
    import shutil

    run_a = make_run(tmp_path / "a", export_recipe, METHODS["lora"], seed=1)  # hidden 64
    other = make_run(tmp_path / "b", export_recipe, METHODS["lora"], model_dir=tiny_model_dir)  # hidden 32
    with pytest.raises(ExportError) as info:
        combine_runs([run_a, other])
    assert "their bases differ, hidden_size: 32 against 64" in str(info.value) and "--base" not in str(info.value)
    deeper = build_llama_dir(tmp_path / "deeper", build_tiny_tokenizer(), layers=3)  # the same layer sizes
    with pytest.raises(ExportError, match=r"their bases differ, num_hidden_layers: 3 against 2, so no one base fits both"):
        combine_runs([run_a, make_run(tmp_path / "d", export_recipe, METHODS["lora"], model_dir=deeper)])
    with pytest.raises(ExportError, match="--qlora-base original has nothing to choose"):
        combine_runs([run_a, run_a], qlora_base="original")
    copy = tmp_path / "copy-of-base"
    shutil.copytree(export_recipe["model"]["name"], copy)
    moved = make_run(tmp_path / "c", export_recipe, METHODS["lora"], model_dir=copy, seed=2)
    with pytest.raises(ExportError, match="where both are copies of one model, pass --base to use one of them"):
        combine_runs([run_a, moved])
    assert combine_runs([run_a, moved], base=str(copy)).merge_max_abs_diff < 1e-4


def test_bases_told_apart_by_adapter_shapes_where_no_config_is_recorded(tmp_path):
    from peftkit.export.compat import AdapterInfo
    from peftkit.export.merge import _bases_differ

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    a = AdapterInfo(tmp_path / "a" / "adapter", {}, {key: (8, 64)})
    b = AdapterInfo(tmp_path / "b" / "adapter", {}, {key: (16, 576)})
    assert _bases_differ(a, b) == "q_proj: 64 against 576"  # the rank (8 against 16) is no base's size
    assert _bases_differ(a, AdapterInfo(tmp_path / "c" / "adapter", {}, {key: (16, 64)})) is None
