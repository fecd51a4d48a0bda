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
    thousands separators dropped (`1,200`, `1 200` with a no-break space, and Arabic `١٬٢٠٠` match `1200`), digits
    of every script as ASCII ones (`٣` and `۳` match `3`; the Arabic decimal separator is `.`), clock times with
    am / pm written one way (`9am`, `9 a.m.`, `9 AM` and `9:00 am` are all `9:00 am`, which `9 am`, `9` and `9:00`
    are found in), optional marks dropped (Arabic vowel marks and shadda, Hebrew points, stress marks on Cyrillic:
    `عمّان` matches `عمان`) and runs of whitespace as one space. Applied again it changes nothing (the steps are
    repeated until they do not: a mark removed can join a number, a ligature expanded can bring out a mark), so
    text already made matchable can be matched again."""
    for _ in range(8):
        again = _normalised_once(text)
        if again == text:
            break
        text = again
    return text


def _normalised_once(text: str) -> str:
    text = _SPACE_THOUSANDS.sub("", "".join(_ascii_digit(ch) for ch in text)).replace("\u066b", ".")
    kept = "".join(ch if unicodedata.decomposition(ch).startswith(("<super>", "<sub>")) else
                   unicodedata.normalize("NFKC", ch) for ch in text)  # first: presentation forms carry marks
    kept = _CYRILLIC_STRESS.sub("", _OPTIONAL_MARKS.sub("", unicodedata.normalize("NFD", kept)))
    folded = _DOTTED_I.sub("i", unicodedata.normalize("NFC", kept).casefold())
    folded = unicodedata.normalize("NFC", folded).translate(_PLAIN_PUNCTUATION)  # case folding may decompose
    folded = _CLOCK_TIME.sub(lambda m: f"{m[1]}:{m[2] or '00'} {m[3]}m", _THOUSANDS.sub("", folded))
    return " ".join(folded.split())


def _ascii_digit(ch: str) -> str:
    """A decimal digit of any script (Arabic-Indic, Devanagari, ...) as its ASCII digit; super- and subscripts
    are not decimal digits and stay as they are."""
    return str(unicodedata.decimal(ch)) if ch.isdecimal() and not ch.isascii() else ch


_OPTIONAL_MARKS = re.compile("[\u0610-\u061a\u064b-\u0652\u0656-\u065f\u0670\u06d6-\u06dc\u06df-\u06e4"
                             "\u06e7\u06e8\u06ea-\u06ed\u0640\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7]")
"""Marks written or left out at will (in decomposed text): Arabic vowel marks, shadda, Quranic signs and the
tatweel stretch, Hebrew points and cantillation. Not hamza and madda (U+0653-0655): `سئل` is not `سيل`."""
_CYRILLIC_STRESS = re.compile("(?<=[\u0430\u0435\u0438\u043e\u0443\u044b\u044d\u044e\u044f\u0410\u0415"
                              "\u0418\u041e\u0423\u042b\u042d\u042e\u042f])\u0301+")
"""An acute over a Cyrillic vowel (decomposed text): a stress mark, a reading aid. Not the acute of Macedonian
`ѓ` / `ќ` (consonants) nor Bulgarian `ѝ` (a grave)."""
_SPACE_THOUSANDS = re.compile("(?<=\\d)[\u00a0\u202f\u2009\u066c](?=\\d{3}(?!\\d))")
"""Thousands separators other than the comma: no-break, narrow no-break and thin spaces (French, Russian, ISO)
and the Arabic one. A plain space is not one: `1 200` may be two numbers."""

_DOTTED_I = re.compile("i\u0307+")
"""`İ` case-folded (an `i` and a combining dot): the `i` of `I`."""
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
            if not _glued_before(text, start, fact) and not _glued_after(text, end, fact):
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


def _glued_before(text: str, start: int, fact: str) -> bool:
    """Whether the fact's first character continues a word or number that starts before it, of the same kind
    (letter after letter, digit after digit): `14` and `4.4` do not hold `4`, but `x4` and `5km` hold `4` and `km`.
    Leading zeros are no other number: `09:00` holds `9:00`."""
    kind = _kind(fact[0])
    if kind is None or start == 0:
        return False
    before = text[start - 1]
    if kind == "digit" and _LEADING_ZEROS.search(text, 0, start):
        return False
    if _kind(before) == kind:
        return not _only_prefixes(text, start, fact)
    if kind == "digit" and before == "-" and (start < 2 or not text[start - 2].isalnum()):
        return True  # a minus sign: `-5` is not 5 (`9-5` and `555-0187` are a range and a phone number)
    return kind == "digit" and before in _NUMBER_JOINERS and start >= 2 and text[start - 2].isdigit()


def _only_prefixes(text: str, start: int, fact: str) -> bool:
    """Whether the letters glued before an Arabic or Hebrew fact are prefixes written onto the next word: `بالقاهرة`
    (bi- + al-Qahira) holds `القاهرة`, `المكتبة` holds `مكتبة`, `בתל אביב` holds `תל אביב`. Narrow, since the
    prefix letters begin many words: in Arabic the article al- (with wa / fa / bi / ka / li before it), or one of
    those before a fact that has the article itself (`كمال` does not hold `مال`); in Hebrew one or two of ve, be,
    ke, le, mi, she, ha before a fact of three letters or more (`מים` does not hold `ים`)."""
    script = unicodedata.name(fact[0], "").split(" ", 1)[0]
    word_start = start
    while word_start > 0 and _kind(text[word_start - 1]) == "letter":
        word_start -= 1
    prefix = text[word_start:start]
    if script == "ARABIC":
        return (_ARABIC_ARTICLE.fullmatch(prefix) is not None
                or (fact.startswith("\u0627\u0644") and _ARABIC_PROCLITICS.fullmatch(prefix) is not None))
    if script == "HEBREW":
        return len(fact.replace(" ", "")) >= 3 and _HEBREW_PREFIXES.fullmatch(prefix) is not None
    return False


_ARABIC_PROCLITICS = re.compile("[\u0648\u0641]?[\u0628\u0643\u0644]?")
"""wa- / fa- (and), then bi- (in), ka- (like) or li- (for)."""
_ARABIC_ARTICLE = re.compile("[\u0648\u0641]?[\u0628\u0643\u0644]?\u0627\u0644")
"""The article al-, with the proclitics before it."""
_HEBREW_PREFIXES = re.compile("[\u05d5\u05d1\u05db\u05dc\u05de\u05e9\u05d4]{1,2}")


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


_LEADING_ZEROS = re.compile(r"(?<![\d.,:])0+$")
"""Zeros that open a number, right before the fact (`searched` up to its start); not a time's minutes (`10:05`)."""
_ZERO_DECIMALS = re.compile(r"\.0+(?!\d)")
_FULL_HOUR = re.compile(r":00(?!\d)")
_TRAILING_ZEROS = re.compile(r"0+(?!\d)")
