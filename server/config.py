"""ServerConfig: nmt-serve's flags, each with an environment-variable default (NMT_*)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from nmt.engine.decoding import DecodeOptions
from nmt.engine.runtime import DEVICES, PRECISIONS, RuntimeConfig

from .batching import BATCHING, SchedulerConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# How the models of a repository share the cores (engine/turns.py): off, the operating system does;
# shared, a budget of --threads cores, small steps first; exclusive, one step at a time, small first.
ENGINE_TURNS = ("off", "shared", "exclusive")
# A SentencePiece piece is at most 16 characters of at most 4 UTF-8 bytes: a text longer than this
# many bytes per allowed token cannot fit in max_tokens_per_text (spaces and invisible characters
# aside, which normalization drops), so it is refused before tokenizing.
BYTES_PER_TOKEN = 64


@dataclass(frozen=True)
class ServerConfig:
    model_dir: str | None = None  # one bundle; or:
    model_repository: str | None = None  # REPOSITORY/NAME/VERSION/ bundles (server/repository.py)
    default_model: str | None = None  # the model of requests that name none (default: the only one)
    repository_poll_seconds: float = 0.0  # > 0: look for new, changed and removed models this often (0: never)
    host: str = "[::]"
    port: int = 50051  # 0 = any free port (the bound one is logged)
    metrics_port: int = 9090  # 0 = any free port; -1 = no metrics HTTP server
    port_file: str | None = None  # once serving: the bound ports, as JSON (how a parent learns ports bound with 0)
    max_batch_size: int = 32  # sentences per engine call
    max_batch_tokens: int = 4096  # padded source tokens per engine call (sentences x longest)
    # Static batching: how long the oldest queued sentence waits for others. 0: the batch forms when
    # the engine is free, so load alone makes batches grow (5 ms halved 1-client throughput:
    # README "Batching policy").
    max_wait_ms: float = 0.0
    max_queue_size: int = 1024  # queued sentences; beyond it requests get RESOURCE_EXHAUSTED
    workers: int = 1  # engine threads (concurrent batches)
    # Repository mode: how the models' engine steps share the cores (engine/turns.py, ENGINE_TURNS). Shared:
    # never more threads than cores, small steps first; exclusive runs one step at a time, and a loaded model
    # then loses half its throughput or more (bench/results/fairness.md).
    engine_turns: str = "shared"
    batching: str = "static"  # static: whole batches (faster here, README); continuous: join/leave between steps
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0  # ONNX Runtime intra-op threads per session (0 = its default)
    shortlist: str = "off"  # on: score the bundle's vocabulary shortlist per batch (engine/shortlist.py); off: every id
    step_decoder: str = "on"  # on: the bundle's step decoders (docs/engine-speed.md); off: the traced decoder
    text_pipeline: str = "process"  # process: sentences, spans and tokenizer in a child process; thread: in one thread
    max_texts: int = 64  # texts per request
    max_sentences: int = 256  # sentences per request, all texts together, after sentence splitting
    max_tokens_per_text: int = 256
    max_text_bytes: int | None = None  # UTF-8 bytes per text, checked before tokenizing; None: 64 x the above
    max_beam_size: int = 16
    default_beam_size: int | None = None  # None: the bundle's inference setting
    grace_seconds: float = 30.0  # on SIGTERM: time to finish accepted requests
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None  # with it, clients must present a certificate it signed (mutual TLS)
    auth_token: str | None = field(default=None, repr=False)  # required as `authorization: Bearer <token>`
    max_message_bytes: int = 4 * 1024 * 1024  # larger requests: RESOURCE_EXHAUSTED (counted in the metrics)
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.model_dir and not self.model_repository:
            raise ValueError(
                "a model is required: --model-dir (NMT_MODEL_DIR) or --model-repository (NMT_MODEL_REPOSITORY)"
            )
        if self.model_dir and self.model_repository:
            raise ValueError("give --model-dir (NMT_MODEL_DIR) or --model-repository (NMT_MODEL_REPOSITORY), not both")
        if self.default_model is not None and not self.default_model:
            raise ValueError("default_model must not be empty (leave it unset for the only model)")
        for name in (
            "port",
            "max_batch_size",
            "max_batch_tokens",
            "max_queue_size",
            "workers",
            "max_texts",
            "max_sentences",
            "max_tokens_per_text",
            "max_text_bytes",
            "max_beam_size",
            "default_beam_size",
            "max_message_bytes",
        ):
            low = 0 if name == "port" else 1
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if not -1 <= self.metrics_port <= 65535 or self.port > 65535:
            raise ValueError(
                f"ports must be in 0..65535 (metrics_port may be -1), got {self.port} and {self.metrics_port}"
            )
        if self.max_wait_ms < 0 or self.grace_seconds < 0 or self.threads < 0 or not self.repository_poll_seconds >= 0:
            raise ValueError("max_wait_ms, grace_seconds, threads and repository_poll_seconds must be >= 0")
        if self.repository_poll_seconds and not self.model_repository:
            raise ValueError("repository_poll_seconds needs a model repository (--model-repository)")
        if self.max_texts > self.max_queue_size:
            raise ValueError(f"max_texts ({self.max_texts}) must not exceed max_queue_size ({self.max_queue_size})")
        if self.default_beam_size is not None and self.default_beam_size > self.max_beam_size:
            raise ValueError(
                f"default_beam_size ({self.default_beam_size}) must not exceed max_beam_size ({self.max_beam_size})"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca (mutual TLS) needs tls_cert and tls_key")
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        for name in ("shortlist", "step_decoder"):
            if getattr(self, name) not in ("on", "off"):
                raise ValueError(f"{name} must be on or off, got {getattr(self, name)!r}")
        if self.text_pipeline not in ("process", "thread"):
            raise ValueError(f"text_pipeline must be process or thread, got {self.text_pipeline!r}")
        if self.engine_turns not in ENGINE_TURNS:
            raise ValueError(f"engine_turns must be one of {', '.join(ENGINE_TURNS)}, got {self.engine_turns!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        RuntimeConfig(self.device, self.precision, self.threads)  # validates device and precision

    @property
    def text_bytes_limit(self) -> int:
        return BYTES_PER_TOKEN * self.max_tokens_per_text if self.max_text_bytes is None else self.max_text_bytes

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def runtime(self) -> RuntimeConfig:
        return RuntimeConfig(
            device=self.device,
            precision=self.precision,
            intra_op_threads=self.threads,
            shortlist=self.shortlist == "on",
            step_decoder=self.step_decoder == "on",
            per_row_decoder=self.batching == "continuous",
        )

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(
            self.max_batch_size,
            self.max_batch_tokens,
            self.max_wait_ms / 1000.0,
            self.max_queue_size,
            self.workers,
            self.batching,
        )

    def default_options(self, bundle_defaults: DecodeOptions | None = None) -> DecodeOptions:
        """The bundle's inference settings, with --default-beam-size in place of its beam when given."""
        base = bundle_defaults or DecodeOptions()
        if self.default_beam_size is None:
            return base
        return dataclasses.replace(base, beam_size=self.default_beam_size)


