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
- degenerate(): the rule engine/translator.py uses to drop a looping or absurdly long hypothesis.
"""

from __future__ import annotations

import re
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
_RUN_ON = re.compile(r"(?<=[a-z,] )(?=(?:A|An|The|This|These|Those|There|Two|Three|Four|Five|Six|Several|Many|Some"
                     r"|One|He|She|They|We|It) [a-z])")
_NO_END = frozenset("the a an of in on at to for with by and or from as is are was were".split())


def _run_on_cuts(sentence: str) -> list[int]:
    return [m.start() for m in _RUN_ON.finditer(sentence)
            if sentence[: m.start()].split()[-1].strip(",").lower() not in _NO_END]


# Order matters: the first pattern that matches at a position wins (a URL holds digits and slashes).
_SPAN_PATTERNS = [
    r"(?:https?|ftp)://[^\s<>\"']+|www\.[^\s<>\"']+",  # URL
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",  # e-mail address
    r"(?<![\w@])@\w{1,64}",  # @handle
    r"(?<![\w:/])[A-Za-z]:\\[^\s\"'<>|]+",  # Windows path
    r"(?<![\w/])(?:~|\.{1,2})?/[\w.\-~]+(?:/[\w.\-~]*)+|(?<![\w/])(?:~|\.{1,2})/[\w.\-~]+",  # POSIX path
    r"(?<![\w.])\d+(?:[.,:/-]\d+)*(?:%|(?=\W|$))",  # number with digits: 25, 3.5, 1,000, 2026-12-02, 10:30, 50%
    # Letters outside the Latin script, and emoji: a Latin-script model can only invent text for them.
    r"[^\W\d_a-zA-Z\u00C0-\u024F\u1E00-\u1EFF]+(?:[\s-]+[^\W\d_a-zA-Z\u00C0-\u024F\u1E00-\u1EFF]+)*",
    r"[\U0001F000-\U0001FAFF\u2600-\u27BF][\uFE0F\u200D]*(?:\s*[\U0001F000-\U0001FAFF\u2600-\u27BF][\uFE0F\u200D]*)*",
]
_SPANS = re.compile("|".join(f"({p})" for p in _SPAN_PATTERNS), re.IGNORECASE)
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
    """Split (or not), then protect spans and normalise case per sentence."""
    if options.split_sentences:
        bounds = split_sentences(text, lang)
    else:
        start, end = len(text) - len(text.lstrip()), len(text.rstrip())
        bounds = [(start, end)] if start < end else []
    return PreparedText(text, tuple(bounds), tuple(prepare_sentence(text[a:b], options) for a, b in bounds))


def prepare_sentence(sentence: str, options: TextOptions) -> Sentence:
    """Spans are masked first, so that neither the case rules nor the model touch them."""
    masked, spans = mask_spans(sentence) if options.protect_spans else (sentence, [])
    if not any(c.isalpha() for c in masked):  # invisible characters only (U+200B, NUL, ...): blank
        visible = any(c.isprintable() and not c.isspace() for c in sentence)
        return Sentence("", verbatim=sentence if visible else "")
    case = case_of(masked) if options.normalize_case else Case.AS_IS
    source = normalize_case(masked, case)
    free = iter(p for p in PLACEHOLDERS if p.lower() not in sentence.lower())
    placed = []
    for i, (span, position) in enumerate(spans):
        placeholder = next(free, "")
        source = source.replace(_marker(i), placeholder, 1)
        placed.append((placeholder, span, position))
    return Sentence(re.sub(r"\s{2,}", " ", source).strip(), case, tuple(placed))


def split_sentences(text: str, lang: str = "en") -> list[tuple[int, int]]:
    """[start, end) of each sentence, whitespace excluded: everything between them is a separator."""
    bounds: list[tuple[int, int]] = []
    line_start = 0
    masked = _opaque_spans(text)  # the backslash-n in C:\\Users\\anna\\notes.txt breaks no line
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


def _opaque_spans(text: str) -> str:
    """The text with each protected span replaced by as many x's: same offsets, no breaks inside."""
    if not _MAYBE_SPAN.search(text):
        return text
    return _SPANS.sub(lambda m: "x" * len(m.group(0)), text)


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
        lowered = re.sub(r"\b([^\W\d_])([^\W\d_]*)\b",
                         lambda m: m.group(0).lower() if m.group(2).islower() or not m.group(2) else m.group(0),
                         sentence)
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


