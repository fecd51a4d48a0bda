"""Helpers for the export tests: run directories with real (randomly perturbed) peft adapters, no training.

A freshly initialised LoRA has B = 0 and changes nothing, which would make "merged == adapter" trivially
true; perturbing every trainable tensor makes each adapter move the logits for real.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from peftkit.config import recipe_from_dict, recipe_to_yaml
from peftkit.models import save_tokenizer


def build_llama_dir(path: Path, tokenizer: Any, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, tie: bool = True, seed: int = 0,
                    vocab_size: int | None = None) -> Path:
    """A saved tiny Llama (dims that bitsandbytes 4-bit and GGUF Q8_0 blocks accept) with `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the 0.02 init: logits that actually depend on the input
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path


def save_with_random_weights(model: Any, tokenizer: Any, path: Path) -> Path:
    """Save a tiny model with weights large enough to move the logits (the default init barely does)."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1 if param.dim() == 2 else 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def perturb_adapter(model: Any, scale: float = 0.2, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)


def make_run(run_dir: Path, recipe: dict[str, Any], peft_config: Any, *, model_dir: Path | None = None,
             quantization: dict[str, Any] | None = None, seed: int = 1, scale: float = 0.05) -> Path:
    """A run directory as `peftkit train` leaves it (recipe.yaml, tokenizer/, adapter/), without training."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = copy.deepcopy(recipe)
    if model_dir is not None:
        data["model"] = {"name": str(model_dir)}
    data["output_dir"] = str(run_dir)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        data["quantization"] = quantization
        data["adapter"] = {**data["adapter"], "method": "qlora", "gradient_checkpointing": False}
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True) if quantization.get("bits") == 8 else (
            BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quantization.get("quant_type", "nf4"),
                bnb_4bit_use_double_quant=quantization.get("double_quant", True),
                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8,
            ))
        kwargs["device_map"] = {"": "cpu"}
    recipe_obj = recipe_from_dict(data)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe_obj), encoding="utf-8")
    from peftkit.models import materialize, resolve_model_ref

    base_dir = materialize(resolve_model_ref(data["model"]["name"]))  # built-in names resolve to the cache
    save_tokenizer(AutoTokenizer.from_pretrained(base_dir), run_dir / "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    model = get_peft_model(base, peft_config)
    perturb_adapter(model, scale=scale, seed=seed)
    model.save_pretrained(run_dir / "adapter", safe_serialization=True)
    return run_dir


def adapter_logits(run_dir: Path, ids: torch.Tensor, *, base_dir: Path | None = None) -> torch.Tensor:
    """Logits of the unmerged adapter on its float32 base, loaded with plain transformers + peft."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = base_dir or Path(json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"])
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- pytest fixtures shared by the export test modules (import them by name) ----------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llama64_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with hidden 64 (bitsandbytes 4-bit blocks and GGUF Q8_0 rows need multiples of 32/64)."""
    from tests.conftest import build_tiny_tokenizer

    return build_llama_dir(tmp_path_factory.mktemp("llama64"), build_tiny_tokenizer())


@pytest.fixture
def export_recipe(tiny_recipe: dict[str, Any], llama64_dir: Path) -> dict[str, Any]:
    recipe = copy.deepcopy(tiny_recipe)
    recipe["model"] = {"name": str(llama64_dir)}
    recipe["data"]["system_prompt"] = "You are the library help desk."
    recipe["eval"]["sample_prompts"] = ["What is the wifi password?"]
    return recipe


def token_ids(n: int = 2, length: int = 12, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


LLAMA2_TEMPLATE = (  # Llama-2 chat style: the prompt ends in [/INST], answers end in </s>
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>> ' + message['content'] + ' <</SYS>> ' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def build_sentencepiece_tokenizer(folder: Path, *, legacy: bool = False) -> Any:
    """A Llama-2-style tokenizer: sentencepiece BPE with byte fallback, trained here and converted by transformers.

    `legacy` is transformers' flag: True puts `▁` before the text after every special token too
    (Metaspace prepend_scheme "always", as sentencepiece and llama.cpp do), False only at the start ("first").
    """
    import sentencepiece
    from transformers import LlamaTokenizer

    from tests.conftest import CORPUS

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 8 + ["[INST] <<SYS>> [/INST] <</SYS>>"] * 8), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2,
    )
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=legacy)  # transformers converts tokenizer.model
    tokenizer.chat_template = LLAMA2_TEMPLATE
    return tokenizer


GEMMA_TEMPLATE = (  # Gemma's turns; like Gemma's own template it refuses a system message
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_gemma_tokenizer(folder: Path) -> Any:
    """A Gemma-style tokenizer: sentencepiece BPE with byte fallback and no space prefix, converted by
    transformers' Gemma converter (a Replace normalizer and a space Split, no Metaspace)."""
    import sentencepiece
    from transformers import GemmaTokenizer

    from tests.conftest import CORPUS

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 8 + ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"] * 8),
                      encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, hard_vocab_limit=False, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer = GemmaTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = GEMMA_TEMPLATE
    tokenizer.eos_token = "<end_of_turn>"
    return tokenizer
