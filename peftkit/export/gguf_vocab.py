"""The tokenizer half of a GGUF file: what llama.cpp needs to tokenize like the Hugging Face tokenizer.

llama.cpp's converter writes one of two vocabulary kinds for Llama-family models, and so do we:

- byte-level BPE (GPT-2, Llama-3, SmolLM, Qwen): `tokenizer.ggml.model = gpt2`, tokens, merges and
  the name of the pre-tokenizer regex llama.cpp splits text with;
- sentencepiece BPE with byte fallback (Llama-2, Mistral 7B, TinyLlama, Zephyr, Vicuna):
  `tokenizer.ggml.model = llama`, tokens with scores. llama.cpp repeatedly merges the adjacent pair
  whose result scores highest, and spells what no token covers as `<0xNN>` byte tokens.

A `tokenizer.json` keeps sentencepiece's scores only as the order of its merges (transformers made
them by sorting every split of every token by the token's score), so a token's score here is minus
the rank of the first merge that makes it: merging by highest score is then merging by rank, which
is what the Hugging Face tokenizer does. (gguf's `LlamaHfVocab` writes -1000 for every token, which
leaves llama.cpp merging left to right.)
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from peftkit.errors import ExportError
from peftkit.export.common import gguf_package

log = logging.getLogger(__name__)

VocabKind = Literal["gpt2", "llama"]
SPACE = "\u2581"  # sentencepiece's visible space
UNMERGED_SCORE = -1e9  # characters, bytes and special tokens: no merge makes them
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")


def vocab_kind(tokenizer_json: dict[str, Any]) -> VocabKind:
    """Which llama.cpp tokenizer reproduces this one, or an ExportError that says what to do instead."""
    model = tokenizer_json.get("model") or {}
    pre = json.dumps(tokenizer_json.get("pre_tokenizer"))
    normalizer = json.dumps(tokenizer_json.get("normalizer"), ensure_ascii=False)
    if model.get("type") == "BPE" and "ByteLevel" in pre:
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback") and ("Metaspace" in pre or SPACE in normalizer):
        return "llama"
    raise ExportError(
        "GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM / Qwen style) and sentencepiece BPE "
        f"with byte fallback (Llama-2 / Mistral style); this tokenizer is {model.get('type', 'unknown')}"
        f"{' without byte fallback' if model.get('type') == 'BPE' else ''}. Export with --format hf and convert that "
        "directory with llama.cpp's convert_hf_to_gguf.py"
    )


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def token_list(tokenizer: Any, vocab_size: int, kind: VocabKind = "gpt2") -> tuple[list[str], list[int]]:
    """Tokens by id and llama.cpp token types (get_vocab_base / _set_vocab_sentencepiece in convert_hf_to_gguf.py)."""
    types_ = gguf_package().TokenType
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    beyond = sorted(index for index in reverse if index >= vocab_size)
    if beyond:
        from peftkit.data.build import MISMATCH_ADVICE

        names = ", ".join(f"{reverse[i]!r} (id {i})" for i in beyond[:3]) + (", ..." if len(beyond) > 3 else "")
        raise ExportError(f"the tokenizer has {len(beyond)} token(s) beyond the model's {vocab_size} embedding rows "
                          f"({names}); a GGUF holds one vocabulary for both, so llama.cpp could not use them: "
                          f"{MISMATCH_ADVICE}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(int(types_.UNUSED))
            continue
        tokens.append(token)
        if kind == "llama" and token == tokenizer.unk_token:
            types.append(int(types_.UNKNOWN))
        elif index in added:
            special = added[index].special or _looks_special(token)
            types.append(int(types_.CONTROL if special else types_.USER_DEFINED))
        elif kind == "llama" and _BYTE_TOKEN.match(token):
            types.append(int(types_.BYTE))
        else:
            types.append(int(types_.NORMAL))
    return tokens, types


def merge_scores(tokens: list[str], merges: list[Any]) -> list[float]:
    """Per token: minus the rank of the first merge that produces it (`UNMERGED_SCORE` if none does)."""
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_rank.setdefault(left + right, rank)
    return [-float(first_rank[t]) if t in first_rank else UNMERGED_SCORE for t in tokens]


def _steps(tokenizer_json: dict[str, Any], block: Literal["pre_tokenizer", "normalizer"]) -> list[dict[str, Any]]:
    """The steps of tokenizer.json's pre-tokenizer or normalizer, a `Sequence` unwrapped."""
    part = tokenizer_json.get(block) or {}
    inner = "pretokenizers" if block == "pre_tokenizer" else "normalizers"
    return part.get(inner, [part]) if part.get("type") == "Sequence" else [part]


