"""The inputs of `nmt-bench robustness`: conditions built from the same test sentences, and odd inputs.

Each builder takes the split's sources and references and returns a Condition (texts to translate,
one reference per text, and for protected spans the spans each output must contain verbatim).
Nothing here touches the model: the translator's own text pipeline is what the bench measures.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

# Paragraph separators: mostly a space, a few a line break or a blank line (per paragraph).
SEPARATORS: tuple[tuple[str, float], ...] = ((" ", 0.8), ("\n", 0.1), ("\n\n", 0.1))
GROUP_SIZES = (2, 5)  # sentences per paragraph, inclusive
SPAN_SENTENCES = 500  # protected spans: at least this many texts (the split is cycled)
ODD_INPUTS = 200

# Span generators, by kind: each returns one span (verbatim text the output must contain).
NAMES = ("anna", "ben", "carla", "deniz", "emil", "fatima", "jonas", "lea", "mia", "noah")
SPAN_KINDS: dict[str, Callable[[random.Random], str]] = {
    "url": lambda r: r.choice(
        [
            f"https://example.com/photos?id={r.randint(1, 999)}",
            f"www.{r.choice('xyz')}.org/{r.choice(NAMES)}_{r.choice(NAMES)}",
            f"http://photos.example.net/{r.choice(NAMES)}/{r.randint(100, 9999)}.jpg",
        ]
    ),
    "email": lambda r: r.choice(
        [f"{r.choice(NAMES)}@example.com", f"{r.choice(NAMES)}.{r.choice(NAMES)}{r.randint(1, 99)}@mail.example.de"]
    ),
    "handle": lambda r: r.choice([f"@{r.choice(NAMES)}_{r.randint(1, 999)}", f"@{r.choice(NAMES).capitalize()}Photos"]),
    "count": lambda r: r.choice([str(r.randint(2, 99)), f"{r.randint(1, 9)},{r.randint(0, 999):03d}"]),
    "decimal": lambda r: f"{r.randint(1, 4)}.{r.randint(1, 9)}",
    "date": lambda r: f"20{r.randint(10, 30)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
    "time": lambda r: f"{r.randint(6, 22)}:{r.choice(['00', '15', '30', '45'])}",
    "percent": lambda r: f"{r.choice([5, 10, 25, 50, 75, 90])}%",
    "path": lambda r: r.choice(
        [
            "/var/log/syslog",
            f"C:\\Users\\{r.choice(NAMES)}\\notes.txt",
            "./data/train.en",
            f"/home/{r.choice(NAMES)}/photos/img_{r.randint(1, 999)}.png",
        ]
    ),
}
LINKS = ("url", "email", "handle", "path")
# (English, German by hand, the kinds each slot draws from). {s}/{r}: the sentence without its final
# punctuation, {S}/{R}: as it is; {0}, {1}: the spans.
TEMPLATES: tuple[tuple[str, str, tuple[tuple[str, ...], ...]], ...] = (
    ("{s}, see {0}.", "{r}, siehe {0}.", (LINKS,)),
    ("{s} ({0}).", "{r} ({0}).", (tuple(SPAN_KINDS),)),
    ("{s}. More at {0}.", "{r}. Mehr unter {0}.", (("url",),)),
    ("{s}, see {0} or {1}.", "{r}, siehe {0} oder {1}.", (LINKS, LINKS)),
    ("{s} ({0} photos at {1}).", "{r} ({0} Fotos unter {1}).", (("count",), ("url",))),
    ("Photo {0}: {S}", "Foto {0}: {R}", (("count", "date"),)),
    ("{s}, sent by {0}.", "{r}, gesendet von {0}.", (("email", "handle"),)),
    ("{s} at {0} on {1}.", "{r} um {0} am {1}.", (("time",), ("date",))),
    ("{s}, saved as {0}.", "{r}, gespeichert als {0}.", (("path",),)),
    ("{s}, {0} of the time.", "{r}, {0} der Zeit.", (("percent",),)),
    ("{s}, rated {0} of 5.", "{r}, bewertet mit {0} von 5.", (("decimal",),)),
)


@dataclass(frozen=True)
class Condition:
    name: str
    sources: tuple[str, ...]  # one text each, translated separately
    references: tuple[str, ...]
    spans: tuple[tuple[str, ...], ...] = ()  # protected spans: per text, what must come out verbatim
    span_kinds: tuple[tuple[str, ...], ...] = ()  # their kinds (SPAN_KINDS), same shape

    def __post_init__(self) -> None:
        assert len(self.sources) == len(self.references), (self.name, len(self.sources), len(self.references))
        assert not self.spans or len(self.spans) == len(self.sources) == len(self.span_kinds)


def plain(sources: list[str], references: list[str]) -> Condition:
    return Condition("plain", tuple(sources), tuple(references))


def all_caps(sources: list[str], references: list[str]) -> Condition:
    return Condition("ALL CAPS", tuple(s.upper() for s in sources), tuple(references))


def title_word(match: re.Match[str]) -> str:
    return match.group(1) + match.group(2) + match.group(3).upper()


def title_case(text: str) -> str:
    """Each word's first letter upper-cased, after any punctuation it starts with ('"a' -> '"A'); the
    rest of the word, the punctuation and the whitespace stay as they are."""
    return re.sub(r"(^|\s)([^\w\s]*)([^\W\d_])", title_word, text)


def title(sources: list[str], references: list[str]) -> Condition:
    return Condition("Title Case", tuple(title_case(s) for s in sources), tuple(references))


def strip_final(text: str) -> str:
    """The text without trailing whitespace and trailing . ! ? (all of them: "Wow!!" -> "Wow")."""
    return re.sub(r"[.!?]+$", "", text.rstrip()).rstrip()


def no_final_punct(sources: list[str], references: list[str]) -> Condition:
    return Condition("no final punct", tuple(strip_final(s) for s in sources), tuple(references))


def group_sizes(n: int, rng: random.Random) -> list[int]:
    """Consecutive group sizes in GROUP_SIZES covering n sentences (a lone last sentence is avoided)."""
    sizes: list[int] = []
    left = n
    while left > 0:
        k = min(rng.randint(*GROUP_SIZES), left)
        if left - k == 1:
            k = k - 1 if k > GROUP_SIZES[0] else k + 1
        sizes.append(k)
        left -= k
    assert sum(sizes) == n
    return sizes


def paragraphs(sources: list[str], references: list[str], seed: int) -> Condition:
    """Consecutive groups of 2-5 sentences, one text each; the reference: the group's joined with a space."""
    rng = random.Random(seed)
    texts, refs, start = [], [], 0
    for k in group_sizes(len(sources), rng):
        sep = rng.choices([s for s, _ in SEPARATORS], weights=[w for _, w in SEPARATORS])[0]
        texts.append(sep.join(s.strip() for s in sources[start : start + k]))
        refs.append(" ".join(r.strip() for r in references[start : start + k]))
        start += k
    return Condition("paragraphs", tuple(texts), tuple(refs))


