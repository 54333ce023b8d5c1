"""nmt-serve: the gRPC translation server (grpc.aio) with health, reflection and Prometheus metrics.

Lifecycle: load and verify the bundle, or the highest version of every model of --model-repository
(server/repository.py: one scheduler per model; models are loaded and unloaded while serving through
server/control.py) (a bad one, or --device cuda without a working CUDA provider:
a one-line error, exit 2); a variant the export could not check on this provider (fp16-cuda built
without a GPU) translates the bundle's reference sentences first (engine/selfcheck.py; a mismatch:
exit 2); bind, report NOT_SERVING while warming up, then SERVING. On SIGTERM/SIGINT, within --grace-seconds:
NOT_SERVING; new translations are answered UNAVAILABLE (which retry policies retry) while the
accepted ones finish; then gRPC stops (new connections refused) and the process exits 0.

--port-file: once SERVING, the bound ports are written there as JSON ({"pid", "port", "metrics_port"},
written whole: a reader never sees half of it) and the file is removed at exit. A parent starts
nmt-serve with --port 0 --metrics-port 0 and waits for the file: no port is picked before the server
binds it, so none can be taken meanwhile (picking a "free" port first and passing it races).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry

from nmt.engine.decoding import DecodeOptions
from nmt.engine.selfcheck import startup_check
from nmt.engine.translator import ModelInfo, Translator
from nmt.engine.turns import NO_TURNS, EngineTurns

from .config import ServerConfig, from_args
from .continuous import create_scheduler
from .control import ModelControl
from .interceptors import BearerTokenInterceptor, RequestGuard
from .kserve import add_inference_service
from .metrics import Metrics, MetricsServer
from .nmt_pb import translation_pb2_grpc as pb_grpc
from .reflection import enable_reflection
from .repository import ModelEntry, Models, ModelVersions, discover
from .service import Limits, TranslationService
from .text_worker import text_pipeline
from .transport import SERVICE, TranslationServicer

log = logging.getLogger("nmt-serve")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
WARMUP_TEXT = "A warm-up sentence."
QUIET_S = 0.25  # the drain stops gRPC once no call has arrived for this long (or at the grace's end)
# gRPC core refuses larger messages itself (RESOURCE_EXHAUSTED, not counted in the metrics); up to
# this, the RequestGuard refuses those over --max-message-bytes, and counts them.
CORE_MESSAGE_LIMIT_FACTOR = 2


class NmtServer:
    """The grpc.aio server with what it serves; start()/stop()/wait_for_termination() like grpc.aio.Server."""

    def __init__(
        self,
        cfg: ServerConfig,
        servicer: TranslationServicer,
        guard: RequestGuard,
        grpc_server: grpc.aio.Server,
        metrics: Metrics,
        health: HealthServicer,
        port: int,
    ):
        self.cfg, self.servicer, self.guard, self.grpc_server = cfg, servicer, guard, grpc_server
        self.models = servicer.models
        # The default model's (else the first one's): what a single-bundle server serves.
        first = self.models.default or next(iter(self.models))
        self.translator, self.scheduler = first.translator, first.scheduler
        self.metrics, self.health, self.port = metrics, health, port
        self.control: ModelControl | None = None  # set by create_server
        self.metrics_server: MetricsServer | None = None
        self._poller: asyncio.Task[None] | None = None  # --repository-poll-seconds
        self._started = self._stopped = False

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port once started (None when metrics are off)."""
        return None if self.metrics_server is None else self.metrics_server.port

    async def start(self) -> None:
        """Start serving (idempotent): metrics endpoint, gRPC (NOT_SERVING), warm-up, SERVING."""
        if self._started:
            return
        self._started = True
        if self.cfg.metrics_port >= 0:
            try:
                self.metrics_server = self.metrics.serve(self.cfg.metrics_port, self.cfg.host.strip("[]"))
            except OSError as e:
                raise OSError(f"cannot serve metrics on {self.cfg.host}:{self.cfg.metrics_port}: {e}") from e
        await self.models.start()
        await self.grpc_server.start()
        for entry in self.models:
            await asyncio.to_thread(self._warm_up, entry)
            await entry.service.start()
        self.models.ready = True
        if self.cfg.repository_poll_seconds and self.control is not None:
            self._poller = asyncio.get_running_loop().create_task(
                self.control.watch(self.cfg.repository_poll_seconds), name="nmt-repository-poll"
            )
        for service in ("", SERVICE):
            await self.health.set(service, SERVING)
        log.info(
            "serving %s on port %d%s (metrics %s)",
            SERVICE,
            self.port,
            " with TLS" if self.cfg.tls else "",
            f"on port {self.metrics_port}" if self.metrics_server else "off",
        )

    @staticmethod
    def _warm_up(entry: ModelEntry) -> None:
        # The first run of each graph allocates and plans; do it before the first client waits for it.
        translator, options = entry.translator, entry.limits.defaults
        sources = translator.tokenize([WARMUP_TEXT])
        translator.search(sources, options)
        if options.beam_size > 1:
            translator.search(sources, type(options)(beam_size=1))

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, answer new translations UNAVAILABLE, let accepted ones finish within `grace`
        seconds, stop gRPC, free everything."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.cfg.grace_seconds if grace is None else grace
        end = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        self.models.ready = False
        if self._poller is not None:
            self._poller.cancel()
        # gRPC core's stop cancels the calls it has received but not handed over yet (clients see
        # CANCELLED, which retry policies do not retry): answer new calls UNAVAILABLE until the accepted
        # ones are done and no call has arrived for QUIET_S.
        self.servicer.draining = True
        await self.servicer.wait_idle(grace)
        # Quiet for QUIET_S counted from the later of the last call and the moment the accepted ones
        # were done: a client that sends right after its answers arrive gets UNAVAILABLE, not CANCELLED.
        idle_at = time.monotonic()
        while (quiet := time.monotonic() - max(self.guard.last_call, idle_at)) < QUIET_S and time.monotonic() < end:
            await asyncio.sleep(QUIET_S - quiet)
        await self.grpc_server.stop(max(0.0, end - time.monotonic()))  # cancels what is left at the grace's end
        await self.models.close(timeout=1.0)  # the retiring versions' schedulers too
        if self.metrics_server is not None:
            self.metrics_server.close()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.grpc_server.wait_for_termination(timeout)


