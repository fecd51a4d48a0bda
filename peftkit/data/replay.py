"""Replay mixing against catastrophic forgetting: general conversations mixed into a domain run.

The replay answers can come from the file as written, or from the base model itself
(self-distilled replay, as in self-synthesized rehearsal): training then pulls the model back
towards its *own* general behaviour instead of towards another model's answers, which is what
"do not forget" means. Unfinished generations are dropped, as training on a cut-off answer
teaches the model to stop mid-sentence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Protocol

from peftkit.data.formats import ROLES_ADVICE, Example, load_examples, with_columns_advice_replaced
from peftkit.errors import DataError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


class ReplayAnswerer(Protocol):
    """Rewrites the last assistant turn of each replay conversation (and may drop some). `check_known=False`: keep
    answers whatever the written one says (contrast rows, whose written answers are the domain's by design)."""

    def __call__(self, examples: list[Example], *, check_known: bool = True) -> list[Example]: ...


def replay_path(path: str) -> Path:
    """`builtin:NAME` -> the packaged `NAME` replay set; anything else is a file path."""
    if path.startswith(BUILTIN_PREFIX):
        from importlib import resources

        name = path.removeprefix(BUILTIN_PREFIX)
        found = Path(str(resources.files("peftkit.resources") / f"replay_{name}.jsonl"))
        if not found.is_file():
            raise DataError(f"data.replay.path: there is no built-in replay set {name!r}; use `builtin:general` or a file")
        return found
    return Path(path)


def answers_from_base(path: str, answers: str) -> bool:
    """`auto`: regenerate the built-in sets' answers with the base model, keep a user file's as written."""
    return answers == "base" or (answers == "auto" and path.startswith(BUILTIN_PREFIX))


def sample_replay(n_train: int, replay: list[Example], ratio: float, seed: int) -> list[Example]:
    """round(ratio * n_train) replay examples, drawn without repeats until the pool is used up."""
    wanted = round(n_train * ratio)
    if n_train and not wanted:
        raise DataError(f"data.replay: ratio {ratio:g} of {n_train} training examples rounds to no replay example, so "
                        f"the run would train without the replay the recipe asks for; set data.replay.ratio to at "
                        f"least {1 / n_train:.2g} (one replay example), or remove data.replay")
    rng = random.Random(seed + 1)
    picked: list[Example] = []
    while len(picked) < wanted:
        pool = list(replay)
        rng.shuffle(pool)
        picked.extend(pool[: wanted - len(picked)])
    return picked


REPLAY_LAYOUT_ADVICE = ("a replay file must be in one of those layouts as written (data.columns and data.format apply "
                        "to data.train and data.eval only), so rename the replay file's fields")
"""Follows the list of layouts in the unrecognised-record error, in place of its data.columns advice."""


ANSWER_SLOT = "(answered by the base model before training)"
"""The assistant turn given to a replay prompt without an answer when the base model answers the replay prompts:
the answerer replaces it before training (a data preview shows it as written)."""

QUESTION_FIELDS = {"prompt": "completion", "instruction": "output", "question": "answer", "query": "response"}
"""A one-turn record's prompt field -> the answer field it gets when it has no answer of its own."""
ANSWER_FIELDS = ("completion", "output", "answer", "response")


def with_answer_slot(record: Any) -> Any | None:
    """`record` with an answer to fill in when it ends with a question: a conversation whose last turn is the user's
    or a tool's, or ends with an empty reply; a `prompt`, `instruction`, `question` or `query` whose answer field is
    absent, null or empty. None for every other record."""
    key = _turns_key(record)
    turns = record if isinstance(record, list) else record.get(key) if key else None
    if isinstance(turns, list):
        last = turns[-1] if turns else None
        if not isinstance(last, dict):
            return None
        slot = {"from": "gpt", "value": ANSWER_SLOT} if "from" in last else {"role": "assistant", "content": ANSWER_SLOT}
        if _role(last) in ("user", "tool"):
            answered = [*turns, slot]
        elif _role(last) == "assistant" and _empty(last.get("content", last.get("value"))) and not last.get("tool_calls"):
            answered = [*turns[:-1], slot]
        else:
            return None
        return answered if isinstance(record, list) else {**record, key: answered}
    if not isinstance(record, dict) or any(not _empty(record.get(field)) for field in ANSWER_FIELDS):
        return None
    question = next((q for q in QUESTION_FIELDS if isinstance(record.get(q), (str, list)) and record[q]), None)
    if question is None:
        return None
    answer: Any = [{"role": "assistant", "content": ANSWER_SLOT}] if isinstance(record[question], list) else ANSWER_SLOT
    return {**record, QUESTION_FIELDS[question]: answer}


def _empty(answer: Any) -> bool:
    return answer is None or answer == [] or (isinstance(answer, str) and not answer.strip())


def _turns_key(record: Any) -> str | None:
    """The field holding a record's conversation (`messages`, ShareGPT's `conversations` / `conversation`), if any."""
    return next((k for k in ("messages", "conversations", "conversation") if k in record), None) \
        if isinstance(record, dict) else None


def _role(turn: dict[str, Any]) -> str | None:
    from peftkit.data.columns import ROLE_ALIASES

    return ROLE_ALIASES.get(str(turn.get("role", turn.get("from"))).lower())


def _answers_nothing(record: Any) -> bool:
    """A question with no answer anywhere in it (a conversation with earlier assistant turns still trains on them)."""
    key = _turns_key(record)
    turns = record if isinstance(record, list) else record.get(key) if key else None
    return not isinstance(turns, list) or not any(isinstance(t, dict) and _role(t) == "assistant" for t in turns)


def load_replay(path: str, answers: str = "auto", *, known_only: bool = False) -> list[Example]:
    """The replay set, each record's format detected (`data.format` / `data.columns` describe train and eval).

    When the base model answers the replay prompts (`answers_from_base`), a record may be the prompt alone: it gets
    an answer slot (`ANSWER_SLOT`) for the base model's answer. With written answers, such a record is refused."""
    from_base = answers_from_base(path, answers)

    def prepare(record: Any, where: str) -> Any:
        slotted = with_answer_slot(record)
        if slotted is None:
            return record
        if from_base:
            return slotted
        if _answers_nothing(record):
            raise DataError(f"{where}: a replay prompt without an answer, and `data.replay.answers: {answers}` trains "
                            "on the written answers; add each record's answer, or set `data.replay.answers: base` to "
                            "have the base model answer the prompts")
        return record

    try:
        examples = load_examples(replay_path(path), prepare=prepare)
    except DataError as exc:  # the generic advice would point at data.columns, which never reads a replay file
        message = with_columns_advice_replaced(str(exc), REPLAY_LAYOUT_ADVICE)
        lines = [line if (at := line.find(ROLES_ADVICE)) < 0 else  # the advice runs to the end of its record's line
                 line[:at] + " (data.columns.roles does not apply to replay files)" for line in message.split("\n")]
        raise DataError("\n".join(lines)) from None
    unanswered = [e.where for e in examples if e.messages and e.messages[-1]["content"] == ANSWER_SLOT]
    if known_only and unanswered:
        raise DataError(f"data.replay.known_only keeps the base model's answers that agree with the written ones, but "
                        f"{len(unanswered)} of the {len(examples)} replay records have no written answer (first: "
                        f"{unanswered[0]}); add their answers, or remove known_only")
    return examples


def shared_cache_path(model: Any, tokenizer: Any, max_new_tokens: int) -> Path:
    """Where answers of this exact base model (name, revision, quantization, chat template, limit) are kept
    across runs, under `$PEFTKIT_HOME/replay/`: a second run on the same base skips the generation."""
    from peftkit.models.registry import peftkit_home

    config = model.config
    name = str(getattr(config, "_name_or_path", ""))
    config_file = Path(name) / "config.json"
    identity = {
        "model": name,
        "commit": getattr(config, "_commit_hash", None),
        "modified": config_file.stat().st_mtime_ns if config_file.is_file() else None,
        "quantization": str(getattr(config, "quantization_config", None)),
        "dtype": str(next(model.parameters()).dtype),
        "chat_template": hashlib.sha256(str(getattr(tokenizer, "chat_template", "")).encode()).hexdigest(),
        "max_new_tokens": max_new_tokens,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return peftkit_home() / "replay" / f"{digest}.jsonl"


def _read_answers(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None or not path.is_file():
        return {}
    records = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {r["key"]: r for r in records}


def base_model_answerer(model: Any, tokenizer: Any, *, cache: Path | None, shared_cache: Path | None = None,
                        write_caches: bool = True, max_new_tokens: int = 256, batch_size: int = 16,
                        known_only: bool = False) -> ReplayAnswerer:
    """An answerer that asks `model` (the base, before any adapter) for greedy answers.

    Answers are kept in `cache` (the run's own JSONL keyed by the prompt turns: a resumed run
    trains on exactly the same replay rows) and in `shared_cache` (see `shared_cache_path`).
    Every process reads both; only the one with `write_caches` (global rank 0) writes them, so
    worker processes reuse the answers a run or an earlier run already has.
    `known_only`: drop the answers that disagree with the written one (`states_the_facts_of`).
    """

    def answer(examples: list[Example], *, check_known: bool = True) -> list[Example]:
        from peftkit.evaluate.generation import generate_replies

        known = {**_read_answers(shared_cache), **_read_answers(cache)}
        prompts = {_key(e): e.messages[:-1] for e in examples if _answerable(e)}
        tools = {_key(e): e.tools for e in examples if _answerable(e)}  # the base answers seeing the schemas
        missing = [k for k in dict.fromkeys(prompts) if k not in known]
        if missing:
            log.info("Generating the base model's answers to %d replay prompts", len(missing))
            replies = generate_replies(model, tokenizer, [prompts[k] for k in missing], max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, progress="replay answers", tools=[tools[k] for k in missing])
            for key, reply in zip(missing, replies):
                known[key] = {"key": key, "reply": reply.text, "finished": reply.finished}
            if shared_cache is not None and write_caches:
                try:
                    _write_answers(shared_cache, known)
                except OSError as exc:  # a read-only home only costs the next run the generation
                    log.warning("could not keep the replay answers in %s (%s)", shared_cache, exc.strerror)
        if cache is not None and write_caches:
            # what the run used so far stays: the replay and contrast rows are answered in two calls
            _write_answers(cache, {**_read_answers(cache), **{k: known[k] for k in prompts}})
        kept, unfinished, wrong = [], 0, 0
        for e in examples:  # rows without a final assistant turn to regenerate are kept as written
            if not _answerable(e):
                kept.append(e)
                continue
            reply = known[_key(e)]
            if not (reply["finished"] and reply["reply"]):
                unfinished += 1
            elif known_only and check_known and not states_the_facts_of(e.messages[-1]["content"], reply["reply"], _prompt_text(e)):
                wrong += 1
            else:
                answered = (*e.messages[:-1], {"role": "assistant", "content": reply["reply"]})
                kept.append(dataclasses.replace(e, messages=answered))  # its `tools` kept: trained with the schemas
        if unfinished:
            log.warning("%d of %d replay answers did not finish within %d tokens and were left out",
                        unfinished, len(examples), max_new_tokens)
        if wrong:
            log.info("%d of %d replay answers disagree with the written answer and were left out (known_only)",
                     wrong, len(examples))
        if examples and not kept:  # the recipe asks for replay: training without it is not what it asked for
            raise DataError(no_replay_left(len(examples), unfinished, wrong, max_new_tokens))
        return kept

    return answer


def no_replay_left(total: int, unfinished: int, wrong: int, max_new_tokens: int) -> str:
    """Why no base-model replay answer is left, and what helps: a higher limit only up to data.max_seq_len,
    past which rows are cut anyway."""
    why = [f"{unfinished} did not finish within data.replay.max_answer_tokens={max_new_tokens} tokens"]
    why = why if unfinished else []
    why += [f"{wrong} disagree with the written answer (known_only)"] * bool(wrong)
    fixes = ["drop data.replay.known_only"] * bool(wrong)
    if unfinished:
        fixes += ["raise data.replay.max_answer_tokens (that helps up to data.max_seq_len only: longer rows are cut "
                  "there); if it is that high already, the base model does not end its answers: set "
                  "`data.replay.answers: dataset` to train on the replay set's written answers (without known_only "
                  "and contrast)"]
    return (f"data.replay: none of the base model's {total} replay answers is usable ({'; '.join(why)}), so the run "
            f"would train without the replay the recipe asks for; {', or '.join(fixes)}; or remove data.replay")


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {"thirty": 30, "forty": 40, "fifty": 50, "hundred": 100}
_WORD_INSIDE_A_SENTENCE = re.compile(r"(?<![.!?:]\s)(?<!^)\b[^\W\d_]{2,}")


def _names(text: str) -> set[str]:
    """Capitalised words that do not start a sentence (`Zürich`, `Łódź` as well as `Bern`): names, in languages
    that capitalise them."""
    return {w for w in _WORD_INSIDE_A_SENTENCE.findall(text) if w[0].isupper() and w[1:].islower()}


def states_the_facts_of(written: str, reply: str, prompt: str = "") -> bool:
    """Whether `reply` agrees with the reference answer `written` on the facts the prompt does not give
    away: all of its numbers, and more than half of its names. Answers without either agree."""
    def numbers(text: str) -> set[str]:
        words = {str(_NUMBER_WORDS[w]) for w in re.findall(r"[a-z]+", text.lower()) if w in _NUMBER_WORDS}
        return {n.replace(",", "") for n in _NUMBER.findall(text)} | words

    needed = numbers(written) - numbers(prompt)
    if not needed <= numbers(reply):
        return False
    asked = prompt.lower()
    names = {name for name in _names(written.strip()) if name.lower() not in asked}
    said = reply.lower()
    return not names or sum(name.lower() in said for name in names) * 2 > len(names)


def _prompt_text(example: Example) -> str:
    return " ".join(str(m.get("content", "")) for m in example.messages[:-1])


def _write_answers(path: Path, answers: dict[str, dict[str, Any]]) -> None:
    from peftkit.utils.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in answers.values()))


def _key(example: Example) -> str:
    """The cache key of a replay prompt: its turns before the answer, and its tool schemas when it has some."""
    prompt = list(example.messages[:-1]) if example.messages else example.text
    return json.dumps({"prompt": prompt, "tools": list(example.tools)} if example.tools else prompt, sort_keys=True)


def _answerable(example: Example) -> bool:
    return bool(example.messages) and example.messages[-1]["role"] == "assistant"
