"""Loading and unloading models while serving (Triton's model repository extension: server/kserve.py).

load(NAME) reads REPOSITORY/NAME again and loads its highest version beside whatever serves NAME now: the
bundle is verified and its sessions built (Translator.from_bundle), the start-up self-check runs as at
start, the model is warmed up and its own scheduler started; only then are new requests switched to it
(Models.put: one step). The requests the old version accepted finish on it, and it is released once idle
(Models.retire). Loading a model that is already loaded reloads it, as in Triton. A load that fails (no such
model, a bad bundle, a failed self-check) changes nothing that serves: the error names why, a log line
says it, and nmt_model_loads_total{outcome="failed"} counts it.

unload(NAME) takes the model out of routing (new requests: NOT_FOUND) and drains it the same way.

poll() (every --repository-poll-seconds, off by default) compares the repository with what serves: a new
model, a higher version, or a version directory whose files changed is loaded as above; a model whose
directory is gone (or holds no version) is unloaded. A model unloaded over the API stays unloaded until it
is loaded over the API. A load that failed is not retried until its directory changes again, so copy a
version in place (or rename it in) and the next poll after the copy ends picks it up whole.

Control calls run one at a time (a lock): two loads of one model never race to replace it. A server that
serves a single bundle (--model-dir) has no repository to load from: FAILED_PRECONDITION. While the server
shuts down: UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .metrics import Metrics
from .repository import NAME, READY, UNAVAILABLE, ModelEntry, Models, ModelVersions, scan, signature, version_dirs

log = logging.getLogger("nmt-serve")
UNLOADED, GONE = "unloaded", "removed from the model repository"  # why a model is not served (index)
Builder = Callable[[ModelVersions], Awaitable[ModelEntry]]  # a loaded, checked, warmed-up entry, scheduler started


class ControlError(Exception):
    """A control call refused or failed: the status code and message the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str  # the served one; "" when none is
    state: str  # READY, UNAVAILABLE
    reason: str = ""


