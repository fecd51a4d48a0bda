"""The Ollama `Modelfile` written next to a GGUF export: ChatML (with tools when the model was trained with them) or
plain template, stop words, system prompt."""

from __future__ import annotations

import re
from typing import Any

from peftkit.export.ollama_template import TurnTemplate, ollama_go_template, read_turn_template, stop_texts

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


OLLAMA_CHATML_TOOLS_TEMPLATE = (
    '{{- if .Tools }}<|im_start|>system\n'
    '{{ if .System }}{{ .System }}\n'
    '\n'
    '{{ end }}You can call these functions, described as JSON schemas:\n'
    '<tools>\n'
    '{{- range .Tools }}\n'
    '{{ json . }}\n'
    '{{- end }}\n'
    '</tools>\n'
    'To call one, reply with <tool_call>{"name": ..., "arguments": {...}}</tool_call>.<|im_end|>\n'
    '{{ else if .System }}<|im_start|>system\n'
    '{{ .System }}<|im_end|>\n'
    '{{ end }}\n'
    '{{- range $i, $m := .Messages }}\n'
    '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
    '{{- if eq .Role "user" }}<|im_start|>user\n'
    '{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "tool" }}<|im_start|>tool\n'
    '<tool_response>\n'
    '{{ .Content }}\n'
    '</tool_response><|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n'
    '{{ .Content }}{{ if and $m.Content $m.ToolCalls }}\n'
    '{{ end }}{{ if .ToolCalls }}{{ range $j, $c := .ToolCalls }}<tool_call>{"name": {{ json .Function.Name }}, "arguments": {{ json .Function.Arguments }}}</tool_call>{{ if ne (len (slice $m.ToolCalls $j)) 1 }}\n'
    '{{ end }}{{ end }}{{ end }}{{ if not $last }}<|im_end|>\n'
    '{{ end }}\n'
    '{{- end }}\n'
    '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant\n'
    '{{ end }}\n'
    '{{- end }}'
)
"""peftkit's tool-aware `chatml` template (models/load.py CHATML_TEMPLATE) in Ollama's Go template syntax: with
`.Tools` Ollama accepts tool requests, and it finds the call tag (`<tool_call>`) as the first text under
`{{ if .ToolCalls }}`. Ollama re-serialises schemas and past call arguments as compact JSON; everything else renders
byte for byte as in training (checked against Go's text/template: tests/data/ollama_tools)."""

TOOLS_PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
    {"role": "tool", "content": "R"},
]
PROBE_TOOLS = [{"type": "function", "function": {"name": "f", "description": "D", "parameters": {"type": "object", "properties": {}}}}]


def ollama_plain_template(eos: str) -> str:
    """peftkit's `plain` template (models/load.py PLAIN_TEMPLATE) in Ollama's Go template syntax."""
    return ("{{ if .System }}{{ .System }}\n\n{{ end }}"
            "{{ range .Messages }}{{ if eq .Role \"user\" }}### User:\n{{ .Content }}\n\n### Assistant:\n"
            "{{ else if eq .Role \"assistant\" }}{{ .Content }}" + eos + "\n\n{{ end }}{{ end }}")


