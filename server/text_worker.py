"""Where a service runs its text pipeline (engine/prepared.py: sentences, case, spans, tokenizer, and
the translations joined back): in a process of its own, or in one thread of the server's.

A regular-expression scan or a tokenizer call holds the GIL for its whole length (one scan of a 16 KB
text of "@" or "a1" takes 10-14 ms), and the event loop that answers health checks waits for the GIL
each time: with the pipeline in a thread, a prober's health checks had a p99 of 45 ms while 32 clients
sent hostile texts, 10 ms while they sent test sentences; in the process, 13 ms (nmt-bench text-cost,
docs/text-pipeline.md). In a child process the pipeline never holds this process's GIL; the loop
only pickles the texts and the token ids. Short requests
(SMALL_REQUEST_CHARS) stay in the thread: their pipeline is shorter than the hop.

The process is forked from a forkserver (started clean, so no gRPC thread is ever forked) and loads
the bundle's tokenizer once. If it dies, the requests it held fail (TextWorkerError) and the next
request starts a new one. A translator without a tokenizer file (a test double) runs in the thread.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from nmt.engine.hypothesis import Hypothesis
from nmt.engine.prepared import Prepared, Translation, prepare_texts
from nmt.engine.text import TextOptions
from nmt.engine.tokenizer import SentencePiece

log = logging.getLogger("nmt-serve")
WHERE = ("process", "thread")
SMALL_REQUEST_CHARS = 1024  # a request's texts together; up to this, the pipeline runs in the thread


class TextWorkerError(RuntimeError):
    """The text process died while it held a request (the next request starts a new one)."""


class TextSide(Protocol):
    def tokenize(self, texts: list[str]) -> list[list[int]]: ...

    def detokenize(self, ids: list[list[int]]) -> list[str]: ...


class TextPipeline:
    """prepare() and finish() of a request, run by `executor` on `side` (a translator's tokenizer)."""

    def __init__(self, side: TextSide, src_lang: str, executor: Executor):
        self.side, self.src_lang, self.executor = side, src_lang, executor

    async def prepare(self, texts: list[str], options: TextOptions) -> Prepared:
        return await self._run(prepare_texts, self.side.tokenize, self.src_lang, texts, options)

    async def finish(self, prepared: Prepared, found: list[list[Hypothesis]], n_best: int) -> list[list[Translation]]:
        return await self._run(prepared.finish, self.side.detokenize, found, n_best)

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def start(self) -> None:
        """Nothing to start in a thread."""

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class ProcessTextPipeline(TextPipeline):
    """The pipeline in a child process holding its own copy of the tokenizer; a request of at most
    SMALL_REQUEST_CHARS characters stays in a thread here: the hop to the process and back cost such a
    request about a millisecond (1 client's p50 17.9 against 16.9 ms in a first nmt-bench load run, within
    its noise), about as long as its pipeline holds the GIL (1 KB of the costliest hostile shape: ~1 ms)."""

    def __init__(self, nearby: TextSide, tokenizer_path: Path, src_lang: str):
        self.tokenizer_path, self.in_thread_only = tokenizer_path, False
        self.nearby = TextPipeline(nearby, src_lang, ThreadPoolExecutor(1, thread_name_prefix="nmt-text"))
        super().__init__(_ChildSide(), src_lang, self._new_pool())

    def _new_pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # each process forked with this module imported
        return ProcessPoolExecutor(1, mp_context=context, initializer=_load, initargs=(str(self.tokenizer_path),))

    async def prepare(self, texts: list[str], options: TextOptions) -> Prepared:
        if self.in_thread_only or sum(map(len, texts)) <= SMALL_REQUEST_CHARS:
            return await self.nearby.prepare(texts, options)
        return await super().prepare(texts, options)

    async def finish(self, prepared: Prepared, found: list[list[Hypothesis]], n_best: int) -> list[list[Translation]]:
        size = sum(len(text.text) for text in prepared.texts if text is not None)
        if self.in_thread_only or size <= SMALL_REQUEST_CHARS:
            return await self.nearby.finish(prepared, found, n_best)
        return await super().finish(prepared, found, n_best)

    async def _run(self, function: Any, *args: Any) -> Any:
        try:
            return await super()._run(function, *args)
        except BrokenProcessPool as e:
            log.error("the text process died; starting a new one")
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = self._new_pool()
            raise TextWorkerError("the text process died while it held this request: retry it") from e

    async def start(self) -> None:
        """Start the process and load the tokenizer (the first long request would wait for it otherwise).
        Where no process can start (no /dev/shm for its queue's semaphores, say), the thread does it all."""
        try:
            await super().prepare(["A warm-up sentence."], TextOptions())
        except (OSError, TextWorkerError) as e:
            log.warning("the text pipeline runs in a thread: the text process did not start (%s)", e)
            self.in_thread_only = True

    def close(self) -> None:
        self.nearby.close()
        super().close()


def text_pipeline(translator: Any, where: str = "process") -> TextPipeline:
    """The pipeline for `translator`: in a process where it has a tokenizer file, else in a thread."""
    if where not in WHERE:
        raise ValueError(f"text pipeline where must be one of {', '.join(WHERE)}, got {where!r}")
    tokenizer = getattr(translator, "tokenizer", None)
    path = getattr(tokenizer, "path", None)
    if where == "process" and type(tokenizer) is SentencePiece and path is not None and _own_text_side(translator):
        try:
            return ProcessTextPipeline(translator, Path(path), translator.info.src_lang)
        except OSError as e:  # the pool's queue needs semaphores (/dev/shm)
            log.warning("the text pipeline runs in a thread: no text process here (%s)", e)
    return TextPipeline(translator, translator.info.src_lang, ThreadPoolExecutor(1, thread_name_prefix="nmt-text"))


def _own_text_side(translator: Any) -> bool:
    """Whether tokenize/detokenize are the Translator's own (a test double may wrap or replace them)."""
    from nmt.engine.translator import Translator

    return type(translator) is Translator


class _ChildSide:
    """Stands for the child's tokenizer in the parent: these bound methods pickle without state and
    run on the tokenizer the child loaded (_load)."""

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        assert _TOKENIZER is not None, "runs in the text process only"
        return _TOKENIZER.encode(texts)

    def detokenize(self, ids: list[list[int]]) -> list[str]:
        assert _TOKENIZER is not None, "runs in the text process only"
        return _TOKENIZER.decode(ids)


_TOKENIZER: SentencePiece | None = None  # the text process's own, set once by _load


def _load(tokenizer_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = SentencePiece.load(tokenizer_path)
