"""An Ollama TEMPLATE (Go text/template) read off any turn-based Jinja chat template.

Ollama does not run the GGUF's Jinja template: without a TEMPLATE in the Modelfile it picks the closest template it
knows, which for a template peftkit changed (a default system prompt, a folded system message) or for a less common
family is a guess. Most chat templates are turn-based, though: the text between two turns depends only on their
roles, and the system prompt sits at one place before the first user message's text (a block of its own, or the start
of that message). Rendering probe conversations with marker contents reads off those fixed texts; the Go template
built from them (`ollama_go_template`), written out in Python (`render_like_ollama`), must then reproduce the Jinja
rendering of conversations of other shapes exactly, or there is no template (None) and the Modelfile says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

S, U1, A1, U2, A2, U3 = "SYSTEMPROBE", "USERPROBEONE", "ASSISTANTPROBEONE", "USERPROBETWO", "ASSISTANTPROBETWO", "USERPROBETHREE"


@dataclass(frozen=True)
class TurnTemplate:
    """The fixed texts of a turn-based chat template, without a leading BOS llama.cpp and Ollama add themselves."""

    before_system: str  # start of the text up to the system prompt
    after_system: str  # from the system prompt to the first user message's text
    start: str  # start of the text up to the first user message's text, without a system message
    user_to_assistant: str
    assistant_to_user: str
    after_last_user: str  # the user turn's closing and the generation prompt
    default_system: str | None  # what the template puts in the system prompt's place when there is none
    trims: bool = False  # the template strips spaces around message texts (`| trim`), which Go templates cannot


def _conversation(system: str | None, *turns: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _between(text: str, start: str, end: str | None) -> str | None:
    """The text after the only occurrence of `start` (or from the beginning, for "") and before the only
    occurrence of `end` (or to the end, for None); None where the markers are not so."""
    if (start and text.count(start) != 1) or (end and text.count(end) != 1):
        return None
    lo = text.index(start) + len(start) if start else 0
    hi = text.index(end) if end else len(text)
    return text[lo:hi] if lo <= hi else None


def read_turn_template(tokenizer: Any, bos: str | None = None) -> TurnTemplate | None:
    """The fixed texts of the tokenizer's chat template (as training renders it: a refused system message folded
    into the first user message), or None where it is not turn-based in this sense. `bos`: a BOS text to leave out
    at the start (llama.cpp and Ollama add BOS themselves when the GGUF says to)."""
    from jinja2.exceptions import TemplateError

    from peftkit.data.chat import render_chat

    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    try:
        two = render_chat(tokenizer, _conversation(S, U1, A1, U2), True)
        bare = render_chat(tokenizer, _conversation(None, U1, A1, U2), True)
    except (TemplateError, TypeError, ValueError):
        return None
    if bos:
        two, bare = two.removeprefix(bos), bare.removeprefix(bos)
    head, bare_start = _between(two, "", U1), _between(bare, "", U1)
    pieces = (head, bare_start, _between(two, U1, A1), _between(two, A1, U2), _between(two, U2, None))
    if None in pieces or head.count(S) != 1:
        return None
    head, bare_start, user_to_assistant, assistant_to_user, after_last_user = pieces
    before_system, after_system = head.split(S)
    default_system = None  # the template's own system prompt, where a conversation has none
    if len(bare_start) > len(head) - len(S) and bare_start.startswith(before_system) and bare_start.endswith(after_system):
        default_system = bare_start[len(before_system):len(bare_start) - len(after_system)]
    padded = render_chat(tokenizer, _conversation(None, f"  {U1} \n"), True)
    found = TurnTemplate(before_system, after_system, bare_start, user_to_assistant, assistant_to_user,
                         after_last_user, default_system, trims=f"  {U1} \n" not in padded)
    return found if _reproduces(tokenizer, found, bos) else None


def render_like_ollama(turns: TurnTemplate, system: str, messages: list[dict[str, str]]) -> str:
    """What `ollama_go_template(turns)` renders for `messages` (user and assistant turns, starting with a user one)
    with `.System` = `system`: the Go template written out in Python, checked against Go itself in tests."""
    out, turn = [turns.before_system + system + turns.after_system if system else turns.start], False
    for i, message in enumerate(messages):
        last = i == len(messages) - 1
        if message["role"] == "user":
            out += [turns.assistant_to_user if turn else "", message["content"], turns.after_last_user if last else ""]
            turn = True
        elif message["role"] == "assistant":
            out += [turns.user_to_assistant, message["content"]]
            turn = True
    return "".join(out)


def _reproduces(tokenizer: Any, turns: TurnTemplate, bos: str | None) -> bool:
    """Whether the texts render conversations of other shapes exactly as the template does."""
    from peftkit.data.chat import render_chat

    cases = [(S, (U1,)), (S, (U1, A1, U2, A2, U3)), ("Another\nsystem prompt.", (U1, A1, U2)), (None, (U1,)),
             (None, (U1, A1, U2, A2, U3))]
    for system, texts in cases:
        jinja = render_chat(tokenizer, _conversation(system, *texts), True)
        if bos:
            jinja = jinja.removeprefix(bos)
        if jinja != render_like_ollama(turns, system or "", _conversation(None, *texts)):
            return False
    return True


def _literal(text: str) -> str:
    """`text` as Go template output: plain text, except where it would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_go_template(turns: TurnTemplate) -> str:
    """The Modelfile TEMPLATE. Ollama passes the conversation as .Messages and the system messages (or the Modelfile's
    SYSTEM, when there are none) as .System. A conversation ending with an assistant message is left open, for the
    model to continue it."""
    return (
        f"{{{{ if .System }}}}{_literal(turns.before_system)}{{{{ .System }}}}{_literal(turns.after_system)}"
        f"{{{{ else }}}}{_literal(turns.start)}{{{{ end }}}}"
        "{{ $turn := 0 }}{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f'{{{{ if eq .Role "user" }}}}{{{{ if $turn }}}}{_literal(turns.assistant_to_user)}{{{{ end }}}}'
        f"{{{{ .Content }}}}{{{{ if $last }}}}{_literal(turns.after_last_user)}{{{{ end }}}}{{{{ $turn = 1 }}}}"
        f'{{{{ else if eq .Role "assistant" }}}}{_literal(turns.user_to_assistant)}{{{{ .Content }}}}{{{{ $turn = 1 }}}}'
        "{{ end }}{{ end }}"
    )


def stop_texts(tokenizer: Any, turns: TurnTemplate) -> list[str]:
    """Texts that end a reply: the special tokens between a reply and the next user message (`<|eot_id|>`,
    `<end_of_turn>`, ...; without special tokens its first word), and EOS."""
    from peftkit.data.chat import special_tokens_pattern

    pattern = special_tokens_pattern(tokenizer)
    found = pattern.findall(turns.assistant_to_user) if pattern else []
    stops: list[str] = []
    for text in (*found, tokenizer.eos_token or ""):
        if text and text not in stops:
            stops.append(text)
    if not found and turns.assistant_to_user.split():  # Modelfile stops are one-line texts
        stops.insert(0, turns.assistant_to_user.split()[0])
    return stops