def _renders_as_chatml(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> bool:
    """Whether the tokenizer's own template renders `messages` (and `tools`) exactly as peftkit's `chatml` does."""
    from peftkit.models.load import CHATML_TEMPLATE

    return _renders_as(tokenizer, CHATML_TEMPLATE, messages, tools)


def renders_as_plain(tokenizer: Any) -> bool:
    """Whether the tokenizer's template is peftkit's `plain` one (possibly behind a default system prompt, which the
    run's tokenizer carries: models/load.py set_default_system_prompt), with or without its opening BOS token
    (llama.cpp adds that one itself)."""
    from peftkit.models.load import PLAIN_TEMPLATE, PLAIN_TEMPLATE_WITH_BOS

    return bool(tokenizer.eos_token) and any(_renders_as(tokenizer, template, CHATML_PROBE)
                                             for template in (PLAIN_TEMPLATE, PLAIN_TEMPLATE_WITH_BOS))


def _renders_as(tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> bool:
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that rejects the probe does not render it as ChatML
        return False
    return rendered == tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                                     chat_template=template)


def chatml_default_system(tokenizer: Any) -> tuple[bool, str | None]:
    """(is the chat template ChatML?, the system prompt it inserts when a conversation has none)."""
    if not _renders_as_chatml(tokenizer, CHATML_PROBE):
        return False, None
    try:
        plain = tokenizer.apply_chat_template([CHATML_PROBE[1]], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates that reject the probe are simply not ChatML
        return False, None
    match = re.match(r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", plain, re.DOTALL)
    return True, match.group(1) if match else None


def renders_tools_as_chatml(tokenizer: Any) -> bool:
    """Whether the tokenizer's template writes tools, calls and results as peftkit's `chatml` does (the model was
    trained on that form, so the tool-aware Ollama template prompts it the same way)."""
    return _renders_as_chatml(tokenizer, TOOLS_PROBE, PROBE_TOOLS)


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


NO_OLLAMA_TEMPLATE = (
    "# No TEMPLATE: this chat template is not one peftkit can rewrite for Ollama (the text between turns depends on\n"
    "# more than their roles, or the system prompt is not before the first user message). Ollama does not run the\n"
    "# GGUF's Jinja chat template: it picks the closest template it knows, or none (the bare prompt, no roles, no\n"
    "# SYSTEM). Check `ollama show NAME --template`, and add a TEMPLATE here that renders conversations as\n"
    "# tokenizer.chat_template does."
)


def turn_template(tokenizer: Any) -> TurnTemplate | None:
    """The turn texts of a chat template that is neither ChatML nor plain, without the BOS Ollama adds (where the
    GGUF says to add one: gguf_vocab.gguf_adds_bos)."""
    from peftkit.export.gguf_vocab import gguf_adds_bos

    return read_turn_template(tokenizer, bos=tokenizer.bos_token if gguf_adds_bos(tokenizer) else None)


def has_ollama_template(tokenizer: Any) -> bool:
    return chatml_default_system(tokenizer)[0] or renders_as_plain(tokenizer) or turn_template(tokenizer) is not None


def ollama_modelfile(gguf_name: str, tokenizer: Any, system_prompt: str | None, *,
                     from_lines: list[str] | None = None) -> str:
    """The Modelfile for `gguf_name` (a model; or, after `from_lines` naming its base, a LoRA to add as ADAPTER):
    the training chat format as TEMPLATE where peftkit has one, stop words, and the system prompt."""
    is_chatml, default_system = chatml_default_system(tokenizer)
    lines = ["# Ollama Modelfile written by peftkit. Create the model with: ollama create NAME -f Modelfile",
             *(from_lines or [f"FROM ./{gguf_name}"]), ""]
    if is_chatml:
        template = OLLAMA_CHATML_TOOLS_TEMPLATE if renders_tools_as_chatml(tokenizer) else OLLAMA_CHATML_TEMPLATE
        lines += [f"TEMPLATE {_quote(template)}", ""]
        stops = ["<|im_start|>", "<|im_end|>"]
    elif renders_as_plain(tokenizer):
        lines += [f"TEMPLATE {_quote(ollama_plain_template(tokenizer.eos_token))}", ""]
        stops = ["### User:"]
    elif (turns := turn_template(tokenizer)) is not None:
        lines += ["# The chat template's turns in Ollama's template language: conversations render as in training"
                  + (" (except that the chat template strips spaces and line breaks around each message, which Ollama's"
                     "\n# template language cannot: send messages without them)." if turns.trims else "."),
                  f"TEMPLATE {_quote(ollama_go_template(turns))}", ""]
        stops, default_system = stop_texts(tokenizer, turns), turns.default_system
    else:
        lines += [NO_OLLAMA_TEMPLATE, ""]
        stops = []
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    system = system_prompt or default_system
    if system:
        lines += ["", f"SYSTEM {_quote(system)}"]
    return "\n".join(lines) + "\n"
