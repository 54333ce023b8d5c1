"""The one request path under every protocol: limits, the blank rule, the text pipeline, scheduling.

The nmt servicer (server/transport.py) and KServe's (server/kserve.py) turn protos into these plain
calls and the results back into protos. Checks run cheapest first, and only cheap ones on the event
loop: the number of texts, then per text whether it is blank (whitespace only: an empty translation
whatever its length) and its UTF-8 size (max_text_bytes), all before any text processing. The text
pipeline (sentence splitting, case, protected spans: engine/text.py) with the tokenizer, and putting
the translations back together, run off this loop in the service's TextPipeline (server/text_worker.py:
a child process, short requests in one thread), since health checks share this loop. Then the sentence
count, each sentence's tokens and the model's positions, before any model work. A request's sentences
go to the scheduler together, so they batch with each other and with other requests' sentences.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from nmt.engine.decoding import DecodeOptions
from nmt.engine.prepared import Prepared, Translation, whole_beam
from nmt.engine.text import TextOptions
from nmt.engine.translator import Translator

from .scheduler import Scheduler, SchedulerClosed
from .text_worker import TextPipeline, text_pipeline


@dataclass(frozen=True)
class Limits:
    max_texts: int = 64
    max_tokens_per_text: int = 256  # per sentence; per text when a request turns splitting off
    max_text_bytes: int = 64 * 256
    max_beam_size: int = 16
    defaults: DecodeOptions = DecodeOptions()
    max_positions: int | None = None  # the model's: source tokens + max_len_extra must fit
    max_sentences: int = 256  # per request, all texts together


def check_texts(texts: list[str], limits: Limits) -> None:
    """Count and UTF-8 size, before any text processing (a blank text skips its size check)."""
    if not texts:
        raise ValueError("texts is empty: send at least one text")
    if len(texts) > limits.max_texts:
        raise ValueError(f"{len(texts)} texts; the limit is max_texts_per_request={limits.max_texts}")
    for i, text in enumerate(texts):
        if text.strip() and (size := len(text.encode("utf-8"))) > limits.max_text_bytes:
            raise ValueError(f"text {i} has {size} bytes; the limit is max_text_bytes={limits.max_text_bytes}")


def check_prepared(prepared: Prepared, options: DecodeOptions, limits: Limits, split: bool) -> None:
    """Sentences per request, then tokens per sentence (per text when not split) and the model's positions."""
    if (count := prepared.sentence_count()) > limits.max_sentences:
        raise ValueError(
            f"{count} sentences in this request; the limit is max_sentences_per_request={limits.max_sentences}"
        )
    for (text, sentence), source in zip(prepared.owners, prepared.sources):
        where = f"text {text}, sentence {sentence}" if split else f"text {text}"
        if len(source) > limits.max_tokens_per_text:
            raise ValueError(
                f"{where} has {len(source)} tokens; the limit is max_tokens_per_text={limits.max_tokens_per_text}"
            )
        if limits.max_positions is not None and len(source) + options.max_len_extra > limits.max_positions:
            raise ValueError(
                f"{where}: {len(source)} tokens + max_len_extra {options.max_len_extra} exceed the "
                f"model's {limits.max_positions} positions"
            )


class TranslationService:
    def __init__(self, translator: Translator, scheduler: Scheduler, limits: Limits, text: TextPipeline | None = None):
        self.translator, self.scheduler, self.limits = translator, scheduler, limits
        self.text = text or text_pipeline(translator, "thread")
        self.draining = False  # set on shutdown: new translations get UNAVAILABLE
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def translate(
        self, texts: list[str], options: DecodeOptions, text_options: TextOptions, deadline: float | None
    ) -> list[list[Translation]]:
        """n_best translations per text. Raises ValueError for bad input, scheduler errors otherwise."""
        if self.draining:
            raise SchedulerClosed("the server is shutting down: retry on another replica")
        with self._working():
            check_texts(texts, self.limits)
            prepared = await self.text.prepare(texts, text_options)
            check_prepared(prepared, options, self.limits, text_options.split_sentences)
            found = (
                await self.scheduler.submit(prepared.sources, whole_beam(options), deadline) if prepared.sources else []
            )
            return await self.text.finish(prepared, found, options.n_best)

    async def start(self) -> None:
        """Ready the text pipeline (its process and tokenizer) before the first request."""
        await self.text.start()

    def close(self) -> None:
        """Free the text pipeline (once no translation is being worked on: see wait_idle)."""
        self.text.close()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no translation is being worked on (at most `timeout` s); whether that happened."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
