"""What production MT does around the model, for every entry point: split a text into sentences,
normalise their case, protect spans that must come out verbatim; then restore and join back.

    prepared = prepare(text, TextOptions())          # prepared.sources: what the model translates
    text_out = prepared.finish(translated_sources)   # separators kept byte for byte

- Sentences: sentencex (Wikimedia's rule-based segmenter, maintained; bench/results/segmentation.md
  compares it with pysbd, blingfire and others), run per line: a newline always ends a sentence,
  so lists and paragraphs keep their layout. A literal backslash escape (`\\n`, `\\t`, `\\r`, as
  left by double-escaped JSON) between sentences is a separator too, kept verbatim. English
  captions that run on without a full stop are cut before a sentence-starting word (_RUN_ON).
- Case: the model saw sentence case only (Multi30k). An ALL CAPS or Title Case sentence is
  lower-cased (first letter and the word "I" upper) before the model, and the translation gets
  the source's case back: ALL CAPS in, ALL CAPS out; Title Case in, each word capitalised out.
- Spans: URLs, e-mail addresses, @handles, file paths, numbers written with digits, words in
  another script than the model's (Cyrillic, CJK, ...) and emoji are taken out of the sentence
  and replaced by a placeholder word the model tends to copy (a name it saw in training). A
  placeholder the model dropped or changed is put back at the span's relative position, so every
  span comes out verbatim exactly once.
- degenerate(): the rule engine/prepared.py uses to drop a looping or absurdly long hypothesis.

Every stage runs in time linear in the text, whatever the text: nmt-bench text-cost times hostile
shapes at 1-16 KB and tests/engine/test_text_cost.py checks that the cost per byte does not grow.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from sentencex import segment

__all__ = ["Case", "PreparedText", "Sentence", "TextOptions", "degenerate", "find_spans", "prepare", "split_sentences"]

# Line breaks and literal backslash escapes (a JSON text escaped twice) end a sentence.
_HARD_BREAK = re.compile(r"(?:\r\n|[\n\r\u2028\u2029]|\\[nrt])+")

# English sentences without final punctuation run on ("A dog runs on the beach Two men talk"): a
# word that starts sentences, capitalised right after a lower-case word that cannot end one, and
# followed by a lower-case word, starts a new sentence. Of Multi30k's 29,000 training captions it
# splits one that sentencex keeps whole ("A black Dog, in a Alley maybe, He might be lost, ...").
_RUN_ON = re.compile(
    r"(?<=[a-z,] )(?=(?:A|An|The|This|These|Those|There|Two|Three|Four|Five|Six|Several|Many|Some"
    r"|One|He|She|They|We|It) [a-z])"
)
_NO_END = frozenset("the a an of in on at to for with by and or from as is are was were".split())


def _run_on_cuts(sentence: str) -> list[int]:
    return [
        m.start()
        for m in _RUN_ON.finditer(sentence)
        if _word_before(sentence, m.start() - 1).strip(",").lower() not in _NO_END
    ]


def _word_before(text: str, end: int) -> str:
    """The word that ends at text[end] (scanning back over that word only: linear over all cuts)."""
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:end]


# Order matters: the first pattern that matches at a position wins (a URL holds digits and slashes).
# Linear time whatever the text: every repeat is possessive (++, *+: no backtracking into it), and the
# e-mail's local part, which could start anywhere inside a run, starts where its run starts (or right
# after another span: _spans tries that), so a run is scanned once, not once per character (16 KB of
# "a1" took 1.5 s).
_NOT_LATIN = r"[^\W\d_a-zA-Z\u00C0-\u024F\u1E00-\u1EFF]"
_EMOJI = r"[\U0001F000-\U0001FAFF\u2600-\u27BF][\uFE0F\u200D]*+"
_SPAN_PATTERNS = [
    r"(?:https?|ftp)://[^\s<>\"']++|www\.[^\s<>\"']++",  # URL
    r"(?<![\w.+-])[\w.+-]++@[\w-]++(?:\.[\w-]++)++",  # e-mail address
    r"(?<![\w@])@\w{1,64}",  # @handle
    r"(?<![\w:/])[A-Za-z]:\\[^\s\"'<>|]++",  # Windows path
    r"(?<![\w/])(?:~|\.{1,2})?/[\w.\-~]++(?:/[\w.\-~]*+)++|(?<![\w/])(?:~|\.{1,2})/[\w.\-~]++",  # POSIX path
    # number with digits: 25, 3.5, 1,000, 2026-12-02, 10:30, 50% (the groups give back one at most)
    r"(?<![\w.])\d++(?:[.,:/-]\d++)*(?:%|(?=\W|$))",
    # Letters outside the Latin script, and emoji: a Latin-script model can only invent text for them.
    rf"{_NOT_LATIN}++(?:[\s-]++{_NOT_LATIN}++)*+",
    rf"{_EMOJI}(?:\s*+{_EMOJI})*+",
]
# Every pattern's first character is one of these: a quarter of the scan's time goes without trying them.
_FIRST = r"(?=[\w.+\-@~/\U0001F000-\U0001FAFF\u2600-\u27BF])"
_SPANS = re.compile(_FIRST + "(?:" + "|".join(f"({p})" for p in _SPAN_PATTERNS) + ")", re.IGNORECASE)
_URL = re.compile(_SPAN_PATTERNS[0], re.IGNORECASE)
_LOCAL_PART, _DOMAIN = re.compile(r"[\w.+-]++"), re.compile(r"@[\w-]++(?:\.[\w-]++)++")  # the e-mail's halves
# A character no span can do without: most sentences have none, and skip the spans' regex.
_MAYBE_SPAN = re.compile(r"[\d@/\\:]|www|[^\x00-\u024F\u1E00-\u1EFF]", re.IGNORECASE)
_LETTER = re.compile(r"[^\W\d_]")
_TRAILING = ".,;:!?)]}\"'"  # sentence punctuation after a URL or path belongs to the sentence
# Names the default model copies to its output most often (measured on test_2016_flickr templates).
PLACEHOLDERS = ("Elmo", "Obama", "London", "Nike", "Seattle", "Mickey", "Texas", "Boston")
# Short function words that headline-style Title Case leaves in lower case.
_MINOR_WORDS = frozenset("a an the and but or nor for so yet as at by in of off on per to up via".split())


class Case(Enum):
    AS_IS = "as_is"
    UPPER = "upper"
    TITLE = "title"


@dataclass(frozen=True)
class TextOptions:
    split_sentences: bool = True
    normalize_case: bool = True
    protect_spans: bool = True


@dataclass(frozen=True)
class Sentence:
    """One sentence as the model sees it, and how to turn its translation back."""

    source: str
    case: Case = Case.AS_IS
    spans: tuple[tuple[str, str, float], ...] = ()  # (placeholder, span, relative position in the source)
    verbatim: str | None = None  # nothing to translate (only spans, digits, symbols): this comes back as is

    def restore(self, translation: str) -> str:
        if self.verbatim is not None:
            return self.verbatim
        return put_spans_back(restore_case(translation, self.case), self.spans)


@dataclass(frozen=True)
class PreparedText:
    text: str
    bounds: tuple[tuple[int, int], ...]  # each sentence's [start, end) in `text`
    sentences: tuple[Sentence, ...]

    @property
    def sources(self) -> list[str]:
        return [s.source for s in self.sentences]

    def finish(self, translations: list[str | None]) -> str:
        """The text with each sentence replaced by its restored translation (None: the sentence as it
        was); separators unchanged."""
        assert len(translations) == len(self.sentences), "one translation per sentence"
        out, cursor = [], 0
        for (start, end), sentence, translation in zip(self.bounds, self.sentences, translations):
            restored = self.text[start:end] if translation is None else sentence.restore(translation)
            out += [self.text[cursor:start], restored]
            cursor = end
        out.append(self.text[cursor:])
        return "".join(out)


def prepare(text: str, options: TextOptions, lang: str = "en") -> PreparedText:
    """Find the spans once, split (or not), then protect spans and normalise case per sentence."""
    matches = _find(text) if options.split_sentences or options.protect_spans else []
    if options.split_sentences:
        bounds = split_sentences(text, lang, matches)
    else:
        start, end = len(text) - len(text.lstrip()), len(text.rstrip())
        bounds = [(start, end)] if start < end else []
    sentences, first = [], 0
    for a, b in bounds:  # bounds ascend, and no span crosses one (spans are opaque to the splitter)
        while first < len(matches) and matches[first][0] < a:
            first += 1
        last = first
        while last < len(matches) and matches[last][0] < b:
            last += 1
        within = [(start - a, end - a, pattern) for start, end, pattern in matches[first:last]]
        # The patterns look one character around a span: where a neighbour of the sentence is not
        # whitespace (a literal "\\n" before it), the sentence alone may hold other spans.
        alone = (a > 0 and not text[a - 1].isspace()) or (b < len(text) and not text[b].isspace())
        sentences.append(prepare_sentence(text[a:b], options, None if alone else within))
    return PreparedText(text, tuple(bounds), tuple(sentences))


def prepare_sentence(
    sentence: str, options: TextOptions, matches: list[tuple[int, int, int]] | None = None
) -> Sentence:
    """Spans are masked first, so that neither the case rules nor the model touch them."""
    masked, spans = mask_spans(sentence, matches) if options.protect_spans else (sentence, [])
    if not any(c.isalpha() for c in masked):  # invisible characters only (U+200B, NUL, ...): blank
        visible = any(c.isprintable() and not c.isspace() for c in sentence)
        return Sentence("", verbatim=sentence if visible else "")
    case = case_of(masked) if options.normalize_case else Case.AS_IS
    pieces = normalize_case(masked, case).split(_MASK)  # the case rules keep every mask, in order
    assert len(pieces) == len(spans) + 1, "one mask per span"
    free = iter(p for p in PLACEHOLDERS if p.lower() not in sentence.lower())
    placed = [(next(free, ""), span, position) for span, position in spans]
    source = "".join(piece for i, text in enumerate(pieces) for piece in (placed[i - 1][0] if i else "", text))
    return Sentence(re.sub(r"\s{2,}", " ", source).strip(), case, tuple(placed))


def split_sentences(
    text: str, lang: str = "en", matches: list[tuple[int, int, int]] | None = None
) -> list[tuple[int, int]]:
    """[start, end) of each sentence, whitespace excluded: everything between them is a separator."""
    bounds: list[tuple[int, int]] = []
    line_start = 0
    masked = _opaque(text, _find(text) if matches is None else matches)  # C:\\new\\notes.txt breaks no line
    for brk in [*_HARD_BREAK.finditer(masked), None]:
        line_end = len(text) if brk is None else brk.start()
        _segment_line(masked, line_start, line_end, lang, bounds)
        if brk is not None:
            line_start = brk.end()
    return bounds


def _segment_line(masked: str, start: int, end: int, lang: str, bounds: list[tuple[int, int]]) -> None:
    """Sentences of masked[start:end]: spans are opaque there (the dots of WWW.EXAMPLE.ORG end none)."""
    line = masked[start:end]
    if not line.strip():
        return
    cursor = 0
    for piece in segment(lang, line):
        core = piece.strip()
        if not core:
            continue
        found = line.find(core, cursor)
        assert found >= 0, "sentencex returns pieces of its input"
        cuts = _run_on_cuts(core) if lang == "en" else []
        for a, b in zip([0, *cuts], [*cuts, len(core)]):
            piece_start = found + a + (len(core[a:b]) - len(core[a:b].lstrip()))
            bounds.append((start + piece_start, start + found + len(core[:b].rstrip())))
        cursor = found + len(core)


def _opaque(text: str, matches: list[tuple[int, int, int]]) -> str:
    """The text with each span replaced by as many x's: same offsets, no sentence break inside."""
    out, cursor = [], 0
    for start, end, _ in matches:
        out += [text[cursor:start], "x" * (end - start)]
        cursor = end
    return "".join(out) + text[cursor:]


