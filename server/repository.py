"""The models a server serves: a model repository on disk (Triton's NAME/VERSION layout) and the registry
that routes each request to one model's service.

    REPOSITORY/NAME/VERSION/manifest.json    NAME: [A-Za-z0-9_.-]+, VERSION: a positive integer

Every NAME/VERSION directory holding a bundle (a manifest.json) is a model version; the highest version of
each model is loaded and served at start. Entries that are not model versions
(a file, a name with other characters, a version that is not a positive integer, a version without a
manifest, a model without versions) are skipped, each with a log line saying why; a repository with no
model at all is an error.

A single bundle (--model-dir) is a registry of one model, named and versioned as its ModelInfo says: one
code path for both. Each model has its own TranslationService (translator, scheduler, limits): a batch
never mixes models.

Live changes (server/control.py loads beside, then calls these): Models.put(entry) switches new requests to
a new entry in one step (a request looks its entry up and starts working on its service with no await in
between, so none is lost between the two); Models.remove(name) takes a model out of routing; either hands
the entry it replaced to retire(), which drains it in a background task (service.draining, wait_idle,
scheduler.close) while the requests it accepted finish on it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nmt.engine.translator import ModelInfo, Translator

from .metrics import ModelMetrics
from .scheduler import Scheduler
from .service import Limits, TranslationService

log = logging.getLogger("nmt-serve")
MANIFEST = "manifest.json"
NAME = re.compile(r"[A-Za-z0-9_.-]+")
VERSION = re.compile(r"[0-9]+")
READY, UNAVAILABLE = "READY", "UNAVAILABLE"


class ModelNotFound(LookupError):
    """A model name or version this server does not serve (NOT_FOUND); the message names what it serves."""

    def __init__(self, message: str, served: str):
        super().__init__(f"{message}; this server serves: {served}")
        self.served = served


@dataclass(frozen=True)
class ModelVersions:
    """One model of a repository: its version directories, ascending."""

    name: str
    versions: dict[int, Path]

    @property
    def latest(self) -> int:
        return max(self.versions)

    @property
    def path(self) -> Path:
        return self.versions[self.latest]

    @property
    def signature(self) -> tuple[int, int, int]:
        return signature(self.latest, self.path)


def signature(version: int, path: Path) -> tuple[int, int, int]:
    """What a repository poll compares (OSError when unreadable): the version, how many files its directory
    holds and when the last one was written; a copy still in progress changes it, and is retried."""
    stats = [entry.stat() for entry in path.iterdir()]
    return version, len(stats), max((s.st_mtime_ns for s in stats), default=0)


def version_dirs(model: Path, warn: bool = True) -> dict[int, Path]:
    versions: dict[int, Path] = {}
    log_skip = log.warning if warn else log.debug
    for entry in sorted(model.iterdir()):
        where = f"{model.name}/{entry.name}"
        if not entry.is_dir():
            log_skip("model repository: skipping %s: not a directory", where)
        elif not VERSION.fullmatch(entry.name) or int(entry.name) < 1:
            log_skip("model repository: skipping %s: a version is a positive integer", where)
        elif not (entry / MANIFEST).is_file():
            log_skip("model repository: skipping %s: no %s (not a model bundle)", where, MANIFEST)
        elif int(entry.name) in versions:
            log_skip("model repository: skipping %s: version %d is there twice", where, int(entry.name))
        else:
            versions[int(entry.name)] = entry
    return versions


def scan(root: Path, warn: bool = True) -> list[ModelVersions]:
    """The models of a repository directory, by name (none when it holds none); entries that are not
    model versions are skipped, each with a log line (at debug level unless `warn`)."""
    models = []
    log_skip = log.warning if warn else log.debug
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue  # .git, editors' files: never models
        if not entry.is_dir():
            log_skip("model repository: skipping %s: not a directory", entry.name)
        elif not NAME.fullmatch(entry.name):
            log_skip("model repository: skipping %r: a model name is made of A-Z a-z 0-9 _ . -", entry.name)
        elif not (versions := version_dirs(entry, warn)):
            log_skip(
                "model repository: skipping %s: no version directory with a bundle (%s/1/%s)",
                entry.name,
                entry.name,
                MANIFEST,
            )
        else:
            models.append(ModelVersions(entry.name, versions))
    return models


def discover(root: Path) -> list[ModelVersions]:
    """The models of a repository directory, by name. Raises ValueError when it is not a directory or holds
    no model version; entries that are not model versions are skipped with a log line."""
    if not root.is_dir():
        raise ValueError(f"model repository {root} is not a directory")
    models = scan(root)
    if not models:
        raise ValueError(
            f"model repository {root} holds no model: expected NAME/VERSION/{MANIFEST} (VERSION a positive integer)"
        )
    return models


@dataclass
class ModelEntry:
    """A served model: its service (translator, scheduler, limits) and what clients are told about it."""

    info: ModelInfo  # name and version as clients see them (the repository's, in repository mode)
    service: TranslationService
    versions: tuple[int, ...] = ()  # on disk, ascending (a single bundle: its version when it is a number)
    number: int = 0  # the served version as a number (0: a single bundle whose version is not one)
    path: Path | None = None
    metrics: ModelMetrics | None = None  # its series (model, version labels); info published while routed

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def translator(self) -> Translator:  # or a test double standing for one
        return self.service.translator

    @property
    def scheduler(self) -> Scheduler:
        return self.service.scheduler

    @property
    def limits(self) -> Limits:
        return self.service.limits


@dataclass
class Models:
    """The registry: name -> the served entry, and the default model of requests that name none."""

    entries: list[ModelEntry]
    default_name: str | None = None  # None: the only model, if there is one
    ready: bool = False  # set once the server has warmed every model up (and cleared when it stops)
    root: Path | None = None  # the model repository (None: a single bundle, which cannot be reloaded)
    _by_name: dict[str, ModelEntry] = field(init=False, repr=False)
    _retiring: dict[int, tuple[ModelEntry, asyncio.Task[None]]] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        assert self.entries, "a registry serves at least one model"
        self._route(self.entries)
        assert len(self._by_name) == len(self.entries), "model names are unique"
        if self.default_name is not None and self.default_name not in self._by_name:
            raise ValueError(
                f"default model {self.default_name!r} is not in the model repository; it holds: "
                f"{', '.join(self._by_name)}"
            )

    def _route(self, entries: list[ModelEntry]) -> None:
        # Both views replaced together, never edited in place: an iteration in progress sees the old ones.
        self.entries = sorted(entries, key=lambda e: e.name)
        self._by_name = {e.name: e for e in self.entries}
        for entry in self.entries:
            if entry.metrics is not None:
                entry.metrics.publish()  # nmt_model_info / nmt_engine_info of what serves

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def default(self) -> ModelEntry | None:
        if self.default_name is not None:
            return self._by_name.get(self.default_name)  # None once it is unloaded
        return self.entries[0] if len(self.entries) == 1 else None

    def served(self) -> str:
        """ "default (version 2), en-fr (version 1)": what error messages name."""
        return ", ".join(f"{e.name} (version {e.version})" for e in self.entries) or "no model"

    def lookup(self, name: str, version: str | int | None = None) -> ModelEntry:
        """The entry serving `name` (empty: the default model) at `version` (None, "" or 0: the served one).
        Raises ModelNotFound naming what is served."""
        if not name:
            entry = self.default
            if entry is None and self.default_name is not None:
                raise ModelNotFound(
                    f"no model named and the default model '{self.default_name}' is not loaded", self.served()
                )
            if entry is None:
                raise ModelNotFound(
                    "no model named and this server has no default model (--default-model): name one", self.served()
                )
        elif (entry := self._by_name.get(name)) is None:
            raise ModelNotFound(f"model '{name}' is not served", self.served())
        if version not in (None, "", 0) and str(version) != entry.version:
            text = str(version)
            on_disk = (
                " (it is on disk; only the highest version is loaded)"
                if text.isdigit() and int(text) in entry.versions
                else ""
            )
            raise ModelNotFound(f"model '{entry.name}' version {text} is not served{on_disk}", self.served())
        return entry

    def state(self, entry: ModelEntry) -> str:
        return READY if self.ready and not entry.service.draining else UNAVAILABLE

    def get(self, name: str) -> ModelEntry | None:
        return self._by_name.get(name)

    # ---- live changes: switch, remove, retire ----

    def put(self, entry: ModelEntry) -> ModelEntry | None:
        """Route `entry.name` to `entry` from now on (its scheduler started); the entry it replaces, if any,
        is retired (drained in the background)."""
        old = self._by_name.get(entry.name)
        self._route([e for e in self.entries if e.name != entry.name] + [entry])
        if old is not None:
            self.retire(old)
        return old

    def remove(self, name: str) -> ModelEntry:
        """Take model `name` out of routing (new requests: NOT_FOUND) and retire it; ModelNotFound if not served."""
        old = self.lookup(name)
        self._route([e for e in self.entries if e is not old])
        self.retire(old)
        return old

    def retire(self, entry: ModelEntry) -> None:
        """Drain `entry` in a background task: the requests it accepted finish on it, then its scheduler
        closes. (No new request reaches it: it is out of routing.)"""
        entry.service.draining = True
        task = asyncio.get_running_loop().create_task(self._drain(entry), name=f"retire {entry.name}")
        self._retiring[id(entry)] = (entry, task)
        task.add_done_callback(lambda _: self._retiring.pop(id(entry), None))

    async def _drain(self, entry: ModelEntry) -> None:
        while not await entry.service.wait_idle(60.0):
            log.info("model %s version %s: still finishing accepted requests", entry.name, entry.version)
        await entry.scheduler.close(timeout=None)
        entry.service.close()
        # Its gauge and info series go, unless a reload of the same version serves under the same labels.
        if entry.metrics is not None and not any((e.name, e.version) == (entry.name, entry.version) for e in self):
            entry.metrics.remove()
        log.info("model %s version %s: released", entry.name, entry.version)

    @property
    def retiring(self) -> list[ModelEntry]:
        """Entries out of routing, still finishing what they accepted."""
        return [entry for entry, _ in self._retiring.values()]

    async def wait_retired(self) -> None:
        """Until every retired entry is released."""
        while self._retiring:
            await asyncio.gather(*(task for _, task in self._retiring.values()), return_exceptions=True)

    # ---- the services together: the drain and the schedulers ----

    @property
    def draining(self) -> bool:
        return all(e.service.draining for e in self.entries)

    @draining.setter
    def draining(self, value: bool) -> None:
        for e in self.entries:
            e.service.draining = value

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no model works on a translation (at most `timeout` s in all); whether that happened."""
        done = await asyncio.gather(*(e.service.wait_idle(timeout) for e in [*self.entries, *self.retiring]))
        return all(done)

    async def start(self) -> None:
        for e in self.entries:
            await e.scheduler.start()

    async def close(self, timeout: float | None = None) -> None:
        await asyncio.gather(*(e.scheduler.close(timeout=timeout) for e in [*self.entries, *self.retiring]))
        for e in [*self.entries, *self.retiring]:
            e.service.close()
        for _, task in list(self._retiring.values()):
            task.cancel()