def embed_spans(rng: random.Random, src: str, ref: str) -> tuple[str, str, list[str], list[str]]:
    """A template and its spans for one sentence pair: (source, reference, spans, kinds). Spans are drawn
    again until each occurs exactly once in the source text and none contains another."""
    en, de, slots = TEMPLATES[rng.randrange(len(TEMPLATES))]
    while True:
        kinds = [rng.choice(kinds) for kinds in slots]
        spans = [SPAN_KINDS[kind](rng) for kind in kinds]
        text = en.format(*spans, s=strip_final(src), S=src)
        if all(text.count(s) == 1 and all(s == t or s not in t for t in spans) for s in spans):
            return text, de.format(*spans, r=strip_final(ref), R=ref), spans, kinds


def protected_spans(sources: list[str], references: list[str], seed: int, count: int | None = None) -> Condition:
    """`count` texts (default: the split, at least SPAN_SENTENCES; the split is cycled), each with one or
    two spans put in by a template; the reference: the German one with the same spans, same template."""
    rng = random.Random(seed)
    count = max(len(sources), SPAN_SENTENCES) if count is None else count
    texts, refs, spans, kinds = [], [], [], []
    for i in range(count):
        text, ref, drawn, drawn_kinds = embed_spans(
            rng, sources[i % len(sources)].strip(), references[i % len(references)].strip()
        )
        texts.append(text)
        refs.append(ref)
        spans.append(tuple(drawn))
        kinds.append(tuple(drawn_kinds))
    return Condition("protected spans", tuple(texts), tuple(refs), tuple(spans), tuple(kinds))