def _find(text: str) -> list[tuple[int, int, int]]:
    """(start, end, pattern number from 1) of each span in `text` (end before trimming)."""
    if not _MAYBE_SPAN.search(text):
        return []
    if "@" not in text:  # no address anywhere: one scan is all
        return [(m.start(), m.end(), m.lastindex or 0) for m in _SPANS.finditer(text)]
    return list(_spans(text))


def _spans(text: str) -> Iterator[tuple[int, int, int]]:
    """(start, end, pattern number from 1) of each span, left to right, as one unanchored scan of
    _SPAN_PATTERNS finds them. Right after a span an e-mail address may start inside a run of its
    characters ("./b+@x.org" holds "+@x.org"), which _SPANS refuses: that run is scanned once here."""
    cursor, run_end, address_end = 0, -1, -1
    while True:
        for match in _SPANS.finditer(text, cursor):
            end = match.end()
            yield match.start(), end, match.lastindex or 0
            if (
                end < len(text)
                and _in_local_part(text[end - 1])
                and _in_local_part(text[end])
                and not _URL.match(text, end)
            ):  # a URL comes first, the address second
                if end >= run_end:  # past the run scanned last
                    run_end = _LOCAL_PART.match(text, end).end()  # type: ignore[union-attr]
                    domain = _DOMAIN.match(text, run_end)
                    address_end = domain.end() if domain else -1
                if address_end > 0:
                    yield end, address_end, 2
                    cursor = address_end
                    break
        else:
            return