def _credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    assert cfg.tls_cert is not None and cfg.tls_key is not None
    key, cert = Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes()
    ca = Path(cfg.tls_ca).read_bytes() if cfg.tls_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def bundle_defaults(translator: Translator) -> DecodeOptions | None:
    default_options = getattr(translator, "default_options", None)  # test doubles may not have it
    return default_options() if default_options else None


def limits_of(cfg: ServerConfig, translator: Translator) -> Limits:
    sessions = getattr(translator, "sessions", None)
    return Limits(
        max_texts=cfg.max_texts,
        max_sentences=cfg.max_sentences,
        max_tokens_per_text=cfg.max_tokens_per_text,
        max_text_bytes=cfg.text_bytes_limit,
        max_beam_size=cfg.max_beam_size,
        defaults=cfg.default_options(bundle_defaults(translator)),
        max_positions=getattr(sessions, "max_positions", None),
    )


Loader = Callable[[Path], Translator]


async def _load(
    cfg: ServerConfig, path: Path, load: Loader | None, turns: EngineTurns | None = None
) -> tuple[Translator, str]:
    """A bundle's translator (taking `turns` with the other models) and its start-up check ("not-run"
    when `load` is the caller's: its to check)."""
    translator = await asyncio.to_thread(load or (lambda p: Translator.from_bundle(p, cfg.runtime())), path)
    translator.take_turns(NO_TURNS if turns is None else turns)
    if load is not None:
        return translator, "not-run"
    # A variant the export could not check on this provider (fp16-cuda built without a GPU) is
    # checked here against the bundle's torch reference; a mismatch is a SelfCheckError (exit 2).
    return translator, await asyncio.to_thread(startup_check, translator)


