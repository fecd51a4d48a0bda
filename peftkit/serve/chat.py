"""`peftkit chat RUN_DIR`: a streaming REPL (or one answer with --prompt) over the tuned model.

With `tools` (function schemas, `--tools FILE`), the chat template shows them to the model as in training;
the user plays the tools: `/tool RESULT` answers the model's last call and lets it reply."""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from typing import Any, TextIO

import torch

from peftkit.data.chat import Tools, check_tools_shown, generation_prompt, with_system_prompt
from peftkit.data.formats import Message
from peftkit.errors import PeftkitError
from peftkit.evaluate.generation import INCOMPLETE, room_to_answer, stop_token_ids, text_position_limit
from peftkit.models.skeleton import input_embedding_rows, trained_context


class ReplyStopped(KeyboardInterrupt):
    """Ctrl-C during a reply: generation has stopped; `text` is what the model had written (the REPL keeps it)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# Lone surrogates other than surrogateescape's U+DC80..U+DCFF (which stand for undecodable bytes 0x80..0xFF).
_OTHER_SURROGATES = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def _valid_text(text: str, out: TextIO) -> str:
    """`text` with the bytes stdin or argv could not decode as UTF-8 (lone surrogates) as U+FFFD, and a note on
    `out` when there were any: the tokenizer refuses lone surrogates (a TypeError)."""
    valid = _OTHER_SURROGATES.sub("\ufffd", text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if valid != text:
        out.write("(bytes that are not valid UTF-8 were replaced with U+FFFD)\n")
    return valid


def _stop_when(event: threading.Event) -> Any:
    """A stopping criterion that ends `generate` at its next token once `event` is set: an interrupted reply must
    not leave torch working in a thread while the interpreter exits (a C++ `terminate`, exit 134). It also keeps
    the sequence lengths it sees (`first`, after the first new token) and the latest sequence (`last`)."""
    from transformers import StoppingCriteria

    class StopOnEvent(StoppingCriteria):
        first: int | None = None
        last: torch.Tensor | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if self.first is None:
                self.first = input_ids.shape[1]
            self.last = input_ids
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

        def used_all(self, budget: int, stop_ids: list[int]) -> bool:
            """Whether generation wrote `budget` tokens and the last one does not end the turn."""
            if self.first is None or self.last is None:
                return False
            return self.last.shape[1] - self.first + 1 >= budget and int(self.last[0, -1]) not in stop_ids

    return StopOnEvent()


def stream_reply(
    model: Any, tokenizer: Any, messages: list[Message], *, max_new_tokens: int, out: TextIO, tools: Tools = None,
    in_repl: bool = False,
) -> str:
    """Stream one reply to `out`. Ctrl-C (or SIGTERM's Terminated) stops generation before it propagates;
    a KeyboardInterrupt comes out as ReplyStopped with the text so far. `in_repl`: a note on a reply cut short by
    the model's position table offers /reset."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    stop = threading.Event()  # first: Ctrl-C may land anywhere below, before the worker starts too
    worker: threading.Thread | None = None
    pieces: list[str] = []
    started = False  # leading blank space is held back: a reply of nothing else gets a note instead
    try:
        prompt = generation_prompt(tokenizer, messages, tools)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        rows = input_embedding_rows(model)
        if int(inputs["input_ids"].max()) >= rows:
            from peftkit.data.build import MISMATCH_ADVICE

            beyond = sorted({t for t in inputs["input_ids"][0].tolist() if t >= rows})
            raise PeftkitError(f"the prompt has tokens the model has no embedding for ({', '.join(map(repr, tokenizer.convert_ids_to_tokens(beyond)))}, "
                               f"ids from {rows} on): {MISMATCH_ADVICE}")
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        positions = text_position_limit(model)
        budget = room_to_answer(inputs["input_ids"].shape[1], max_new_tokens, positions)
        context = trained_context(model) if positions is None else None  # computed positions (RoPE) run on, worse
        past_context = context is not None and inputs["input_ids"].shape[1] + budget > context
        stop_ids = stop_token_ids(model, tokenizer)
        criterion = _stop_when(stop)
        kwargs = dict(
            **inputs,
            max_new_tokens=budget,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([criterion]),
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
        held = ""  # the start of a character of several tokens (an emoji), shown once it is whole
        for piece in streamer:
            pieces.append(piece)
            whole = (held + piece).rstrip(INCOMPLETE)
            held, piece = (held + piece)[len(whole):], whole
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                out.write(piece)
                out.flush()
        worker.join()
        if failure:
            raise failure[0]
    except BaseException as exc:  # Ctrl-C, Terminated, a failure: stop the generation thread before leaving
        stop.set()
        if worker is not None and worker.ident is not None:  # not started: Ctrl-C came before (or in) start()
            worker.join()
        if type(exc) is KeyboardInterrupt:
            raise ReplyStopped("".join(pieces).strip()) from exc
        if started:  # the error (SIGTERM's "terminated" too) goes on a line of its own
            out.write("\n")
        raise
    raw = "".join(pieces).rstrip(INCOMPLETE)  # a reply cut inside a character: its start is not shown
    reply = raw.strip()
    ran_out = criterion.used_all(budget, stop_ids)
    if not reply:  # otherwise a blank line, which reads as a hang or a crash
        out.write("(no reply: the model wrote only blank space)" if raw else
                  f"(no reply: its {budget} new tokens decode to no text"
                  + ("; raise --max-new-tokens)" if budget >= max_new_tokens else ")") if ran_out else
                  "(no reply: the model ended its turn at once)")
    cut = budget < max_new_tokens and ran_out  # otherwise silently short
    if cut and in_repl:
        out.write(f" (cut short: the conversation fills the model's {positions} positions; /reset starts a new one)")
    out.write("\n")
    if cut and not in_repl:  # --prompt: stdout holds the reply alone (`> reply.txt`)
        sys.stderr.write(f"note: the reply was cut short: the prompt and reply fill the model's {positions} positions\n")
    if past_context:
        (out if in_repl else sys.stderr).write(
            f"note: the {'conversation' if in_repl else 'prompt'} runs past the {context} tokens the model was trained "
            f"on, where its replies degrade{'; /reset starts a new one' if in_repl else ''}\n")
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
    notes = out if prompt is None else sys.stderr  # --prompt: stdout holds the reply alone (`> reply.txt`)
    if stdin is sys.stdin and prompt is None and hasattr(stdin, "reconfigure"):
        with contextlib.suppress(ValueError, OSError):  # a UTF-8 locale's strict stdin would raise on a stray byte
            stdin.reconfigure(errors="surrogateescape")
    if system_prompt is not None:
        system_prompt = _valid_text(system_prompt, notes)
    if tools:
        check_tools_shown(tokenizer, tools, system_prompt)
    history: list[Message] = with_system_prompt([], system_prompt)
    if prompt is not None:
        history.append({"role": "user", "content": _valid_text(prompt, notes)})
        reply = stream_reply(model, tokenizer, history, max_new_tokens=max_new_tokens, out=out, tools=tools)
        return [*history, {"role": "assistant", "content": reply}]
    commands = ("/reset clears the conversation, /exit (or Ctrl-D) quits"
                + (", /tool RESULT answers its last tool call" if tools else ""))
    out.write(f"Chat with the tuned model. {commands}; Ctrl-C stops a reply.\n")
    while True:
        out.write("\nyou> ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return history
        text = _valid_text(line.strip(), out)
        if not text:
            continue
        command, *more = text.split(maxsplit=1)  # a command is a known first word; its rest may follow
        rest = more[0] if more else ""
        if command in {"/exit", "/quit"}:
            out.write("\n")
            return history
        if command == "/reset":
            history = with_system_prompt([], system_prompt)
            out.write("(new conversation)\n")
            continue
        typo = not rest and command.startswith("/") and "/" not in command[1:]  # `/rest`; `/etc/hosts` is a message
        if command == "/tool" and not tools:  # a tool result with no tools shown would reach the model as a question
            out.write("(no tools in this chat: /tool answers a tool call when chat starts with --tools FILE)\n")
            continue
        if command == "/help" or (command == "/tool" and not rest) or typo:
            out.write(f"Commands: {commands}.\n")
            continue
        if command == "/tool":
            history.append({"role": "tool", "content": rest})
        else:  # a message, also one that starts with a path (`/etc/hosts`)
            history.append({"role": "user", "content": text})
        out.write("bot> ")
        try:
            reply = stream_reply(model, tokenizer, history, max_new_tokens=max_new_tokens, out=out, tools=tools,
                                 in_repl=True)
        except ReplyStopped as stopped:  # Ctrl-C during a reply stops that reply; at the prompt it quits
            out.write(" (stopped)\n")
            reply = stopped.text
        except PeftkitError as exc:  # e.g. the history outgrew a learned position table: drop this turn, go on
            out.write(f"error: {exc}\n/reset starts a new conversation.\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