def _in_local_part(char: str) -> bool:
    return char.isalnum() or char in "_.+-"  # [\w.+-]: \w is str.isalnum() and the underscore


def case_of(sentence: str) -> Case:
    if (rest := sentence[1:]) == rest.lower():  # the common case, decided in C: no capital after the first
        return Case.AS_IS
    if sentence.isupper() and len(_LETTER.findall(sentence)) >= 4:  # isupper: no lower-case letter at all
        return Case.UPPER
    words = [w for w in re.findall(r"[^\W\d_][\w'’-]*", sentence)][1:]
    content = [w for w in words if w.lower() not in _MINOR_WORDS]
    capitalised = [w for w in content if w[0].isupper()]
    if len(content) >= 2 and len(capitalised) >= 0.8 * len(content) and any(w[1:].islower() for w in capitalised):
        return Case.TITLE
    return Case.AS_IS


def normalize_case(sentence: str, case: Case) -> str:
    """Sentence case for the model: lower case, the first letter and the word "I" upper."""
    if case is Case.AS_IS:
        return sentence
    if case is Case.TITLE:  # keep words that are not plain Capitalised (NASA, iPhone)
        lowered = re.sub(
            r"\b([^\W\d_])([^\W\d_]*)\b",
            lambda m: m.group(0).lower() if m.group(2).islower() or not m.group(2) else m.group(0),
            sentence,
        )
    else:
        lowered = sentence.lower()
    lowered = re.sub(r"\bi\b", "I", lowered)
    # The first letter goes up when it starts the sentence (after quotes or brackets), not after a span.
    return re.sub(r"^([^\w\ue000]*)([^\W\d_])", lambda m: m.group(1) + m.group(2).upper(), lowered, count=1)


