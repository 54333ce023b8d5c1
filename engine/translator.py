"""Text in, text out: a bundle's tokenizer around the Decoder (what the server and CLI call)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import TOKENIZER, BundleError
from .continuous import RunningBatch
from .decoding import DecodeOptions, Decoder, SearchResult
from .prepared import Prepared, Translation, prepare_texts, whole_beam
from .runtime import RuntimeConfig, Sessions, load_sessions
from .text import TextOptions
from .tokenizer import SentencePiece
from .turns import EngineTurns, NoTurns


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
        return prepare_texts(self.tokenize, self.info.src_lang, texts, options)

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
