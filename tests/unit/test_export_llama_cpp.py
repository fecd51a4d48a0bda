"""GGUF exports run in llama.cpp itself (llama-cpp-python), not only read back by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.unit.export_fixtures import build_gemma_tokenizer, export_recipe, llama64_dir, make_run  # noqa: F401
from tests.unit.test_export_gguf import LORA, SPM_TEXTS, _family_dir, _fields
from peftkit.errors import ExportError
from peftkit.export import llama_cpp_check
from peftkit.export.gguf_lora import export_gguf_adapter
from peftkit.export.gguf_writer import export_gguf, write_model_gguf

torch.set_num_threads(1)


def _base_gguf(model_dir: Path, out: Path) -> Path:
    """The base model as an f32 GGUF: what `ollama create` / `llama-cli -m` would take as the LoRA's base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    write_model_gguf(model, AutoTokenizer.from_pretrained(model_dir), out, gguf_type="f32", name="base")
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3", "gemma3_text"])
def test_a_gguf_lora_runs_in_llama_cpp_on_its_base_gguf(export_recipe, llama64_dir, tmp_path, model_type):
    """Trained from a GGUF base, the GGUF LoRA is run in llama.cpp on that file (the Modelfile's FROM): permuted
    Q/K (Llama), q/k norms (Qwen3), fused qkv / gate_up (Phi-3), the norm shift and soft-capping (Gemma 3)."""
    # Gemma with its own kind of vocabulary: transformers turns a byte-level one in a Gemma GGUF into a broken tokenizer
    tokenizer = build_gemma_tokenizer(tmp_path / "spm") if model_type == "gemma3_text" else None
    model_dir = llama64_dir if model_type == "llama" else _family_dir(tmp_path / model_type, model_type, tokenizer)
    base = _base_gguf(model_dir, tmp_path / f"{model_type}-base.gguf")
    run = make_run(tmp_path / "run", {**export_recipe, "name": "desk"}, LORA, model_dir=base)
    result = export_gguf_adapter(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())["llama_cpp"]
    assert report["ran"] and report["passed"] and report["precision"] == "llama.cpp-f32", report
    assert report["lora"].endswith("desk-lora-f32.gguf") and report["model"] == str(base)
    assert report["greedy_exact"] == 1.0 and report["tokenizer_match"]
    assert any(note.startswith("Ran in llama.cpp: max |logit diff|") for note in result.notes)

    # the same check without the LoRA fails: it measures the adapter, not only the base
    from peftkit.export.merge import merge_run

    without = llama_cpp_check.check(base, merge_run(run).reference, precision="llama.cpp-f32")
    assert without["ran"] and not without["passed"] and without["max_abs_diff"] > 10 * report["max_abs_diff"]


def test_a_file_llama_cpp_cannot_load_is_refused_with_llama_cpps_reason(export_recipe, tmp_path, monkeypatch):
    """transformers reads a byte-level vocabulary whose pre-tokenizer is named `gpt2` without complaint; llama.cpp
    (its name is `gpt-2`) refuses to load it. The export says llama.cpp's reason and writes nothing."""
    from peftkit.export import gguf_vocab

    run = make_run(tmp_path / "run", export_recipe, LORA)
    assert json.loads((export_gguf(run, tmp_path / "ok", gguf_type="f32").path / "verification.json").read_text())[
        "llama_cpp"]["passed"]
    assert _fields(tmp_path / "ok" / "tiny-f32.gguf")[0]["tokenizer.ggml.pre"] == "gpt-2"
    monkeypatch.setattr(gguf_vocab, "tokenizer_pre", lambda tokenizer_json, source_pre: "gpt2")
    with pytest.raises(ExportError) as error:
        export_gguf(run, tmp_path / "bad", gguf_type="f32")
    message = str(error.value)
    assert "llama.cpp (llama-cpp-python" in message and "could not run the written GGUF" in message
    assert "unknown pre-tokenizer type: 'gpt2'" in message and "--no-verify" in message
    assert not (tmp_path / "bad").exists()
    failed = json.loads((tmp_path / "bad.verification-failed.json").read_text())  # the transformers check's numbers
    assert failed["kind"] == "gguf" and failed["greedy_exact"] == 1.0 and "unknown pre-tokenizer" in failed["failures"][0]