def restore_case(translation: str, case: Case) -> str:
    if case is Case.UPPER:  # ß as capital ẞ (German orthography since 2017): "SS" would not lower back
        return translation.replace("ß", "\u1e9e").upper()
    if case is Case.TITLE:
        return re.sub(r"\b([^\W\d_])", lambda m: m.group(1).upper(), translation)
    return translation


def find_spans(sentence: str, matches: list[tuple[int, int, int]] | None = None) -> list[tuple[int, int]]:
    """[start, end) of each span that must come out verbatim."""
    found = []
    for start, end, pattern in _find(sentence) if matches is None else matches:
        if pattern in (1, 4, 5):  # URL or path: trailing punctuation is the sentence's
            while end > start + 1 and sentence[end - 1] in _TRAILING:
                end -= 1
        found.append((start, end))
    return found


def mask_spans(sentence: str, matches: list[tuple[int, int, int]] | None = None) -> tuple[str, list[tuple[str, float]]]:
    """The sentence with each span replaced by _MASK (a stray _MASK of its own by U+FFFD), and
    (span, relative start) per span."""
    out, spans, cursor = [], [], 0
    for start, end in find_spans(sentence, matches):
        out += [sentence[cursor:start], _MASK]
        spans.append((sentence[start:end], start / len(sentence)))
        cursor = end
    out.append(sentence[cursor:])
    if _MASK not in sentence:
        return "".join(out), spans
    return "".join(piece.replace(_MASK, "\ufffd") if i % 2 == 0 else piece for i, piece in enumerate(out)), spans


def put_spans_back(translation: str, spans: tuple[tuple[str, str, float], ...]) -> str:
    """Each placeholder's first whole-word occurrence becomes its span and later copies are dropped;
    a span whose placeholder is missing goes in at the word boundary nearest its relative position.
    Linear in the translation whatever the number of spans: one pass finds the placeholders; the few
    missing ones that had a placeholder go in one by one, each against the text the previous left;
    spans beyond the placeholders (a sentence with more spans than names) all go in in one pass."""
    index = {placeholder.lower(): i for i, (placeholder, _, _) in enumerate(spans) if placeholder}
    out, found, cursor = [], set(), 0
    if index:
        names = "|".join(re.escape(p) for p in index)
        for match in re.finditer(rf"(?<!\w)(?:{names})(?!\w)", translation, re.IGNORECASE):
            i = index[match.group(0).lower()]
            before = translation[cursor : match.start()]
            if i in found:  # a later copy goes, and one whitespace character before it
                out.append(before[:-1] if before[-1:].isspace() else before)
            else:
                out += [before, _marker(i)]
                found.add(i)
            cursor = match.end()
    text = "".join(out) + translation[cursor:]
    for i in index.values():
        if i not in found:
            text = _insert_at(text, _marker(i), spans[i][2])
    unnamed = [(i, position) for i, (placeholder, _, position) in enumerate(spans) if not placeholder]
    return _fill(text, _insertions(text, unnamed), [span for _, span, _ in spans])