# (flag, field, type, help). A flag's default is its environment variable NMT_<FIELD>, else the field's.
FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--model-dir", "model_dir", str, "model bundle directory (from nmt-export); or --model-repository"),
    (
        "--model-repository",
        "model_repository",
        str,
        "serve every model of this directory, laid out "
        "NAME/VERSION/ (VERSION a positive integer; the highest version of each model is served)",
    ),
    ("--default-model", "default_model", str, "the model of requests that name none (default: the only model)"),
    (
        "--repository-poll-seconds",
        "repository_poll_seconds",
        float,
        "with --model-repository: every X seconds, "
        "load new models and new or changed versions, unload models whose directory is gone; 0 (default) = never "
        "(load and unload over the API)",
    ),
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "gRPC port; 0 = any free port"),
    ("--metrics-port", "metrics_port", int, "Prometheus /metrics HTTP port; 0 = any free port, -1 = off"),
    (
        "--port-file",
        "port_file",
        str,
        'once serving, write {"pid": P, "port": N, "metrics_port": M or null} '
        "(JSON) to this file, removed at exit: how a parent learns the ports bound with 0",
    ),
    ("--max-batch-size", "max_batch_size", int, "most sentences in one engine batch (being decoded at once)"),
    ("--max-batch-tokens", "max_batch_tokens", int, "most padded source tokens (sentences x longest) in one batch"),
    (
        "--max-wait-ms",
        "max_wait_ms",
        float,
        "static batching: longest a queued sentence waits for a batch to fill; "
        "0 (default) = a batch forms as soon as the engine is free",
    ),
    ("--max-queue-size", "max_queue_size", int, "most queued sentences; more -> RESOURCE_EXHAUSTED"),
    ("--workers", "workers", int, "engine threads, i.e. batches computed at once"),
    (
        "--engine-turns",
        "engine_turns",
        str,
        "with a model repository, how the models' engine steps share the "
        "cores: shared (default), a budget of --threads cores (all by default), small steps first, none waiting "
        "much over 50 ms; exclusive, one step at a time in that order (a light model keeps its latency under "
        "another's load, which loses throughput); off, whenever ready (the OS shares them)",
    ),
    (
        "--batching",
        "batching",
        str,
        "static (default): a batch runs until its last sentence ends; continuous: "
        "requests join and leave the running batch between decoder steps (bundle format 3)",
    ),
    ("--device", "device", str, f"execution device: {'|'.join(DEVICES)} (auto: CUDA when available)"),
    ("--precision", "precision", str, f"bundle variant precision: {'|'.join(PRECISIONS)}"),
    ("--threads", "threads", int, "ONNX Runtime intra-op threads; 0 = its default"),
    (
        "--shortlist",
        "shortlist",
        str,
        "on: score only the bundle's vocabulary shortlist per batch (up to 1.3x faster, "
        "BLEU within 0.3, outputs depend on batch mates); off (default): every id, as the torch reference",
    ),
    (
        "--step-decoder",
        "step_decoder",
        str,
        "on (default): the bundle's in-place-cache step decoders on the CPU "
        "(faster, outputs as the torch reference); off: the traced decoder, as bundles without them",
    ),
    (
        "--text-pipeline",
        "text_pipeline",
        str,
        "process (default): the text pipeline (sentences, case, spans, tokenizer) in a child process, so it never "
        "holds the GIL that health checks wait for; thread: in one thread of the server",
    ),
    ("--max-texts", "max_texts", int, "most texts in one request"),
    (
        "--max-sentences-per-request",
        "max_sentences",
        int,
        "most sentences in one request, all its texts split into sentences together",
    ),
    (
        "--max-tokens-per-text",
        "max_tokens_per_text",
        int,
        "most source tokens in one sentence (in one text when a request turns split_sentences off)",
    ),
    (
        "--max-text-bytes",
        "max_text_bytes",
        int,
        f"most UTF-8 bytes in one text, checked before tokenizing (default: {BYTES_PER_TOKEN} x --max-tokens-per-text)",
    ),
    ("--max-beam-size", "max_beam_size", int, "largest beam a request may ask for"),
    (
        "--default-beam-size",
        "default_beam_size",
        int,
        "beam size of requests that leave it unset (default: the bundle's inference setting)",
    ),
    ("--grace-seconds", "grace_seconds", float, "on SIGTERM/SIGINT, time to finish accepted requests"),
    ("--tls-cert", "tls_cert", str, "PEM server certificate (enables TLS)"),
    ("--tls-key", "tls_key", str, "PEM private key of --tls-cert"),
    ("--tls-ca", "tls_ca", str, "PEM CA bundle; clients must present a certificate it signed (mutual TLS)"),
    ("--auth-token", "auth_token", str, "require metadata 'authorization: Bearer TOKEN' (prefer the env var)"),
    (
        "--max-message-bytes",
        "max_message_bytes",
        int,
        "largest request or response message; a larger request gets RESOURCE_EXHAUSTED",
    ),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR"),
]


