"""Matching a reply against the key facts it must state: text normalised as facts are compared (`matchable`),
and a fact found only where it stands whole (a word or number, not part of a longer one)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence


def matchable(text: str) -> str:
    """Text as key facts are matched: Unicode-normalised (NFKC: full-width digits and ligatures are plain ones,
    composed and decomposed accents agree; super- and subscripts are kept, so `5²` does not match `52`),
    case-folded (`ß` matches `SS`, `İ` matches `I`), with typographic apostrophes and dashes as the plain ones,
    thousands separators dropped (`1,200` matches `1200`), clock times with am / pm written one way (`9am`,
    `9 a.m.`, `9 AM` and `9:00 am` are all `9:00 am`, which `9 am`, `9` and `9:00` are found in) and runs of
    whitespace as one space."""
    kept = "".join(ch if unicodedata.decomposition(ch).startswith(("<super>", "<sub>")) else
                   unicodedata.normalize("NFKC", ch) for ch in text)
    folded = unicodedata.normalize("NFC", kept).casefold().replace("i\u0307", "i").translate(_PLAIN_PUNCTUATION)
    folded = _CLOCK_TIME.sub(lambda m: f"{m[1]}:{m[2] or '00'} {m[3]}m", _THOUSANDS.sub("", folded))
    return " ".join(folded.split())


_PLAIN_PUNCTUATION = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u2010": "-", "\u2011": "-",
                                    "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CLOCK_TIME = re.compile(r"\b(\d{1,2})(?::(\d\d))?\s*([ap])\.?\s?m\b\.?")


def whole_fact_spans(text: str, key_facts: str | Sequence[str]) -> list[tuple[int, int]]:
    """Where the key facts stand whole in `matchable(text)` (start, end), in order of start."""
    facts = (key_facts,) if isinstance(key_facts, str) else key_facts
    text = matchable(text)
    spans: set[tuple[int, int]] = set()
    for fact in filter(None, map(matchable, facts)):
        start = text.find(fact)
        while start >= 0:
            end = start + len(fact)
            if not _glued_before(text, start, fact[0]) and not _glued_after(text, end, fact):
                spans.add((start, end))
            start = text.find(fact, start + 1)
    return sorted(spans)


_NUMBER_JOINERS = ".,:"
"""A digit, one of these and a digit are one number: `4` is not found in `4.5`, `1` in `1,5` nor `9` in `9:30`
(`9:00` does hold `9`)."""


def _kind(ch: str) -> str | None:
    """`letter` or `digit` for characters a word or number is made of; None for the rest, and for letters of
    scripts written without spaces between words (there a fact needs no boundary)."""
    if ch.isdigit():
        return "digit"
    if ch.isalpha() or unicodedata.category(ch).startswith("M"):  # M: combining accents, Indic vowel signs
        return None if _unspaced_script(ch) else "letter"
    return None


def _unspaced_script(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith(_UNSPACED_SCRIPTS)


_UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA", "HANGUL", "IDEOGRAPHIC", "BOPOMOFO",
                     "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN", "YI ")


def _glued_before(text: str, start: int, first: str) -> bool:
    """Whether the fact's first character continues a word or number that starts before it, of the same kind
    (letter after letter, digit after digit): `14` and `4.4` do not hold `4`, but `x4` and `5km` hold `4` and `km`.
    Leading zeros are no other number: `09:00` holds `9:00`."""
    kind = _kind(first)
    if kind is None or start == 0:
        return False
    before = text[start - 1]
    if kind == "digit" and _LEADING_ZEROS.search(text, 0, start):
        return False
    if _kind(before) == kind:
        return True
    if kind == "digit" and before == "-" and (start < 2 or not text[start - 2].isalnum()):
        return True  # a minus sign: `-5` is not 5 (`9-5` and `555-0187` are a range and a phone number)
    return kind == "digit" and before in _NUMBER_JOINERS and start >= 2 and text[start - 2].isdigit()


def _glued_after(text: str, end: int, fact: str) -> bool:
    """Whether the fact's last character runs on into more of its word or number of the same kind (`4` in `45`
    or `4.5`); a unit after a number (`5km`, `1990s`) does not, nor do zeros that leave its value as it is
    (`$14` in `$14.00`, `12.5` in `12.50`)."""
    kind = _kind(fact[-1])
    if kind is None or end == len(text):
        return False
    if kind == "digit" and (_ZERO_DECIMALS.match(text, end) or ("." in fact and _TRAILING_ZEROS.match(text, end))
                            or (":" not in fact and _FULL_HOUR.match(text, end))):
        return False
    if _kind(text[end]) == kind:
        return True
    return kind == "digit" and text[end] in _NUMBER_JOINERS and end + 1 < len(text) and text[end + 1].isdigit()


_LEADING_ZEROS = re.compile(r"(?<![\d.,])0+$")
"""Zeros that open a number, right before the fact (`searched` up to its start)."""
_ZERO_DECIMALS = re.compile(r"\.0+(?!\d)")
_FULL_HOUR = re.compile(r":00(?!\d)")
_TRAILING_ZEROS = re.compile(r"0+(?!\d)")