def adds_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the text gets a leading `▁` (sentencepiece's add_dummy_prefix): a Metaspace pre-tokenizer
    that prepends, or the older normalizer `Prepend("▁")`."""
    for part in _steps(tokenizer_json, "pre_tokenizer"):
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
    return any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in _steps(tokenizer_json, "normalizer"))


def _warn_unmatched_normalizer(tokenizer_json: dict[str, Any]) -> None:
    """llama.cpp's sentencepiece tokenizer only turns spaces into `▁`; say so if the tokenizer does more."""
    steps = _steps(tokenizer_json, "normalizer")
    extra = sorted({str(s.get("type")) for s in steps if s and s.get("type") not in ("Prepend", "Replace")})
    if extra:
        log.warning("llama.cpp does not apply this tokenizer's %s normalizer: text it would change tokenizes "
                    "differently there", ", ".join(extra))


def tokenizer_pre(tokenizer_json: dict[str, Any], source_pre: str | None) -> str:
    """llama.cpp's pre-tokenizer name (byte-level BPE): the one of the GGUF the base came from, else read off
    tokenizer.json."""
    if source_pre:  # earlier peftkit versions wrote GPT-2's as "gpt2", a name llama.cpp does not load
        return {"gpt2": "gpt-2"}.get(source_pre, source_pre)
    parts = _steps(tokenizer_json, "pre_tokenizer")
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (hyphenated); it refuses to load a file saying "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = str((parts[0].get("pattern") or {}).get("Regex", ""))
        if r"\p{N}{1,3}" in regex:  # Llama-3's split: digits in groups of up to three
            return "llama-bpe"
        if r"|\p{N}|" in regex:  # Qwen2/Qwen3's split: every digit alone
            return "qwen2"
    log.warning("Unknown pre-tokenizer %s; writing tokenizer.ggml.pre = default (check llama.cpp's tokenization)", kinds)
    return "default"


def _saved_tokenizer_json(tokenizer: Any, folder: str) -> dict[str, Any]:
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def check_tokenizer(tokenizer: Any) -> VocabKind:
    """The vocabulary kind a GGUF export of `tokenizer` gets; raises before any model is loaded if there is none."""
    with tempfile.TemporaryDirectory(prefix="peftkit-tok-") as tmp:
        return vocab_kind(_saved_tokenizer_json(tokenizer, tmp))


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, source_pre: str | None = None, *,
                  plain_text: bool = False) -> VocabKind:
    """Write the vocabulary, special token ids, BOS/space-prefix flags and chat template into `writer`.
    `plain_text`: the run trained plain-text rows (see gguf_adds_bos)."""
    gguf = gguf_package()
    with tempfile.TemporaryDirectory(prefix="peftkit-tok-") as tmp:
        tokenizer_json = _saved_tokenizer_json(tokenizer, tmp)
        kind = vocab_kind(tokenizer_json)
        tokens, types = token_list(tokenizer, vocab_size, kind)
        writer.add_tokenizer_model(kind)
        if kind == "gpt2":
            writer.add_tokenizer_pre(tokenizer_pre(tokenizer_json, source_pre))
        else:  # no pre-tokenizer name: llama.cpp's sentencepiece tokenizer has none (nor does its converter write one)
            _warn_unmatched_normalizer(tokenizer_json)
        writer.add_token_list(tokens)
        if kind == "llama":
            writer.add_token_scores(merge_scores(tokens, tokenizer_json["model"].get("merges") or []))
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=kind == "gpt2", n_vocab=vocab_size)
        if kind == "gpt2" and not special.merges:
            raise ExportError("the tokenizer has no BPE merges; GGUF needs them")
        special.add_special_token.pop("bos", None)  # written below, as training tokenized
        special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(gguf_adds_bos(tokenizer, plain_text=plain_text))
    writer.add_add_space_prefix(kind == "llama" and adds_space_prefix(tokenizer_json))
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    _add_end_of_turn(writer, tokenizer)
    return kind


def gguf_adds_bos(tokenizer: Any, *, plain_text: bool = False) -> bool:
    """`tokenizer.ggml.add_bos_token`: llama.cpp and Ollama put BOS before every prompt where it is true. Chat rows
    were trained with BOS only where the chat template writes it (where it does, llama.cpp's chat drops the
    template's copy, so there is one): a tokenizer that adds BOS by itself under a template that does not write it
    (Zephyr, TinyLlama-Chat, ChatML on Mistral) must not get one the model never saw. Plain-text rows (`plain_text`:
    the run trained some) and a tokenizer without a chat template take what the tokenizer does: text rows are
    tokenized with its own BOS."""
    from peftkit.data.chat import chat_prompt_has_bos
    from peftkit.models.load import adds_bos

    return adds_bos(tokenizer) and (plain_text or chat_prompt_has_bos(tokenizer) is not False)


def _add_end_of_turn(writer: Any, tokenizer: Any) -> None:
    """The token the chat template closes a reply with, where it is not EOS, as `tokenizer.ggml.eot_token_id`:
    llama.cpp stops generating on EOS, EOT and a list of token texts it knows (`<|im_end|>`, `<end_of_turn>`,
    ...); a template's own end-of-turn token outside that list would otherwise never end a reply there."""
    from peftkit.data.chat import end_of_turn_token_id

    end_of_turn = end_of_turn_token_id(tokenizer)  # None for a template that cannot render the probe: EOS alone
    if end_of_turn is not None and end_of_turn != tokenizer.eos_token_id:
        writer.add_eot_token_id(end_of_turn)