def find_spans(sentence: str) -> list[tuple[int, int]]:
    """[start, end) of each span that must come out verbatim."""
    if not _MAYBE_SPAN.search(sentence):
        return []
    found = []
    for match in _SPANS.finditer(sentence):
        start, end = match.span()
        if match.lastindex in (1, 4, 5):  # URL or path: trailing punctuation is the sentence's
            while end > start + 1 and sentence[end - 1] in _TRAILING:
                end -= 1
        found.append((start, end))
    return found


def mask_spans(sentence: str) -> tuple[str, list[tuple[str, float]]]:
    """The sentence with span i replaced by _marker(i), and (span, relative start) per span."""
    out, spans, cursor = [], [], 0
    for i, (start, end) in enumerate(find_spans(sentence)):
        out += [sentence[cursor:start], _marker(i)]
        spans.append((sentence[start:end], start / len(sentence)))
        cursor = end
    out.append(sentence[cursor:])
    return "".join(out), spans


def put_spans_back(translation: str, spans: tuple[tuple[str, str, float], ...]) -> str:
    """Each placeholder's first whole-word occurrence becomes its span and later copies are dropped;
    a span whose placeholder is missing goes in at the word boundary nearest its relative position."""
    missing = []
    for i, (placeholder, _, position) in enumerate(spans):
        pattern = re.compile(rf"(?<!\w){re.escape(placeholder)}(?!\w)", re.IGNORECASE) if placeholder else None
        match = pattern.search(translation) if pattern else None
        if match is None:
            missing.append((i, position))
            continue
        tail = re.sub(rf"\s?{pattern.pattern}", "", translation[match.end():], flags=re.IGNORECASE)
        translation = translation[: match.start()] + _marker(i) + tail
    for i, position in missing:
        translation = _insert_at(translation, _marker(i), position)
    for i, (_, span, _) in enumerate(spans):
        translation = translation.replace(_marker(i), span, 1)
    return translation


def _marker(index: int) -> str:
    # Private-use characters: no letter, no word character the case rules or placeholders touch.
    return f"\ue000{chr(0xE100 + index)}\ue001"


def _insert_at(text: str, piece: str, position: float) -> str:
    """`piece` at the word boundary nearest `position` (0..1) of `text`, before final punctuation."""
    body = text.rstrip(".!?。 ")
    if not body:
        return (piece + " " + text.strip()).strip()
    target = position * len(body)
    boundaries = [0] + [m.end() for m in re.finditer(r"\s+", body)] + [len(body)]
    at = min(boundaries, key=lambda b: abs(b - target))
    if at >= len(body):
        return body + " " + piece + text[len(body):]
    return text[:at] + piece + " " + text[at:]


# An output is degenerate when it is absurdly long for its source or loops. The length rule never
# fires on Multi30k's validation references (the longest is 2.3x its source's characters).
_LOOP = re.compile(r"(\S{2,}?)\1{3,}")  # a piece of 2+ characters 4+ times in a row, within a word run


def degenerate(source: str, output: str) -> str | None:
    """Why a translation is degenerate, or None: over 3x the source's characters + 30, the same word
    4+ times in a row, or a piece of 2+ characters 4+ times in a row (unless the source loops so)."""
    if len(output) > 3 * len(source) + 30:
        return f"{len(output)} characters for a {len(source)}-character source"
    words = output.lower().split()
    for n in range(1, 5):
        for start in range(len(words) - 4 * n + 1):
            if all(words[start + j * n : start + (j + 1) * n] == words[start : start + n] for j in range(1, 4)):
                if " ".join(words[start : start + n] * 4) not in " ".join(source.lower().split()):
                    return f"{' '.join(words[start:start + n])!r} 4 times in a row"
    for match in _LOOP.finditer(output):
        if match.group(1) * 4 not in source:
            return f"{match.group(1)!r} {len(match.group(0)) // len(match.group(1))} times in a row"
    return None