def _entry(
    cfg: ServerConfig,
    translator: Translator,
    metrics: Metrics,
    info: ModelInfo,
    versions: tuple[int, ...],
    number: int,
    path: Path | None,
    checked: str,
) -> ModelEntry:
    """A model's own scheduler, service and series (a batch never mixes models; its metrics are labelled
    with its name and version, published once it is routed: Models)."""
    series = metrics.model(
        info.name,
        info.version,
        info=dict(
            name=info.name,
            src_lang=info.src_lang,
            tgt_lang=info.tgt_lang,
            bundle_sha256=info.bundle_sha256,
            precision=info.precision,
            provider=info.provider,
        ),
        engine=dict(
            device=cfg.device,
            provider=info.provider,
            variant=info.precision,
            onnxruntime=ort.__version__,
            selfcheck=checked,
        ),
    )
    scheduler = create_scheduler(translator, cfg.scheduler(), series)
    service = TranslationService(
        translator, scheduler, limits_of(cfg, translator), text_pipeline(translator, cfg.text_pipeline)
    )
    return ModelEntry(info, service, versions, number, path, series)


async def load_models(
    cfg: ServerConfig,
    metrics: Metrics,
    translator: Translator | None = None,
    load: Loader | None = None,
    turns: EngineTurns | None = None,
) -> tuple[Models, str]:
    """The registry of what cfg serves (a single bundle, or the highest version of every model in the
    repository) and the start-up checks' outcome. `translator`: the single bundle's, already loaded;
    `turns`: what the repository's models take their engine turns with (None: they do not)."""
    if cfg.model_repository is None:
        assert cfg.model_dir is not None  # ServerConfig requires one of the two
        checked = "not-run"  # a given translator is the caller's to check
        if translator is None:
            translator, checked = await _load(cfg, Path(cfg.model_dir), load)
        info = translator.info
        number = int(info.version) if info.version.isdigit() else 0
        entry = _entry(
            cfg, translator, metrics, info, (number,) if number else (), number, Path(cfg.model_dir), checked
        )
        return Models([entry], cfg.default_model), checked
    if translator is not None:
        raise ValueError("a translator is given for a single bundle (model_dir), not a model repository")
    entries, checks = [], set()
    for model in discover(Path(cfg.model_repository)):
        entry, checked = await repository_entry(cfg, metrics, model, load, turns)
        entries.append(entry)
        checks.add(checked)
        log.info("model %s version %d from %s", model.name, model.latest, model.path)
    return Models(entries, cfg.default_model, root=Path(cfg.model_repository)), "/".join(sorted(checks))


async def repository_entry(
    cfg: ServerConfig,
    metrics: Metrics,
    model: ModelVersions,
    load: Loader | None = None,
    turns: EngineTurns | None = None,
) -> tuple[ModelEntry, str]:
    """The entry of a repository model's highest version (loaded and checked; scheduler not started)."""
    loaded, checked = await _load(cfg, model.path, load, turns)
    info = replace(loaded.info, name=model.name, version=str(model.latest))  # the repository names it
    return _entry(cfg, loaded, metrics, info, tuple(sorted(model.versions)), model.latest, model.path, checked), checked


def live_builder(
    cfg: ServerConfig, metrics: Metrics, load: Loader | None = None, turns: EngineTurns | None = None
) -> Callable[[ModelVersions], Awaitable[ModelEntry]]:
    """How server/control.py loads a model while serving: as at start (verify, build the sessions, self-check),
    then warm it up and start its scheduler, all before any request can reach it."""

    async def build(model: ModelVersions) -> ModelEntry:
        entry, _ = await repository_entry(cfg, metrics, model, load, turns)
        try:
            await asyncio.to_thread(NmtServer._warm_up, entry)
            await entry.service.start()
            await entry.scheduler.start()
        except BaseException:
            await entry.scheduler.close(timeout=0)
            entry.service.close()
            raise
        return entry

    return build