SECRETS = ("auth_token",)


def env_var(name: str) -> str:
    return "NMT_" + name.upper()


def parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    defaults = {f.name: None if f.default is MISSING else f.default for f in fields(ServerConfig)}
    p = argparse.ArgumentParser(
        prog="nmt-serve",
        description="Serve a model bundle over gRPC (nmt.v1.TranslationService), with health, "
        "reflection and Prometheus metrics. Every flag defaults to its environment variable, else the value shown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, name, kind, text in FLAGS:
        default = env.get(env_var(name), defaults[name])
        if name in SECRETS:  # never printed by --help: resolved in from_args
            default, text = argparse.SUPPRESS, f"{text}; not set by default"
        metavar = {int: "N", float: "X"}.get(kind, name.split("_")[-1].upper())
        p.add_argument(
            flag, dest=name, type=kind, default=default, metavar=metavar, help=f"{text} [env {env_var(name)}]"
        )
    return p


def _one_model_source(values: dict[str, Any], env: Mapping[str, str]) -> None:
    """A model source given on the command line wins over the other one's environment variable; with both
    in the environment, the single bundle wins (the image sets NMT_MODEL_REPOSITORY and NMT_DEFAULT_MODEL:
    `docker run -e NMT_MODEL_DIR=/models/mine` serves that bundle). Empty is unset."""
    for name in ("model_dir", "model_repository", "default_model"):
        values[name] = values[name] or None
    if values["model_dir"] and values["model_repository"]:
        from_env = {name: values[name] == env.get(env_var(name)) for name in ("model_dir", "model_repository")}
        if from_env["model_dir"] and not from_env["model_repository"]:
            values["model_dir"] = None
        elif from_env["model_repository"]:
            values["model_repository"] = None
            if values["default_model"] == env.get(env_var("default_model")):
                values["default_model"] = None  # the repository's default, not this bundle's name


def from_args(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Parse flags (environment defaults); bad values exit through argparse with a message."""
    env = os.environ if env is None else env
    p = parser(env)
    values = vars(p.parse_args(argv))
    _one_model_source(values, env)
    for name in SECRETS:
        values.setdefault(name, env.get(env_var(name)))
    try:
        return ServerConfig(**values)
    except (TypeError, ValueError) as e:
        p.error(str(e))
        raise  # unreachable: p.error exits
