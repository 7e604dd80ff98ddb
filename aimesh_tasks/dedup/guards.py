"""What sentence embeddings are blind to, checked before a semantic candidate may hit (pure).

MiniLM scores "Paris to London" against "London to Paris" at 0.998 and "allergic" against
"not allergic" at 0.97: a cosine above any threshold only *proposes* a cached answer.
`compatible(a, b)` then rejects the pair if any check finds a difference of meaning that a
change of a few characters makes:

| check       | rejects                                         | example                          |
|-------------|-------------------------------------------------|----------------------------------|
| numbers     | another multiset of numbers ("ten" = 10)        | order 48213 / order 48231        |
| units       | another set of units or currencies              | 5 minutes / 5 hours, USD / GBP   |
| quotes      | other quoted text                               | "thank you" / "good night"       |
| entities    | other capitalised words, acronyms, identifiers  | Austria / Australia              |
| negation    | another count of negations, un-/in- prefixes    | allergic / not allergic          |
| direction   | the ends of to/from/than/before/by swapped      | Paris to London / London to Paris|
| opposites   | words from opposite classes                     | ascending / descending           |
| time        | another relative time                           | today / tomorrow                 |
| swap        | the same sentence with a content word swapped   | laptop for gaming / programming  |

Every check is symmetric, runs in microseconds and errs on the side of a miss: a
rejected paraphrase costs one upstream call; a wrong hit is a wrong answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache

from aimesh_tasks.dedup import lexicon as lx

_TOKEN = re.compile(r"\d+(?:[.,:]\d+)*(?:st|nd|rd|th)?|[A-Za-z_][A-Za-z0-9_]*(?:'[A-Za-z]+)?"
                    r"|[$€£¥%]|[.!?;:\"“”]")
_QUOTED = re.compile(r"[\"“”]([^\"“”]{1,200})[\"“”]")
_SYMBOL_UNITS = {"$": "usd", "€": "eur", "£": "gbp", "¥": "jpy", "%": "percent"}
_PRE = ((re.compile(r"°\s*C\b"), " celsius "), (re.compile(r"°\s*F\b"), " fahrenheit "),
        (re.compile(r"\bkm/h\b", re.I), " kmh "), (re.compile(r"\bm/s\b"), " mps "),
        (re.compile(r"(\d)-(?=[A-Za-z])"), r"\1 "), (re.compile(r"’"), "'"))


@dataclass(frozen=True, slots=True)
class Token:
    """One word, number or symbol: its text as written, lowercased, and sentence position."""

    raw: str
    low: str
    starts_sentence: bool


@dataclass(frozen=True, slots=True)
class Features:
    """Everything the checks compare, extracted once per text."""

    words: tuple[str, ...]
    numbers: tuple[str, ...]
    units: frozenset[str]
    quotes: tuple[str, ...]
    entities: frozenset[str]
    negations: int
    roles: dict[str, frozenset[str]]
    classes: frozenset[tuple[int, int]]
    times: frozenset[str]


def tokenize(text: str) -> list[Token]:
    """Words, numbers and symbols; contractions split ("don't" -> do n't, "what's" -> what)."""
    for pattern, replacement in _PRE:
        text = pattern.sub(replacement, text)
    tokens: list[Token] = []
    start = True
    for raw in _TOKEN.findall(text):
        if raw in ".!?;:\"“”":
            start = True
            continue
        for part in _split_contraction(raw):
            tokens.append(Token(part, part.lower(), start))
            start = False
    return tokens


def _split_contraction(raw: str) -> list[str]:
    """'don't' -> ['do', "n't"]; "can't" -> ['can', "n't"]; "Germany's" -> ['Germany']."""
    low = raw.lower()
    if low in lx.IRREGULAR_NEGATIONS:
        return [lx.IRREGULAR_NEGATIONS[low], "n't"]
    if low.endswith("n't"):
        return [raw[:-3], "n't"]
    if "'" in raw:
        return [raw.split("'", 1)[0]]
    return [raw]


def _number_value(low: str) -> str | None:
    """A digit token as a canonical number string ('1,000' -> '1000', '2nd' -> '2nd')."""
    if not low[0].isdigit():
        return None
    if re.fullmatch(r"\d{1,3}(,\d{3})+", low):
        low = low.replace(",", "")
    if re.fullmatch(r"\d+\.\d+", low):
        low = low.rstrip("0").rstrip(".")
    return low.lstrip("0") or "0"


def numbers_of(tokens: list[Token]) -> list[str]:
    """Every number, digits or words ('twenty five' -> '25'), in order of appearance."""
    found: list[str] = []
    pending: int | None = None
    for token in tokens:
        word = lx.NUMBER_WORDS.get(token.low)
        if word is not None:
            pending = _combine(pending, word)
            continue
        if pending is not None:
            found.append(str(pending))
            pending = None
        value = _number_value(token.low)
        if value is not None:
            found.append(value)
    if pending is not None:
        found.append(str(pending))
    return found


def _combine(pending: int | None, word: int) -> int:
    """Fold number words left to right: two hundred -> 200, twenty five -> 25."""
    if pending is None:
        return word
    if word in (100, 1000, 1_000_000):
        return pending * word
    return pending + word


def units_of(tokens: list[Token]) -> set[str]:
    """Canonical units and currencies; ambiguous ones ('m', 'second') only after a number."""
    found: set[str] = set()
    previous_is_number = False
    for token in tokens:
        unit = _SYMBOL_UNITS.get(token.low) or lx.UNITS.get(token.low)
        if unit is None and previous_is_number:
            unit = lx.UNITS_AFTER_NUMBER.get(token.low)
        if unit is not None:
            found.add(unit)
        previous_is_number = (_number_value(token.low) is not None
                              or token.low in lx.NUMBER_WORDS)
    return found


def _unit_word(low: str) -> bool:
    return low in lx.UNITS or low in lx.UNITS_AFTER_NUMBER


def entities_of(tokens: list[Token]) -> set[str]:
    """Capitalised words, acronyms and identifiers, lowercased; a capital that only starts a
    sentence counts unless the word is a common one (question words, verbs of request)."""
    lowered = {t.low for t in tokens if t.raw == t.low}
    found: set[str] = set()
    for token in tokens:
        raw, low = token.raw, token.low
        if "_" in raw or (any(c.isdigit() for c in raw) and any(c.isalpha() for c in raw)
                          and _number_value(low) is None):
            found.add(low)
            continue
        if not raw[0].isupper() or low == "i" or _unit_word(low) or low in lx.NUMBER_WORDS:
            continue
        if token.starts_sentence and (low in lx.COMMON or low in lowered):
            continue
        found.add(low)
    return found


def negations_of(tokens: list[Token]) -> int:
    """How many negation cues the text holds (not, no, never, n't, without, ...)."""
    return sum(1 for t in tokens if t.low in lx.NEGATIONS)


def _prefix_negated(a_words: set[str], b_words: set[str]) -> bool:
    """'paid' in one and 'unpaid' in the other (un-, in-, im-, non-, dis-, il-, ir-)."""
    for word in a_words:
        for prefix in lx.NEGATING_PREFIXES:
            if word.startswith(prefix) and word[len(prefix):] in b_words and len(word) > 5:
                return True
    return False


def _anchor(tokens: list[Token], index: int, step: int) -> str | None:
    """The first content word from `index` walking by `step`, skipping determiners."""
    while 0 <= index < len(tokens):
        low = tokens[index].low
        if low not in lx.DETERMINERS:
            return lx.UNITS.get(low) or _SYMBOL_UNITS.get(low) or low
        index += step
    return None


def roles_of(tokens: list[Token]) -> dict[str, frozenset[str]]:
    """For each directional connector class, the words at its far end: 'from Paris to
    London' -> {'to': {'london'}, 'from': {'paris'}}; 'A after B' counts as 'B before A'."""
    roles: dict[str, set[str]] = {}
    for i, token in enumerate(tokens):
        kind = lx.CONNECTORS.get(token.low)
        if kind is None:
            continue
        reverse = kind == "after"
        anchor = _anchor(tokens, i - 1, -1) if reverse else _anchor(tokens, i + 1, 1)
        if anchor is not None:
            roles.setdefault("before" if reverse else kind, set()).add(anchor)
    return {kind: frozenset(words) for kind, words in roles.items()}


def classes_of(words: set[str]) -> set[tuple[int, int]]:
    """(group, class) of every word that belongs to a group of opposites."""
    return {lx.OPPOSITE_INDEX[w] for w in words if w in lx.OPPOSITE_INDEX}


def times_of(tokens: list[Token]) -> set[str]:
    """Relative times: 'today', 'tomorrow', 'next-week', 'last-month', ..."""
    found: set[str] = set()
    for i, token in enumerate(tokens):
        if token.low in lx.DEICTIC_DAYS:
            found.add(token.low)
        modifier = lx.TIME_MODIFIERS.get(token.low)
        if modifier and i + 1 < len(tokens) and tokens[i + 1].low in lx.TIME_PERIODS:
            found.add(f"{modifier}-{tokens[i + 1].low}")
    return found


@lru_cache(maxsize=4096)
def features(text: str) -> Features:
    """Extract every compared feature of one text (cached: the same prompts recur)."""
    tokens = tokenize(text)
    words = tuple(_canonical(t.low) for t in tokens)
    return Features(
        words=words,
        numbers=tuple(sorted(numbers_of(tokens))),
        units=frozenset(units_of(tokens)),
        quotes=tuple(sorted(q.strip().lower() for q in _QUOTED.findall(text))),
        entities=frozenset(entities_of(tokens)),
        negations=negations_of(tokens),
        roles=roles_of(tokens),
        classes=frozenset(classes_of(set(words))),
        times=frozenset(times_of(tokens)),
    )


def _canonical(low: str) -> str:
    """One spelling per unit and negation, so that 'n't' and 'not' compare equal."""
    if low == "n't":
        return "not"
    return lx.UNITS.get(low) or _SYMBOL_UNITS.get(low) or low


def roles_swapped(a: Features, b: Features) -> bool:
    """True when a connector's far ends differ and each appears in the other text."""
    a_words, b_words = set(a.words), set(b.words)
    for kind in a.roles.keys() & b.roles.keys():
        only_a, only_b = a.roles[kind] - b.roles[kind], b.roles[kind] - a.roles[kind]
        if only_a and only_b and only_a <= b_words and only_b <= a_words:
            return True
    return False


def opposites_clash(a: Features, b: Features) -> bool:
    """True when, in one group of opposites, the two texts use disjoint classes."""
    a_groups: dict[int, set[int]] = {}
    b_groups: dict[int, set[int]] = {}
    for group, cls in a.classes:
        a_groups.setdefault(group, set()).add(cls)
    for group, cls in b.classes:
        b_groups.setdefault(group, set()).add(cls)
    return any(a_groups[g].isdisjoint(b_groups[g]) for g in a_groups.keys() & b_groups.keys())


def content_swapped(a: Features, b: Features) -> bool:
    """True when the texts are one sentence with a content word replaced by an unrelated
    one ('best laptop for gaming' / 'for programming'): the swap is the whole question."""
    matcher = SequenceMatcher(None, a.words, b.words, autojunk=False)
    same = sum(block.size for block in matcher.get_matching_blocks())
    if same < 0.5 * max(len(a.words), len(b.words)):
        return False
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        left = [w for w in a.words[i1:i2] if _content(w) and w not in b.words]
        right = [w for w in b.words[j1:j2] if _content(w) and w not in a.words]
        if any(not _variant(x, y) for x in left for y in right):
            return True
    return False


def _content(word: str) -> bool:
    """A word whose swap may change the question (numbers have their own check)."""
    return (word not in lx.SWAP_NEUTRAL and word not in lx.NUMBER_WORDS
            and _number_value(word) is None)


def _variant(x: str, y: str) -> bool:
    """Spelling or inflection variants: summarise/summarize, counts/counting, main/mainly."""
    prefix = 0
    while prefix < min(len(x), len(y)) and x[prefix] == y[prefix]:
        prefix += 1
    if prefix == min(len(x), len(y)) or prefix >= 5:
        return True
    return SequenceMatcher(None, x, y).ratio() >= 0.8


def why_not(a: str, b: str) -> str | None:
    """The name of the first check that tells `a` and `b` apart, or None if none does."""
    fa, fb = features(a), features(b)
    checks = (
        ("numbers", fa.numbers != fb.numbers),
        ("units", fa.units != fb.units),
        ("quotes", fa.quotes != fb.quotes),
        ("entities", fa.entities != fb.entities),
        ("negation", fa.negations != fb.negations
         or _prefix_negated(set(fa.words), set(fb.words))
         or _prefix_negated(set(fb.words), set(fa.words))),
        ("direction", roles_swapped(fa, fb)),
        ("opposites", opposites_clash(fa, fb)),
        ("time", bool(fa.times or fb.times) and fa.times != fb.times),
        ("swap", content_swapped(fa, fb)),
    )
    return next((name for name, failed in checks if failed), None)


def compatible(a: str, b: str) -> bool:
    """True if no check finds a difference of meaning between the two texts."""
    return why_not(a, b) is None
