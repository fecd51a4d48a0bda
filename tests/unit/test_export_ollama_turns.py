"""Ollama templates read off turn-based chat templates (peftkit/export/ollama_template.py).

tests/data/ollama_turns holds, per chat template family below, the Go template peftkit writes (FAMILY.gotmpl) and
Go's own text/template rendering of cases.json through it (FAMILY.json, made by tests/data/ollama_tools/render.go as
Ollama executes a Modelfile TEMPLATE). Each must equal the Jinja rendering training used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from peftkit.export.ollama import NO_OLLAMA_TEMPLATE, ollama_modelfile, turn_template
from peftkit.export.ollama_template import ollama_go_template, read_turn_template, render_like_ollama
from peftkit.models.load import set_default_system_prompt
from tests.conftest import build_tiny_tokenizer

TURNS = Path(__file__).resolve().parents[1] / "data" / "ollama_turns"

FAMILIES = {
    "llama3": "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if "
              "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    # refuses system messages: training folds them into the first user message, and so must Ollama
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
             "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content']"
             " | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
    # BOS inside the text before every user turn, the system prompt inside the first one
    "llama2": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
              "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
              "{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
              "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
              "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + "
              "'[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + "
              "content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    # EOS after the last turn when there is no generation prompt
    "phi3": "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
            "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
            "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
}
# Mistral v0.3 puts the system prompt into the *last* user message: not turn-based in this sense
MISTRAL_V3 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{% if loop.last and "
              "messages[0]['role'] == 'system' %}{{ '[INST] ' + messages[0]['content'] + '\n\n' + message['content'] + "
              "'[/INST]' }}{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}{% elif message['role'] "
              "== 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")


def _tokenizer(template: str):
    tokenizer = build_tiny_tokenizer()
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.chat_template = "<s>", "</s>", template
    return tokenizer


def _go_template(family: str) -> str:
    turns = read_turn_template(_tokenizer(FAMILIES[family]), bos="<s>")
    assert turns is not None, family
    return ollama_go_template(turns)


def write_golden_templates() -> None:
    """After changing ollama_go_template: write the templates, then in tests/data/ollama_turns run for each family
    `go run ../ollama_tools/render.go FAMILY.gotmpl cases.json > FAMILY.json`."""
    for family in FAMILIES:
        (TURNS / f"{family}.gotmpl").write_text(_go_template(family))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_ollama_template_renders_conversations_as_training_did_in_go_itself(family):
    from peftkit.data.chat import render_chat

    template = (TURNS / f"{family}.gotmpl").read_bytes()
    assert _go_template(family).encode() == template, f"the template changed: see {__name__}.write_golden_templates"
    golden = json.loads((TURNS / f"{family}.json").read_text())
    assert golden["template_sha256"] == hashlib.sha256(template).hexdigest(), f"{family}.json is stale: rerun render.go"
    cases = json.loads((TURNS / "cases.json").read_text())["cases"]
    tokenizer = _tokenizer(FAMILIES[family])
    turns = read_turn_template(tokenizer, bos="<s>")
    assert len(golden["renders"]) == len(cases) >= 5
    for case in cases:
        messages = case["messages"]
        go = golden["renders"][case["name"]]
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns_only = [m for m in messages if m["role"] != "system"]
        assert go == render_like_ollama(turns, system, turns_only), case["name"]
        if messages[-1]["role"] == "user":  # Ollama leaves a final assistant message open; Jinja closes it
            assert go == render_chat(tokenizer, messages, True).removeprefix("<s>"), case["name"]


def test_a_default_system_prompt_becomes_the_modelfiles_system_and_stops_come_from_the_turn_end():
    tokenizer = _tokenizer(FAMILIES["gemma"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    assert set_default_system_prompt(tokenizer, "You are the clinic's front desk.")
    turns = turn_template(tokenizer)  # with "<s>" as text: this tokenizer does not add BOS, so neither would the GGUF
    assert turns.default_system == "You are the clinic's front desk." and turns.start.startswith("<s>")
    modelfile = ollama_modelfile("m.gguf", tokenizer, None)
    assert f'TEMPLATE """{ollama_go_template(turns)}"""' in modelfile
    assert 'SYSTEM """You are the clinic\'s front desk."""' in modelfile
    stops = [line for line in modelfile.splitlines() if line.startswith("PARAMETER stop")]
    assert stops == ['PARAMETER stop "<end_of_turn>"', 'PARAMETER stop "<start_of_turn>"', 'PARAMETER stop "</s>"']


def test_templates_that_are_not_turn_based_get_no_ollama_template_and_say_so():
    mistral = _tokenizer(MISTRAL_V3)
    assert read_turn_template(mistral, bos="<s>") is None
    assert NO_OLLAMA_TEMPLATE in ollama_modelfile("m.gguf", mistral, "Be brief.")
    # a reply's text that changes with the turn's position (a numbered turn) is not a fixed text either
    numbered = _tokenizer("{% for m in messages %}{{ loop.index ~ m['role'] ~ ':' ~ m['content'] ~ '\n' }}{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    assert read_turn_template(numbered) is None


def test_braces_in_the_turn_texts_are_written_as_go_literals():
    tokenizer = _tokenizer("{% for m in messages %}{{ '{{' ~ m['role'] ~ '}} ' ~ m['content'] ~ '\n' }}{% endfor %}"
                           "{% if add_generation_prompt %}{{ '{{assistant}} ' }}{% endif %}")
    turns = read_turn_template(tokenizer)
    assert turns is not None and turns.user_to_assistant == "\n{{assistant}} "
    assert '{{ "{{" }}assistant}} ' in ollama_go_template(turns)


def test_a_tokenizer_that_adds_bos_gets_a_template_without_the_first_one(tmp_path):
    """llama.cpp and Ollama add BOS where the GGUF says so (gguf_vocab: the tokenizer adds it); a template that
    also writes it would double it. The BOS texts between turns stay."""
    from tests.unit.export_fixtures import build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(tmp_path)
    tokenizer.add_bos_token = True
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    tokenizer.chat_template = FAMILIES["llama2"]
    turns = turn_template(tokenizer)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    assert turns.start == "[INST] " and turns.assistant_to_user == f" {eos}{bos}[INST] "
    modelfile = ollama_modelfile("m.gguf", tokenizer, "Be brief.")
    assert 'TEMPLATE """{{ if .System }}[INST] <<SYS>>\n{{ .System }}' in modelfile


def test_a_template_that_trims_messages_says_so_in_the_modelfile():
    """Go templates cannot strip spaces: the Modelfile says what differs instead of claiming an exact rendering."""
    trimming, keeping = _tokenizer(FAMILIES["llama3"]), _tokenizer(FAMILIES["phi3"])
    assert turn_template(trimming).trims and not turn_template(keeping).trims
    assert "strips spaces and line breaks around each message" in ollama_modelfile("m.gguf", trimming, None)
    assert "strips spaces" not in ollama_modelfile("m.gguf", keeping, None)
