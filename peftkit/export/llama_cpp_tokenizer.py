"""llama.cpp's sentencepiece tokenizer (`llm_tokenizer_spm`, src/llama-vocab.cpp) in Python, over what a GGUF holds.

transformers rebuilds a GGUF's sentencepiece vocabulary its own way (merges regenerated from the
scores, its own prefix-space rules), so its tokenizer matching the original does not show that
llama.cpp's does. This runs llama.cpp's algorithm on the file's tokens, scores, token types and
`add_space_prefix`: special tokens are split out first; a space goes before the text at the start
and after every special token; spaces become `▁`; adjacent pieces merge highest score first (ties:
leftmost); a character no token covers goes out as its UTF-8 bytes (`<0xNN>` tokens).
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from peftkit.export.common import gguf_package

CONTROL, USER_DEFINED, UNKNOWN, BYTE = 3, 4, 2, 6  # gguf.TokenType


@dataclass(frozen=True)
class SpmVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool

    @classmethod
    def from_gguf(cls, path: Path) -> SpmVocab | None:
        """The vocabulary of a GGUF file, or None when it is not a sentencepiece (`llama`) one."""
        fields = gguf_package().GGUFReader(str(path)).fields

        def value(key: str, default: object = None) -> object:
            return fields[key].contents() if key in fields else default

        if value("tokenizer.ggml.model") != "llama":
            return None
        return cls(list(value("tokenizer.ggml.tokens")), list(value("tokenizer.ggml.scores")),
                   list(value("tokenizer.ggml.token_type")), bool(value("tokenizer.ggml.add_space_prefix", True)))

    # lookups derived once per vocabulary (a tokenizer call runs per prompt, a merge per text fragment)
    @cached_property
    def ids(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.tokens)}

    @cached_property
    def byte_ids(self) -> dict[int, int]:
        return {int(t[3:5], 16): i for i, (t, k) in enumerate(zip(self.tokens, self.types)) if k == BYTE}

    @cached_property
    def unknown_id(self) -> int:
        return self.types.index(UNKNOWN) if UNKNOWN in self.types else 0

    def specials(self, parse_special: bool) -> list[str]:
        """Tokens llama.cpp splits out of raw text, longest first."""
        kinds = (CONTROL, USER_DEFINED, UNKNOWN) if parse_special else (USER_DEFINED,)
        return sorted((t for t, k in zip(self.tokens, self.types) if k in kinds and t), key=len, reverse=True)


def tokenize(text: str, vocab: SpmVocab, *, parse_special: bool = True) -> list[int]:
    """Token ids as llama.cpp's `llama_tokenize(..., add_special=false, parse_special)` returns them."""
    specials = vocab.specials(parse_special)
    fragments = re.split(f"({'|'.join(map(re.escape, specials))})", text) if specials else [text]
    out: list[int] = []
    after_special = True  # the start of the text counts as after a special token
    for index, fragment in enumerate(fragments):
        if index % 2:  # the separators re.split keeps: special tokens
            out.append(vocab.ids[fragment])
            after_special = True
        elif fragment:
            out += _merge(" " + fragment if vocab.add_space_prefix and after_special else fragment, vocab)
            after_special = False
    return out


def _merge(text: str, vocab: SpmVocab) -> list[int]:
    ids = vocab.ids
    symbols = list(text.replace(" ", "\u2581"))  # one symbol per character
    alive = [True] * len(symbols)
    nxt = list(range(1, len(symbols) + 1))
    prv = list(range(-1, len(symbols) - 1))
    queue: list[tuple[float, int, int, str]] = []

    def add_pair(left: int, right: int) -> None:
        if 0 <= left and right < len(symbols) and (merged := symbols[left] + symbols[right]) in ids:
            heapq.heappush(queue, (-vocab.scores[ids[merged]], left, right, merged))

    for i in range(1, len(symbols)):
        add_pair(i - 1, i)
    while queue:
        _, left, right, merged = heapq.heappop(queue)
        if not (alive[left] and alive[right]) or symbols[left] + symbols[right] != merged:
            continue  # stale: one side has merged with something else since
        symbols[left], alive[right] = merged, False
        nxt[left] = nxt[right]
        if nxt[left] < len(symbols):
            prv[nxt[left]] = left
        add_pair(prv[left], left)
        add_pair(left, nxt[left])
    out: list[int] = []
    index = 0
    while index < len(symbols):
        piece = symbols[index]
        out += [ids[piece]] if piece in ids else [vocab.byte_ids.get(b, vocab.unknown_id) for b in piece.encode("utf-8")]
        index = nxt[index]
    return out
