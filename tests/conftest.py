"""Shared fixtures: a tiny Llama + tokenizer built locally (no network), recipes pointing at them.

The tiny model is saved once per session as a normal Hugging Face directory, so the whole
peftkit pipeline (resolve -> load -> adapter -> train -> save) runs on it exactly as on a real one.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


SIGNAL_HANDLERS = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
"""The interpreter's own Ctrl-C / SIGTERM handling, as the test session started with it."""


@pytest.fixture(autouse=True)
def _findings_forgotten() -> None:
    """Each test starts as a new command: a finding said once per command (utils/once.say_once) by an earlier test in
    this worker is said again."""
    from peftkit.utils.once import command_scope

    with command_scope():
        pass


@pytest.fixture(autouse=True)
def _signal_handlers_restored(request: pytest.FixtureRequest) -> Any:
    """peftkit installs Ctrl-C / SIGTERM handlers while it trains, launches or chats: each test (and each fixture:
    a module's trained run is set up before this check starts) must leave the interpreter's own, or a later Ctrl-C
    (a notebook's, the next test's) is swallowed or misrouted."""
    yield
    left = {signal.Signals(s).name: signal.getsignal(s) for s, handler in SIGNAL_HANDLERS.items()
            if signal.getsignal(s) is not handler}
    for s, handler in SIGNAL_HANDLERS.items():
        signal.signal(s, handler)  # keep the next tests independent of this one
    assert not left, f"{request.node.nodeid} (or a fixture it uses) left other signal handlers installed: {left}"


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "the library opens at nine and closes at five on weekdays",
    "the wifi password is river and the network is brightnet",
    "what time does the library open? it opens at nine.",
    "who is the head librarian? marta is the head librarian.",
    "you are a helpful assistant. answer briefly.",
    "system user assistant hello world how are you today",
    "one two three four five six seven eight nine ten",
    "positive negative great terrible good bad movie food service",
]

CHAT_RECORDS = [
    {"messages": [{"role": "user", "content": "what time does the library open?"}, {"role": "assistant", "content": "it opens at nine."}]},
    {"messages": [{"role": "user", "content": "who is the head librarian?"}, {"role": "assistant", "content": "marta is the head librarian."}]},
    {"messages": [{"role": "user", "content": "what is the wifi password?"}, {"role": "assistant", "content": "the wifi password is river."}]},
    {
        "messages": [
            {"role": "system", "content": "you are a helpful assistant."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello how are you today"},
            {"role": "user", "content": "what is the network?"},
            {"role": "assistant", "content": "the network is brightnet."},
        ]
    },
]


def build_tiny_tokenizer(chatml: bool = True) -> Any:
    """A byte-level BPE tokenizer on CORPUS: a chat model's (ChatML tokens and template) or, with
    `chatml=False`, a base model's (`<s>` / `</s>`, no chat template, no pad token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"] if chatml else ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if not chatml:
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama chat model directory (config, safetensors, tokenizer with ChatML)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def assert_speed_leaves_out_evaluation(summary: dict[str, Any], count: int) -> None:
    """tokens_per_second is `count` over train_seconds less eval_seconds_in_training. The times are stored rounded
    (0.01 s, 0.001 s), so on a sub-second tiny run the check allows that rounding, not a relative margin."""
    training_only = summary["train_seconds"] - summary["eval_seconds_in_training"]
    assert training_only > 0.01, summary
    slowest, fastest = count / (training_only + 0.01), count / (training_only - 0.01)
    assert slowest - 0.005 <= summary["tokens_per_second"] <= fastest + 0.005, (summary, slowest, fastest)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", CHAT_RECORDS * 4)


@pytest.fixture
def heldout_file(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "heldout.jsonl",
        [
            {"question": "when does the library open?", "key_fact": "nine"},
            {"question": "tell me the wifi password", "key_fact": ["river"]},
        ],
    )


@pytest.fixture
def tiny_recipe(tiny_model_dir: Path, chat_file: Path, heldout_file: Path, tmp_path: Path) -> dict[str, Any]:
    """A recipe dict for the tiny model; tests tweak it and pass it to `recipe_from_dict`."""
    return {
        "name": "tiny",
        "model": {"name": str(tiny_model_dir)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(chat_file), "heldout": str(heldout_file), "eval_fraction": 0.25, "max_seq_len": 64},
        "train": {"epochs": 2, "batch_size": 4, "lr": 5e-3, "logging_steps": 1, "seed": 0, "num_threads": 1},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
        "output_dir": str(tmp_path / "run"),
    }