async def create_server(
    cfg: ServerConfig,
    translator: Translator | None = None,
    registry: CollectorRegistry | None = None,
    load: Loader | None = None,
) -> tuple[NmtServer, int]:
    """Load the bundle or the model repository, build and bind the server; not started yet.

    `translator`: the single bundle's (cfg.model_dir), already loaded; `load`: how to load a bundle
    directory instead of Translator.from_bundle (tests wrap the translators). Both are the caller's to
    check (no start-up self-check). Returns the server and its bound gRPC port (useful with port 0).
    Raises ValueError (a bad bundle, repository or config: BundleError is one) or OSError (unreadable
    files, a port in use).
    """
    metrics = Metrics(CollectorRegistry() if registry is None else registry)
    turns = engine_turns(cfg, metrics)
    models, _ = await load_models(cfg, metrics, translator, load, turns)  # each model's info series: published
    # The token check runs first: without the token a client gets UNAUTHENTICATED whatever it sends.
    guard = RequestGuard(cfg.max_message_bytes, metrics, SERVICE)
    interceptors: list[grpc.aio.ServerInterceptor] = [guard]
    if cfg.auth_token:
        interceptors.insert(0, BearerTokenInterceptor(cfg.auth_token, metrics, SERVICE))
    core_limit = min(2**31 - 1, CORE_MESSAGE_LIMIT_FACTOR * cfg.max_message_bytes)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", core_limit),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not shared with another server
        ],
    )
    servicer = TranslationServicer(models, metrics)
    pb_grpc.add_TranslationServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    for service in ("", SERVICE):
        await health.set(service, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    control = ModelControl(models, live_builder(cfg, metrics, load, turns), metrics)
    add_inference_service(server, servicer, health, control)  # KServe v2 / Triton clients, same port
    enable_reflection(server, (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    address = f"{cfg.host}:{cfg.port}"
    try:
        port = server.add_secure_port(address, _credentials(cfg)) if cfg.tls else server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises RuntimeError when it cannot bind
        raise OSError(f"cannot listen on {address}: {e}") from e
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    nmt_server = NmtServer(cfg, servicer, guard, server, metrics, health, port)
    nmt_server.control = control
    return nmt_server, port


def engine_turns(cfg: ServerConfig, metrics: Metrics) -> EngineTurns | None:
    """With a model repository and --engine-turns shared or exclusive, one EngineTurns for all its models
    (engine/turns.py); else none."""
    if cfg.model_repository is None or cfg.engine_turns == "off":
        return None
    cores = 1 if cfg.engine_turns == "exclusive" else cfg.threads or None  # None: every core
    return EngineTurns(cores, on_wait=metrics.turn_wait.observe)


def write_port_file(path: Path, server: NmtServer) -> None:
    """The bound ports as JSON, replacing `path` whole (written beside it, then renamed)."""
    ports = {"pid": os.getpid(), "port": server.port, "metrics_port": server.metrics_port}
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(ports) + "\n")
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise OSError(f"cannot write the port file {path}: {e}") from e


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


async def serve(cfg: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain; the process exit code."""
    server: NmtServer | None = None
    try:
        server, _ = await create_server(cfg)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        if cfg.port_file:
            write_port_file(Path(cfg.port_file), server)
    except Exception as e:  # noqa: BLE001 - a bad bundle, port or file: one line, not a traceback
        print(f"nmt-serve: error: {one_line(e)}", file=sys.stderr)
        if server is not None:
            await server.stop(0)
        return 2
    await stop.wait()
    log.info("shutting down: finishing accepted requests (grace %.1f s)", cfg.grace_seconds)
    try:
        await server.stop(cfg.grace_seconds)
    finally:
        if cfg.port_file:
            Path(cfg.port_file).unlink(missing_ok=True)  # the ports it names are closed
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = from_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s nmt-serve %(levelname)s %(message)s")
    return asyncio.run(serve(cfg))


if __name__ == "__main__":
    raise SystemExit(main())
