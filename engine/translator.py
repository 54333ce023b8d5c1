"""Text in, text out: a bundle's tokenizer around the Decoder (what the server and CLI call)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import TOKENIZER, BundleError
from .continuous import RunningBatch
from .decoding import DecodeOptions, Decoder, Hypothesis, SearchResult
from .runtime import RuntimeConfig, Sessions, load_sessions
from .text import PreparedText, TextOptions, degenerate, prepare
from .tokenizer import SentencePiece
from .turns import EngineTurns, NoTurns


@dataclass(frozen=True)
class Translation:
    text: str
    tokens: int  # output tokens, EOS excluded
    score: float  # sum of token log-probabilities, EOS included
    normalized_score: float  # score / length penalty


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    src_lang: str
    tgt_lang: str
    vocab_size: int
    bundle_sha256: str
    precision: str  # the active variant, e.g. "fp32-cpu"
    provider: str  # the active execution provider


def model_info(bundle_dir: Path, manifest: dict[str, Any], sessions: Sessions) -> ModelInfo:
    """Name: manifest "name" or the directory name; version: manifest "version" or the checkpoint hash."""
    version = manifest.get("version") or manifest.get("source_checkpoint", {}).get("sha256", "")[:12] or "unknown"
    return ModelInfo(
        name=str(manifest.get("name") or bundle_dir.resolve().name),
        version=str(version),
        src_lang=str(manifest.get("src_lang", "")),
        tgt_lang=str(manifest.get("tgt_lang", "")),
        vocab_size=sessions.vocab_size,
        bundle_sha256=str(manifest.get("manifest_sha256", "")),
        precision=sessions.variant,
        provider=sessions.provider,
    )


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


class Translator:
    def __init__(self, sessions: Sessions, tokenizer: SentencePiece, info: ModelInfo):
        if tokenizer.vocab_size != sessions.vocab_size:
            raise BundleError(f"the tokenizer has {tokenizer.vocab_size} pieces, the model {sessions.vocab_size}")
        self.sessions, self.tokenizer, self.info = sessions, tokenizer, info
        self.decoder = Decoder(sessions)

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, cfg: RuntimeConfig | None = None) -> Translator:
        """Verify and load a bundle (BundleError / ValueError name what is wrong)."""
        bundle_dir = Path(bundle_dir)
        sessions = load_sessions(bundle_dir, cfg or RuntimeConfig())
        manifest = sessions.manifest or {}
        try:
            tokenizer = SentencePiece.load(bundle_dir / manifest.get("tokenizer", TOKENIZER))
        except ValueError as e:
            raise BundleError(str(e)) from e
        return cls(sessions, tokenizer, model_info(bundle_dir, manifest, sessions))

    def take_turns(self, turns: EngineTurns | NoTurns) -> None:
        """Run every engine step in turn with the other models sharing `turns` (engine/turns.py)."""
        self.sessions = dataclasses.replace(self.sessions, turns=turns)
        self.decoder.sessions = self.sessions

    def default_options(self) -> DecodeOptions:
        """The decoding settings the model was tuned with (manifest "inference"); bundles written
        before they were recorded get DecodeOptions' own defaults."""
        stored = (self.sessions.manifest or {}).get("inference") or {}
        known = {k: stored[k] for k in ("beam_size", "length_penalty", "max_len_extra") if k in stored}
        try:
            return DecodeOptions(**known)
        except (TypeError, ValueError) as e:
            raise BundleError(f"manifest.json: bad inference settings {stored}: {e}") from e

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode(texts)

    def detokenize(self, ids: list[list[int]]) -> list[str]:
        return self.tokenizer.decode(ids)

    def search(self, sources: list[list[int]], options: DecodeOptions) -> SearchResult:
        return self.decoder.search(sources, options)

    def running_batch(self) -> RunningBatch:
        """An empty batch for continuous batching (NoPastMask for bundles before format 3)."""
        return RunningBatch(self.sessions)

    def prepare(self, texts: list[str], options: TextOptions) -> Prepared:
        return prepare_texts(self, texts, options)

    def translate(
        self, texts: list[str], options: DecodeOptions, text_options: TextOptions = TextOptions()
    ) -> list[list[Translation]]:
        """n_best translations per text, best first, in input order; each text's sentences are
        decoded together with every other text's (one search), then joined back."""
        if not texts:
            return []
        prepared = self.prepare(texts, text_options)
        found = self.search(prepared.sources, whole_beam(options)).hypotheses if prepared.sources else []
        return prepared.finish(self.detokenize, found, options.n_best)


def prepare_texts(translator: Translator, texts: list[str], options: TextOptions) -> Prepared:
    """The text pipeline (engine/text.py), then `translator.tokenize`. A blank text, or one whose
    sentences are all blank after the tokenizer's normalization (spaces, U+200B, U+FEFF, NUL, ...),
    gets an empty translation without the engine, as the server answers it: the model would invent one."""
    lang = translator.info.src_lang or "en"
    prepared = [prepare(text, options, lang) if text.strip() else None for text in texts]
    wanted = [
        (t, s)
        for t, p in enumerate(prepared)
        if p is not None
        for s, sentence in enumerate(p.sentences)
        if sentence.source
    ]
    tokens = translator.tokenize([prepared[t].sentences[s].source for t, s in wanted]) if wanted else []  # type: ignore[union-attr]
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