@dataclass
class ModelControl:
    models: Models
    build: Builder
    metrics: Metrics | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _reasons: dict[str, str] = field(default_factory=dict, init=False, repr=False)  # why a model is not served
    # Per model, the signature (repository.signature) of the version last loaded or tried: what poll() compares.
    _seen: dict[str, tuple[int, int, int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for entry in self.models:
            if self.models.root is not None and entry.path is not None:
                try:
                    self._seen[entry.name] = signature(entry.number, entry.path)
                except OSError:
                    pass  # gone already: the first poll finds out

    @property
    def root(self) -> Path:
        if self.models.root is None:
            raise ControlError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server serves a single bundle (--model-dir): models can be loaded and unloaded "
                "only from a model repository (--model-repository)",
            )
        return self.models.root

    def _check_serving(self, what: str) -> None:
        if not self.models.ready:
            raise ControlError(grpc.StatusCode.UNAVAILABLE, f"cannot {what}: the server is starting or shutting down")

    async def load(self, name: str) -> ModelEntry:
        """Load (or reload) model `name`'s highest version beside the served one, then switch to it."""
        root = self.root
        async with self._lock:
            self._check_serving(f"load model '{name}'")
            try:
                model = self._find(root, name)
                with suppress(OSError):
                    self._seen[name] = model.signature
                entry = await self.build(model)
            except Exception as e:  # noqa: BLE001 - any failure leaves what serves untouched, and says why
                reason = e.args[0] if isinstance(e, ControlError) else f"{type(e).__name__}: {e}"
                self._count("failed")
                log.error("model %s: load failed, %s: %s", name, self._kept(name), reason)
                if self.models.get(name) is None:
                    self._reasons[name] = f"load failed: {reason}"
                code = e.code if isinstance(e, ControlError) else grpc.StatusCode.FAILED_PRECONDITION
                raise ControlError(code, f"failed to load '{name}': {reason}") from e
            if not self.models.ready:  # the server began to stop while the model loaded
                await entry.scheduler.close(timeout=0)
                raise ControlError(
                    grpc.StatusCode.UNAVAILABLE, f"model '{name}' was loaded, but the server is shutting down"
                )
            old = self.models.put(entry)
            self._reasons.pop(name, None)
            self._count("loaded")
            log.info(
                "model %s: version %s from %s serves new requests%s",
                name,
                entry.version,
                entry.path,
                f" (version {old.version} finishes the requests it accepted, then is released)" if old else "",
            )
            return entry

    async def unload(self, name: str) -> ModelEntry:
        """Take model `name` out of routing and release it once the requests it accepted are done."""
        self.root  # noqa: B018 - a single bundle cannot be unloaded
        async with self._lock:
            self._check_serving(f"unload model '{name}'")
            if self.models.get(name) is None:
                raise ControlError(
                    grpc.StatusCode.NOT_FOUND,
                    f"failed to unload '{name}': it is not loaded; this server serves: {self.models.served()}",
                )
            old = self.models.remove(name)
            self._reasons[name] = UNLOADED
            log.info(
                "model %s: unloaded (version %s finishes the requests it accepted, then is released)", name, old.version
            )
            return old

    async def poll(self) -> list[str]:
        """One look at the repository: load what is new or changed on disk, unload what is gone. What it
        did, one line each (a failed load also says why in its own log line and metric)."""
        root = self.root
        try:
            on_disk = {model.name: model for model in scan(root, warn=False)}
        except OSError as e:
            log.warning("model repository poll: cannot read %s: %s", root, e)
            return []
        done = []
        for name, model in on_disk.items():
            if self._reasons.get(name) == UNLOADED:
                continue  # an operator unloaded it: it stays so until loaded over the API
            try:
                changed = self._seen.get(name) != model.signature
            except OSError:
                continue  # changing under us: the next poll sees it
            if changed:
                try:
                    entry = await self.load(name)
                    done.append(f"loaded {name} version {entry.version}")
                except ControlError as e:
                    done.append(str(e))
        for entry in list(self.models):
            if entry.name not in on_disk:
                with suppress(ControlError):
                    await self.unload(entry.name)
                    self._reasons[entry.name] = GONE
                    self._seen.pop(entry.name, None)
                    done.append(f"unloaded {entry.name}: no version of it is left in the repository")
        return done

    async def watch(self, period_s: float) -> None:
        """poll() every `period_s` seconds, until cancelled; a failing poll is logged and the next one runs."""
        while True:
            await asyncio.sleep(period_s)
            if not self.models.ready:
                continue  # starting or stopping
            try:
                for line in await self.poll():
                    log.info("model repository poll: %s", line)
            except Exception:  # noqa: BLE001 - polling must outlive one bad look at the disk
                log.exception("model repository poll failed; polling again in %.0f s", period_s)

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """The repository's models (and any served one no longer on disk), served or not, by name."""
        names = {e.name for e in self.models} | set(self._reasons)
        if self.models.root is not None and self.models.root.is_dir():
            names |= {
                p.name
                for p in self.models.root.iterdir()
                if p.is_dir() and NAME.fullmatch(p.name) and not p.name.startswith(".")
            }
        found = []
        for name in sorted(names):
            entry = self.models.get(name)
            if entry is not None:
                found.append(
                    IndexEntry(
                        name,
                        entry.version,
                        self.models.state(entry),
                        "" if self.models.state(entry) == READY else "draining",
                    )
                )
            elif not ready_only:
                found.append(IndexEntry(name, "", UNAVAILABLE, self._reasons.get(name, "not loaded")))
        return [f for f in found if f.state == READY or not ready_only]

    @staticmethod
    def _find(root: Path, name: str) -> ModelVersions:
        if not NAME.fullmatch(name) or name.startswith("."):
            raise ControlError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model name {name!r} is not valid: a model name is made of A-Z a-z 0-9 _ . -",
            )
        if not (root / name).is_dir():
            raise ControlError(grpc.StatusCode.NOT_FOUND, f"no model directory {name} in the model repository {root}")
        versions = version_dirs(root / name)
        if not versions:
            raise ControlError(
                grpc.StatusCode.NOT_FOUND, f"{name} holds no version directory with a bundle ({name}/1/manifest.json)"
            )
        return ModelVersions(name, versions)

    def _kept(self, name: str) -> str:
        entry = self.models.get(name)
        return f"version {entry.version} keeps serving" if entry else "it stays unloaded"

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.model_loads.labels(outcome).inc()