def _marker(index: int) -> str:
    # Private-use characters: no letter, no word character the case rules or placeholders touch.
    assert index < len(PLACEHOLDERS), "only spans with a placeholder get a marker"
    return f"\ue000{chr(0xE100 + index)}\ue001"


_MASK = "\ue000"  # a span in the masked sentence
_MARKERS = re.compile("\ue000([\ue100-\ue1ff])\ue001")


def _insert_at(text: str, piece: str, position: float) -> str:
    """`piece` at the word boundary nearest `position` (0..1) of `text`, before final punctuation."""
    [(at, how, _)] = _insertions(text, [(0, position)])
    if how == "alone":
        return (piece + " " + text.strip()).strip()
    return text[:at] + (" " + piece if how == "after" else piece + " ") + text[at:]


def _insertions(text: str, missing: list[tuple[int, float]]) -> list[tuple[int, str, list[int]]]:
    """Where spans go in `text` by relative position, all against `text` as it is: (offset, how, span
    indices), offsets ascending. How: "before" the word there (the span and a space), "after" the body,
    before its final punctuation (a space and the span), or "alone" (no body: the spans, then the text)."""
    if not missing:
        return []
    body = text.rstrip(".!?。 ")
    if not body:
        return [(0, "alone", [i for i, _ in missing])]
    boundaries = [0] + [m.end() for m in re.finditer(r"\s+", body)] + [len(body)]
    at: dict[int, list[int]] = {}
    for i, position in missing:
        at.setdefault(_nearest(boundaries, position * len(body)), []).append(i)
    return [(offset, "after" if offset >= len(body) else "before", indices) for offset, indices in sorted(at.items())]


def _nearest(boundaries: list[int], target: float) -> int:
    """The boundary nearest `target` (the first of two as near), by bisection."""
    lo = bisect.bisect_left(boundaries, target)
    if lo == 0:
        return boundaries[0]
    if lo == len(boundaries) or target - boundaries[lo - 1] <= boundaries[lo] - target:
        return boundaries[lo - 1]
    return boundaries[lo]


def _fill(text: str, insertions: list[tuple[int, str, list[int]]], spans: list[str]) -> str:
    """`text` with each marker replaced by its span and `insertions` made, in one pass."""
    if insertions and insertions[0][1] == "alone":
        return (" ".join(spans[i] for i in insertions[0][2]) + " " + _fill(text, [], spans).strip()).strip()
    events = sorted(
        [(m.start(), 1, m.end(), spans[ord(m.group(1)) - 0xE100]) for m in _MARKERS.finditer(text)]
        + [
            (offset, 0, offset, "".join(spans[i] + " " if how == "before" else " " + spans[i] for i in indices))
            for offset, how, indices in insertions
        ]
    )
    out, cursor = [], 0
    for start, _, end, piece in events:
        out += [text[cursor:start], piece]
        cursor = end
    out.append(text[cursor:])
    return "".join(out)


# An output is degenerate when it is absurdly long for its source or loops. The length rule never
# fires on Multi30k's validation references (the longest is 2.3x its source's characters).
# A piece of 2 to 50 characters 4+ times in a row, within a word run (bounded: linear in the output).
_LOOP = re.compile(r"(\S{2,50}?)\1{3,}")


def degenerate(source: str, output: str) -> str | None:
    """Why a translation is degenerate, or None: over 3x the source's characters + 30, the same word
    4+ times in a row, or a piece of 2+ characters 4+ times in a row (unless the source loops so)."""
    if len(output) > 3 * len(source) + 30:
        return f"{len(output)} characters for a {len(source)}-character source"
    words, source_words, allowed = output.lower().split(), " ".join(source.lower().split()), set()
    for n in range(1, 5):
        for start in range(len(words) - 4 * n + 1):
            if all(words[start + j * n : start + (j + 1) * n] == words[start : start + n] for j in range(1, 4)):
                looped = " ".join(words[start : start + n] * 4)
                if looped not in allowed and looped not in source_words:
                    return f"{' '.join(words[start : start + n])!r} 4 times in a row"
                allowed.add(looped)  # the source loops so: each loop looked up once
    for match in _LOOP.finditer(output):
        if match.group(1) * 4 not in source:
            return f"{match.group(1)!r} {len(match.group(0)) // len(match.group(1))} times in a row"
    return None
