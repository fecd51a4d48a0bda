"""`peftkit chat RUN_DIR`: a streaming REPL (or one answer with --prompt) over the tuned model.

With `tools` (function schemas, `--tools FILE`), the chat template shows them to the model as in training;
the user plays the tools: `/tool RESULT` answers the model's last call and lets it reply."""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

import torch

from peftkit.data.chat import Tools, check_tools_shown, generation_prompt, with_system_prompt
from peftkit.data.formats import Message
from peftkit.errors import PeftkitError
from peftkit.evaluate.generation import room_to_answer, stop_token_ids, text_position_limit


class ReplyStopped(KeyboardInterrupt):
    """Ctrl-C during a reply: generation has stopped; `text` is what the model had written (the REPL keeps it)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _stop_when(event: threading.Event) -> Any:
    """A stopping criterion that ends `generate` at its next token once `event` is set: an interrupted reply must
    not leave torch working in a thread while the interpreter exits (a C++ `terminate`, exit 134)."""
    from transformers import StoppingCriteria

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopOnEvent()


def stream_reply(
    model: Any, tokenizer: Any, messages: list[Message], *, max_new_tokens: int, out: TextIO, tools: Tools = None
) -> str:
    """Stream one reply to `out`. Ctrl-C (or SIGTERM's Terminated) stops generation before it propagates;
    a KeyboardInterrupt comes out as ReplyStopped with the text so far."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    prompt = generation_prompt(tokenizer, messages, tools)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    rows = model.get_input_embeddings().num_embeddings
    if int(inputs["input_ids"].max()) >= rows:
        from peftkit.data.build import MISMATCH_ADVICE

        beyond = sorted({t for t in inputs["input_ids"][0].tolist() if t >= rows})
        raise PeftkitError(f"the prompt has tokens the model has no embedding for ({', '.join(map(repr, tokenizer.convert_ids_to_tokens(beyond)))}, "
                           f"ids from {rows} on): {MISMATCH_ADVICE}")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    kwargs = dict(
        **inputs,
        max_new_tokens=room_to_answer(inputs["input_ids"].shape[1], max_new_tokens, text_position_limit(model)),
        do_sample=False,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_stop_when(stop)]),
    )
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            torch.inference_mode()(model.generate)(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which would wait on the streamer forever
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    pieces = []
    started = False  # leading blank space is held back: a reply of nothing else gets a note instead
    try:
        for piece in streamer:
            pieces.append(piece)
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                out.write(piece)
                out.flush()
    except BaseException as exc:  # Ctrl-C, Terminated: stop the generation thread before leaving
        stop.set()
        worker.join()
        if type(exc) is KeyboardInterrupt:
            raise ReplyStopped("".join(pieces).strip()) from exc
        raise
    worker.join()
    if failure:
        raise failure[0]
    raw = "".join(pieces)
    reply = raw.strip()
    if not reply:  # otherwise a blank line, which reads as a hang or a crash
        out.write("(no reply: the model wrote only blank space)" if raw else "(no reply: the model ended its turn at once)")
    out.write("\n")
    return reply


def chat(
    model: Any,
    tokenizer: Any,
    *,
    system_prompt: str | None,
    prompt: str | None = None,
    max_new_tokens: int = 256,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    tools: Tools = None,
) -> list[Message]:
    """One answer for `prompt`, or a REPL until EOF / `/exit`. `/reset` clears the history; with `tools`,
    `/tool RESULT` adds a tool result after the model's call and asks for its next reply. `stdin` / `out` default to
    the streams at call time (not at import: a captured stream may be closed by then)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if tools:
        check_tools_shown(tokenizer, tools, system_prompt)
    history: list[Message] = with_system_prompt([], system_prompt)
    if prompt is not None:
        history.append({"role": "user", "content": prompt})
        reply = stream_reply(model, tokenizer, history, max_new_tokens=max_new_tokens, out=out, tools=tools)
        return [*history, {"role": "assistant", "content": reply}]
    commands = ("/reset clears the conversation, /exit (or Ctrl-D) quits"
                + (", /tool RESULT answers its last tool call" if tools else ""))
    out.write(f"Chat with the tuned model. {commands}; Ctrl-C stops a reply.\n")
    while True:
        out.write("\nyou> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() in {"/exit", "/quit"}:
            out.write("\n")
            return history
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = with_system_prompt([], system_prompt)
            continue
        if text.startswith("/") and " " not in text:  # `/help`, a typo, or `/tool` without its result
            out.write(f"Commands: {commands}.\n")
            continue
        if tools and text.startswith("/tool "):
            history.append({"role": "tool", "content": text.removeprefix("/tool ").strip()})
        else:
            history.append({"role": "user", "content": text})
        out.write("bot> ")
        try:
            reply = stream_reply(model, tokenizer, history, max_new_tokens=max_new_tokens, out=out, tools=tools)
        except ReplyStopped as stopped:  # Ctrl-C during a reply stops that reply; at the prompt it quits
            out.write(" (stopped)\n")
            reply = stopped.text
        history.append({"role": "assistant", "content": reply})
