"""The Ollama `Modelfile` written next to a GGUF export: ChatML or plain template, stop words, system prompt."""

from __future__ import annotations

import re
from typing import Any

CHATML_PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]

OLLAMA_CHATML_TEMPLATE = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ range .Messages }}{{ if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n"
    "{{ else if eq .Role \"assistant\" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}"
)


def ollama_plain_template(eos: str) -> str:
    """peftkit's `plain` template (models/load.py PLAIN_TEMPLATE) in Ollama's Go template syntax."""
    return ("{{ if .System }}{{ .System }}\n\n{{ end }}"
            "{{ range .Messages }}{{ if eq .Role \"user\" }}### User:\n{{ .Content }}\n\n### Assistant:\n"
            "{{ else if eq .Role \"assistant\" }}{{ .Content }}" + eos + "\n\n{{ end }}{{ end }}")


def chatml_default_system(tokenizer: Any) -> tuple[bool, str | None]:
    """(is the chat template ChatML?, the system prompt it inserts when a conversation has none)."""
    from peftkit.models.load import CHATML_TEMPLATE

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False, None
    try:
        rendered = tokenizer.apply_chat_template(CHATML_PROBE, tokenize=False, add_generation_prompt=True)
        plain = tokenizer.apply_chat_template([CHATML_PROBE[1]], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates that reject the probe are simply not ChatML
        return False, None
    expected = tokenizer.apply_chat_template(CHATML_PROBE, tokenize=False, add_generation_prompt=True,
                                             chat_template=CHATML_TEMPLATE)
    if rendered != expected:
        return False, None
    match = re.match(r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", plain, re.DOTALL)
    return True, match.group(1) if match else None


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def ollama_modelfile(gguf_name: str, tokenizer: Any, system_prompt: str | None) -> str:
    from peftkit.models.load import PLAIN_TEMPLATE

    is_chatml, default_system = chatml_default_system(tokenizer)
    lines = ["# Ollama Modelfile written by peftkit. Create the model with: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}", ""]
    if is_chatml:
        lines += [f"TEMPLATE {_quote(OLLAMA_CHATML_TEMPLATE)}", ""]
        stops = ["<|im_start|>", "<|im_end|>"]
    elif getattr(tokenizer, "chat_template", None) == PLAIN_TEMPLATE and tokenizer.eos_token:
        lines += [f"TEMPLATE {_quote(ollama_plain_template(tokenizer.eos_token))}", ""]
        stops = ["### User:"]
    else:
        lines += ["# The chat template is not ChatML: Ollama reads tokenizer.chat_template from the GGUF instead.", ""]
        stops = []
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    system = system_prompt or default_system
    if system:
        lines += ["", f"SYSTEM {_quote(system)}"]
    return "\n".join(lines) + "\n"
