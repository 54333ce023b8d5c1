"""A request's texts on their way to the model and back: split, normalised and tokenized (Prepared),
then joined from the search's hypotheses (Prepared.finish). No ONNX Runtime here: the server runs this
in a process of its own (server/text_worker.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .hypothesis import Hypothesis
from .text import PreparedText, TextOptions, degenerate, prepare

if TYPE_CHECKING:
    from .decoding import DecodeOptions  # imports ONNX Runtime


@dataclass(frozen=True)
class Translation:
    text: str
    tokens: int  # output tokens, EOS excluded
    score: float  # sum of token log-probabilities, EOS included
    normalized_score: float  # score / length penalty


@dataclass(frozen=True)
class Prepared:
    """Request texts ready for the model: each split into sentences, each sentence tokenized."""

    texts: list[PreparedText | None]  # None: a blank text (one empty translation, no engine work)
    sources: list[list[int]]  # the sentences the engine decodes (never empty)
    owners: list[tuple[int, int]]  # (text, sentence) of each source

    def sentence_count(self) -> int:
        return sum(len(t.sentences) for t in self.texts if t is not None)

    def finish(
        self, detokenize: Callable[[list[list[int]]], list[str]], found: list[list[Hypothesis]], n_best: int
    ) -> list[list[Translation]]:
        """n_best translations per text from each source's hypotheses (ask the search for all of its
        beam: degenerate ones are dropped here). The k-th joins every sentence's k-th best (its last
        when it has fewer); tokens and scores add up over the sentences. A sentence whose every
        hypothesis is degenerate (engine/text.py: degenerate) comes back as it was sent."""
        decoded: dict[int, str | None] = {}
        fluent: list[list[Hypothesis]] = [[] for _ in found]
        rank = 0  # detokenize rank by rank, and only the sentences still short of n_best fluent ones
        while todo := [i for i, hyps in enumerate(found) if len(fluent[i]) < n_best and rank < len(hyps)]:
            for i, string in zip(todo, detokenize([found[i][rank].tokens for i in todo])):
                text, sentence = self.owners[i]
                if degenerate(self.texts[text].sentences[sentence].source, string) is None:  # type: ignore[union-attr]
                    decoded[id(found[i][rank])] = string
                    fluent[i].append(found[i][rank])
            rank += 1
        per_text: dict[int, dict[int, list[Hypothesis]]] = {}
        for (text, sentence), hyps in zip(self.owners, fluent):
            if not hyps:
                hyps = [Hypothesis([], 0.0, 0.0)]
                decoded[id(hyps[0])] = None  # verbatim
            per_text.setdefault(text, {})[sentence] = hyps
        results = []
        for index, prepared in enumerate(self.texts):
            if prepared is None:
                results.append([Translation("", 0, 0.0, 0.0)])
                continue
            hyps = per_text.get(index, {})
            results.append([self._join(prepared, hyps, k, decoded) for k in range(max(1, min(n_best, _most(hyps))))])
        return results

    @staticmethod
    def _join(
        prepared: PreparedText, hyps: dict[int, list[Hypothesis]], k: int, decoded: dict[int, str | None]
    ) -> Translation:
        chosen = {i: h[min(k, len(h) - 1)] for i, h in hyps.items()}
        text = prepared.finish([decoded[id(chosen[i])] if i in chosen else "" for i in range(len(prepared.sentences))])
        return Translation(
            text,
            sum(len(h.tokens) for h in chosen.values()),
            sum(h.score for h in chosen.values()),
            sum(h.normalized_score for h in chosen.values()),
        )


def _most(hyps: dict[int, list[Hypothesis]]) -> int:
    return max((len(h) for h in hyps.values()), default=1)


def prepare_texts(
    tokenize: Callable[[list[str]], list[list[int]]], src_lang: str, texts: list[str], options: TextOptions
) -> Prepared:
    """The text pipeline (engine/text.py), then `tokenize`. A blank text, or one whose sentences are
    all blank after the tokenizer's normalization (spaces, U+200B, U+FEFF, NUL, ...), gets an empty
    translation without the engine, as the server answers it: the model would invent one."""
    lang = src_lang or "en"
    prepared = [prepare(text, options, lang) if text.strip() else None for text in texts]
    wanted = [
        (t, s)
        for t, p in enumerate(prepared)
        if p is not None
        for s, sentence in enumerate(p.sentences)
        if sentence.source
    ]
    tokens = tokenize([prepared[t].sentences[s].source for t, s in wanted]) if wanted else []  # type: ignore[union-attr]
    kept = [(owner, source) for owner, source in zip(wanted, tokens) if source]
    translated = {text for (text, _), _ in kept}
    texts_out = [
        p if p is not None and (i in translated or any(s.verbatim for s in p.sentences)) else None
        for i, p in enumerate(prepared)
    ]  # nothing to translate or keep: blank
    return Prepared(texts_out, [source for _, source in kept], [owner for owner, _ in kept])


def whole_beam(options: DecodeOptions) -> DecodeOptions:
    """The search options for Prepared.finish: every finished hypothesis of the beam, to pick from."""
    return dataclasses.replace(options, n_best=options.beam_size)