def build_conditions(
    sources: list[str], references: list[str], seed: int, span_count: int | None = None
) -> list[Condition]:
    """Every scored condition, plain first (the others are compared with it)."""
    return [
        plain(sources, references),
        paragraphs(sources, references, seed),
        all_caps(sources, references),
        title(sources, references),
        no_final_punct(sources, references),
        protected_spans(sources, references, seed, span_count),
    ]


# Odd inputs: no reference, only checked for degenerate outputs.
FIXED_ODD = (
    "A MAN RIDES A BIKE.",
    "A Man Rides A Bike Down The Street.",
    "Visit https://example.com/photos to see 25 pictures.",
    "A man rides a bike.\\nTwo dogs play.",
    '"A man rides a bike," she said.',
)
SINGLE_WORDS = (
    "dog",
    "Hello",
    "the",
    "Yes",
    "running",
    "bicycle",
    "Thanks",
    "no",
    "Berlin",
    "beautiful",
    "OK",
    "why?",
    "Stop!",
    "children",
    "I",
)
LONE_SYMBOLS = ("&", "#", "$", "%", "*", "→", "©", "-", "...", '"', "(", ")", "/", "@", "€", "|", "+", "=", "~", "•")
SCRIPTS = {
    "cyrillic": ("Привет", "мир", "собака", "бежит", "улица"),
    "cjk": ("我爱你", "狗", "東京", "こんにちは", "사람"),
    "arabic": ("مرحبا", "كلب", "شارع", "رجل"),
    "emoji": ("😀", "🐶", "🚲", "❤️", "👍🏽", "🎉"),
    "english": ("a", "man", "dog", "runs", "the", "street", "red", "ball", "two", "women"),
}


def fuzz(rng: random.Random) -> str:
    """One seeded fuzz-style string (punctuation, digits, mixed scripts, repeats, long words, noise)."""
    kind = rng.choice(("punct", "digits", "mixed", "repeat", "long", "noisy", "script"))
    if kind == "punct":
        return "".join(rng.choice(string.punctuation) for _ in range(rng.randint(1, 12)))
    if kind == "digits":
        return " ".join(str(rng.randint(0, 10 ** rng.randint(1, 8))) for _ in range(rng.randint(1, 5)))
    if kind == "mixed":
        pools = [w for words in SCRIPTS.values() for w in words]
        return " ".join(rng.choice(pools) for _ in range(rng.randint(2, 6)))
    if kind == "repeat":
        unit = rng.choice(("a", "ha", "!", "la", "no", ".", "xyz", "dog "))
        return (unit * rng.randint(5, 30)).strip()
    if kind == "long":
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(25, 80)))
    if kind == "noisy":
        words = [rng.choice(SCRIPTS["english"]) for _ in range(rng.randint(3, 8))]
        return " ".join(w + rng.choice(("", "", "!", "?", ",", "...", "#", "1", "'s")) for w in words)
    script = rng.choice(("cyrillic", "cjk", "arabic", "emoji"))
    return " ".join(rng.choice(SCRIPTS[script]) for _ in range(rng.randint(1, 4)))


def odd_inputs(seed: int, total: int = ODD_INPUTS) -> list[str]:
    """The fixed lines, single words, lone symbols and a sample of each script, then fuzz up to `total`."""
    fixed = [*FIXED_ODD, *SINGLE_WORDS, *LONE_SYMBOLS, *(" ".join(words) for words in SCRIPTS.values())]
    rng = random.Random(seed)
    return fixed + [fuzz(rng) for _ in range(max(0, total - len(fixed)))]