def test_without_llama_cpp_the_export_says_how_to_run_it_there(export_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp_check, "installed_version", lambda: None)
    run = make_run(tmp_path / "run", export_recipe, LORA)
    result = export_gguf(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())
    assert report["passed"] and report["llama_cpp"] == {
        "ran": False, "why": "llama-cpp-python is not installed (pip install -c constraints.txt -e '.[llama-cpp]' in "
                             "peftkit's checkout, with the CMAKE_ARGS the README gives under Merge and export, "
                             "runs the file in llama.cpp itself)"}
    assert "llama.cpp: not run: llama-cpp-python is not installed" in " ".join(result.notes)
    adapter = json.loads((export_gguf_adapter(run, gguf_type="f32").path / "verification.json").read_text())
    assert adapter["passed"] and not adapter["llama_cpp"]["ran"]  # no base GGUF to run it on
    assert "no base GGUF" in adapter["llama_cpp"]["why"]


def _phi3_style_tokenizer():
    """Phi-3's specials: `<s>`, `</s>`, `<unk>`, `<|endoftext|>`, and turn tokens that take the whitespace after
    them (rstrip), as Phi-3's tokenizer.json has them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)]
                           + [AddedToken(t, rstrip=True, special=True) for t in ("<|user|>", "<|assistant|>", "<|end|>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    return fast


def test_a_phi3_vocabulary_is_named_so_llama_cpp_strips_like_its_tokenizer(export_recipe, tmp_path):
    """llama.cpp applies Phi-3's right-stripping only to a file whose general.name says phi3: without it,
    `<|user|>\\n` became two tokens there and one in training. Any run name gets the marker it needs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = _phi3_style_tokenizer()
    config = AutoConfig.for_model("phi3", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # the newlines belong to the turn tokens
    assert ids == tokenizer("<|user|>hello<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
    run = make_run(tmp_path / "run", {**export_recipe, "name": "support-desk"}, LORA, model_dir=tmp_path / "base")
    result = export_gguf(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())["llama_cpp"]
    assert report["passed"] and report["tokenizer_match"], report
    assert _fields(result.path / "support-desk-f32.gguf")[0]["general.name"] == "support-desk-phi3"
    # beyond the fixed English prompts, the run's own data (its training messages) is tokenized in llama.cpp too
    assert report["data_texts_checked"] > 10 and report["data_texts_tokenized_differently"] == 0, report


def test_the_run_data_llama_cpp_tokenizes_differently_is_said():
    """An Arabic run's export said `tokenizer_match: true` from four English prompts while llama.cpp split 15 of its
    187 training texts differently (a space before an Arabic-Indic digit)."""
    report = {"ran": True, "max_abs_diff": 0.001, "tolerance": 0.01, "greedy_agreement": 1.0, "greedy_exact": 1.0,
              "prompts": 4, "tokenizer_match": True, "data_texts_checked": 187, "data_texts_tokenized_differently": 15,
              "data_text_tokenized_differently": "السعر ٣ دنانير"}
    line = llama_cpp_check.summary(report)
    assert "llama.cpp splits 15 of 187 texts of the run's own data into other tokens than training did" in line
    assert "السعر ٣" in line and "can differ from `peftkit chat`'s" in line
    assert "own data" not in llama_cpp_check.summary({**report, "data_texts_tokenized_differently": 0})


def test_a_gguf_lora_checked_on_a_quantized_base_says_why_its_answers_may_part():
    """On SmolLM2's Q4_1 file a trial's check printed "identical greedy answers 50% of 4 prompts" and nothing else:
    only docs/export.md said why (llama.cpp rounds the activations on a quantized base)."""
    report = {"ran": True, "passed": True, "max_abs_diff": 2.75, "tolerance": 12.4, "greedy_agreement": 0.953,
              "greedy_exact": 0.5, "prompts": 4, "precision": llama_cpp_check.QUANTIZED_BASE}
    line = llama_cpp_check.summary(report)
    assert "identical greedy answers 50% of 4 prompts; on the quantized base GGUF llama.cpp also rounds" in line
    assert "rounds" not in llama_cpp_check.summary({**report, "precision": "llama.cpp-f16"})
    assert "rounds" not in llama_cpp_check.summary({**report, "passed": False})  # a miss is warned about instead


@pytest.mark.parametrize("legacy", [False, True])
def test_peftkits_llama_cpp_tokenizer_agrees_with_llama_cpp(export_recipe, tmp_path, legacy):
    """The pure-Python copy of llama.cpp's sentencepiece tokenizer (used when llama.cpp is not installed) gives
    llama.cpp's own ids on the written file, special tokens and byte fallback included."""
    from llama_cpp import Llama

    from peftkit.export.llama_cpp_tokenizer import SpmVocab, tokenize
    from tests.unit.export_fixtures import build_llama_dir, build_sentencepiece_tokenizer

    base = build_llama_dir(tmp_path / "base", build_sentencepiece_tokenizer(tmp_path / "spm", legacy=legacy))
    run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=base)
    result = export_gguf(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())
    assert report["llama_cpp"]["passed"]
    assert report["llama_cpp"]["tokenizer_match"] is report["llama_cpp_tokenizer_match"] is legacy
    # the logits are compared along the reference ids; what llama.cpp answers from its own split is said as well
    own = report["llama_cpp"]["greedy_exact_own_tokenization"]
    assert own is None if legacy else 0.0 <= own <= 1.0  # measured only where llama.cpp tokenizes differently
    assert ("from its own tokens, identical greedy answers" in " ".join(result.notes)) is not legacy
    path = result.path / "tiny-f32.gguf"
    vocab = SpmVocab.from_gguf(path)
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in [*SPM_TEXTS, "<s>[INST] hi [/INST] ok</s>", "  leading spaces", "tab\there"]:
        for special in (True, False):
            assert tokenize(text, vocab, parse_special=special) == llm.tokenize(
                text.encode("utf-8"), add_bos=False, special=special), (text, special)


def test_a_templates_own_end_of_turn_token_ends_generation_in_llama_cpp(export_recipe, tmp_path):
    """llama.cpp stops on EOS, EOT and token texts it knows; a template closing replies with a token of its own
    (`<|turn_end|>`, EOS `</s>`) gets it written as the EOT token, or llama-cli would run on past every reply."""
    from tests.conftest import build_tiny_tokenizer
    from tests.unit.export_fixtures import build_llama_dir

    tokenizer = build_tiny_tokenizer(chatml=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|turn_end|>"]})
    tokenizer.pad_token = "</s>"
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|turn_end|>\n' }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=build_llama_dir(tmp_path / "base", tokenizer))
    result = export_gguf(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())["llama_cpp"]
    end = tokenizer.convert_tokens_to_ids("<|turn_end|>")
    assert report["passed"], report
    assert report["stops_not_ending_generation"] == [], report
    fields = _fields(result.path / "tiny-f32.gguf")[0]
    assert fields["tokenizer.ggml.eot_token_id"] == end and fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id


def test_an_old_llama_cpp_python_is_named_instead_of_failing_the_export(export_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp_check, "installed_version", lambda: "0.2.90")
    run = make_run(tmp_path / "run", export_recipe, LORA)
    report = json.loads((export_gguf(run, gguf_type="f32").path / "verification.json").read_text())
    assert report["passed"] and report["llama_cpp"]["why"] == ("llama-cpp-python 0.2.90 is older than 0.3.36 "
                                                               "(pip install -U llama-cpp-python)")


@pytest.mark.parametrize("base_type", ["f16", "q8_0", "gone"])
def test_a_gguf_lora_is_judged_by_its_bases_precision_and_a_missing_base_is_said(export_recipe, llama64_dir, tmp_path,
                                                                                 base_type):
    """An f32 LoRA on an F16 base is held to F16's bound (llama.cpp rounds the activations to the base's type); on a
    quantized base a miss only warns; a base GGUF moved away since is reported, not a crash."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama64_dir, dtype=torch.float32)
    base = tmp_path / "base.gguf"
    write_model_gguf(model, AutoTokenizer.from_pretrained(llama64_dir), base, name="base",
                     gguf_type="f16" if base_type == "gone" else base_type)
    if base_type == "gone":  # trained on the converted folder, whose marker names the GGUF it came from
        from peftkit.models.gguf_convert import convert_gguf

        run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=convert_gguf(base, tmp_path / "home"))
        base.rename(tmp_path / "moved.gguf")
    else:
        run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=base)
    report = json.loads((export_gguf_adapter(run, gguf_type="f32").path / "verification.json").read_text())["llama_cpp"]
    if base_type == "gone":
        assert not report["ran"] and f"{base} no longer exists" in report["why"]
    else:
        assert report["ran"] and report["passed"], report
        assert report["precision"] == {"f16": "llama.cpp-f16", "q8_0": "llama.cpp-quantized-base"}[base_type]


def test_a_base_gguf_llama_cpp_cannot_load_is_reported_not_blamed_on_the_lora(export_recipe, llama64_dir, tmp_path,
                                                                              monkeypatch, caplog):
    """A base GGUF written before the `gpt-2` fix does not load in llama.cpp: the LoRA is written, and the report
    and a warning say the base is the problem (the Modelfile's FROM would fail too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.export import gguf_vocab

    model = AutoModelForCausalLM.from_pretrained(llama64_dir, dtype=torch.float32)
    base = tmp_path / "old.gguf"
    run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=_base_gguf(llama64_dir, base))
    with monkeypatch.context() as patch:
        patch.setattr(gguf_vocab, "tokenizer_pre", lambda tokenizer_json, source_pre: "gpt2")
        write_model_gguf(model, AutoTokenizer.from_pretrained(llama64_dir), base, gguf_type="f32", name="base")
    result = export_gguf_adapter(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())
    assert report["passed"] and not report["llama_cpp"]["ran"]
    assert f"could not run the base GGUF {base} with this LoRA" in report["llama_cpp"]["why"]
    assert "unknown pre-tokenizer type: 'gpt2'" in report["llama_cpp"]["why"]
    assert "The Modelfile's FROM is that file" in caplog.text


def test_a_base_gguf_with_the_old_gpt2_name_is_exported_with_llama_cpps():
    from peftkit.export.gguf_vocab import tokenizer_pre

    assert tokenizer_pre({"pre_tokenizer": {"type": "ByteLevel"}}, "gpt2") == "gpt-2"
    assert tokenizer_pre({"pre_tokenizer": {"type": "ByteLevel"}}, "smollm") == "smollm"


def test_the_run_texts_an_export_checks_come_from_its_data_and_heldout_replies(tmp_path):
    """Training messages and held-out questions and replies, each once; a dataset folder (a save_to_disk copy, maybe
    gigabytes) is not read for a 200-text check, and data that cannot be read is skipped, not fatal."""
    from types import SimpleNamespace

    from peftkit.export.merge import run_data_texts
    from tests.conftest import write_jsonl

    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "Когда открыто?"},
                                                              {"role": "assistant", "content": "С 9 до 18."}]}] * 3)
    write_jsonl(tmp_path / "heldout.jsonl", [{"question": "السعر؟", "reply": "٣ دنانير", "correct": True}])

    def run(source):
        data = SimpleNamespace(train=source, format="auto", columns=None)
        return SimpleNamespace(recipe=SimpleNamespace(data=data), run_dir=tmp_path)

    assert run_data_texts(run(str(train))) == ["Когда открыто?", "С 9 до 18.", "السعر؟", "٣ دنانير"]
    import datasets

    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
                               ).save_to_disk(str(tmp_path / "saved"))  # readable, but not read: a folder may be huge
    assert run_data_texts(run(str(tmp_path / "saved"))) == ["السعر؟", "٣ دنانير"]
    assert run_data_texts(run([str(tmp_path / "gone.jsonl")])) == ["السعر؟", "٣ دنانير"]
    assert run_data_texts(run(str(train)), limit=1) == ["Когда открыто?"]


ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.mark.parametrize(("writes_bos", "plain_text"), [(False, False), (True, False), (False, True)])
def test_llama_cpp_starts_a_chat_prompt_with_bos_only_where_training_did(export_recipe, tmp_path, writes_bos,
                                                                         plain_text):
    """Chat rows are tokenized without the tokenizer's own special tokens: under a template that does not write
    `{{ bos_token }}` (Zephyr, TinyLlama-Chat) on a tokenizer that adds BOS itself, training never saw BOS, yet the
    GGUF said add_bos_token and llama.cpp / Ollama put one before every prompt (the check tokenized without it)."""
    from llama_cpp import Llama

    from peftkit.data.chat import render_chat
    from peftkit.export.ollama import ollama_modelfile
    from tests.unit.export_fixtures import build_llama_dir, build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(tmp_path / "spm", legacy=True)  # llama.cpp splits text as it does
    tokenizer.add_bos_token = True  # as Llama-2 / Mistral / TinyLlama tokenizers are saved
    tokenizer.update_post_processor()
    tokenizer.chat_template = "{{ bos_token }}" + ZEPHYR if writes_bos else ZEPHYR
    base = build_llama_dir(tmp_path / "base", tokenizer)
    run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=base)
    if plain_text:  # plain-text rows are tokenized with the tokenizer's own BOS: completions keep it
        (run / "summary.json").write_text(json.dumps({"data_stats": {"train_formats": {"chat": 4, "text": 2}}}))
    result = export_gguf(run, gguf_type="f32")
    path = result.path / "tiny-f32.gguf"
    assert _fields(path)[0]["tokenizer.ggml.add_bos_token"] is (writes_bos or plain_text)
    if plain_text:
        return
    prompt = render_chat(tokenizer, [{"role": "user", "content": "hello"}], generation=True)
    trained = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert (trained[0] == tokenizer.bos_token_id) is writes_bos
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llama_cpp_check._chat_tokens(llm, prompt) == trained  # the chat path: one BOS where training had one
    assert json.loads((result.path / "verification.json").read_text())["llama_cpp"]["tokenizer_match"]
    # Ollama adds BOS where the file says so, and its template leaves out the template's own
    assert tokenizer.bos_token not in ollama_modelfile("m.gguf", tokenizer, None)
