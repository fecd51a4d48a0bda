"""Replay prompts built from the domain's own vocabulary (`data.replay.domain_prompts`).

Domain tuning moves the general questions that share its words most ("How many hours are in a
day?" after a run about opening hours): the update learnt for "hours" inside the domain carries
over to "hours" everywhere. Replay of unrelated general prompts does not pin those words. These
prompts ask about the domain's frequent words in a general context, without the domain's system
prompt, and are answered by the base model itself, so the tuned model keeps their general use
while it learns their domain one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from peftkit.data.formats import Example

TEMPLATES = (
    'What does the word "{word}" mean?',
    'Use the word "{word}" in a sentence.',
    'Ask a general-knowledge question about "{word}" and answer it.',
)

_WORD = re.compile(r"[A-Za-z]+")
_STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each else ever every few for from further
get gets got had has have having he her here hers herself him himself his how however i if in into is it
its itself just let like me more most much must my myself need no nor not now of off on once only or
other our ours ourselves out over own please same say says she should so some such tell than thank thanks
that the their theirs them themselves then there these they this those through to too under until up upon
us very want was we well were what when where which while who whom whose why will with would yes yet you
your yours yourself yourselves hello hi okay sure still really maybe whats many anything something anyone someone
""".split())


def domain_words(examples: Sequence[Example], count: int) -> list[str]:
    """The `count` content words that most training conversations use in their user turns, in lower
    case as written (capitalised words are mostly the domain's names, which have no general use)."""
    frequency: Counter[str] = Counter()
    for example in examples:
        turns = [m.get("content", "") for m in example.messages or () if m.get("role") == "user"]
        words = {w for w in _WORD.findall(" ".join(map(str, turns))) if w.islower() and len(w) >= 4}
        frequency.update(words - _STOPWORDS)
    ranked = sorted(frequency.items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:count]]


def domain_vocabulary_prompts(examples: Sequence[Example], count: int) -> list[Example]:
    """`count` single-turn prompts, each template in turn over the most frequent domain words; the
    assistant turn is left empty for the base model to answer."""
    words = domain_words(examples, -(-count // len(TEMPLATES)))
    prompts = [template.format(word=word) for word in words for template in TEMPLATES][:count]
    return [
        Example(f"domain vocabulary ({prompt})", messages=({"role": "user", "content": prompt}, {"role": "assistant", "content": ""}))
        for prompt in prompts
    ]
