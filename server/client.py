"""A Python client for nmt.v1.TranslationService (sync and asyncio) and the `nmt-client` CLI.

    nmt-client translate "A man rides a bike." [--beam 4] [--n-best 1] [--deadline 10]
    nmt-client translate < lines.txt             (one translation per input line)
    nmt-client translate --model en-fr "..."    (a model of the server's repository; default: its default model)
    nmt-client info [--model NAME] | health
    nmt-client models list                      (name, versions, serving version, languages, state)
    nmt-client models load NAME | unload NAME   (load or reload a model of the server's repository: its highest
                                                 version; unload: stop serving it; Triton's repository calls)
    nmt-client --target HOST:PORT translate ...  (connection flags before or after the command)
Common flags: --target HOST:PORT (env NMT_TARGET; else localhost:$NMT_PORT when nmt-serve's NMT_PORT is
set, as in the image, whose HEALTHCHECK is `nmt-client health`), --token (env NMT_AUTH_TOKEN), TLS: --tls,
--ca FILE (trust it), --cert/--key FILES (mutual TLS). With --n-best > 1 or --scores, lines are
`INDEX<TAB>NORMALIZED_SCORE<TAB>TRANSLATION`. Errors: one line with the status code, exit 1.

Only grpcio and the generated code are needed (no model, no onnxruntime).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .kserve_pb import grpc_predict_v2_pb2 as kpb
from .kserve_pb import grpc_predict_v2_pb2_grpc as kpb_grpc
from .nmt_pb import translation_pb2 as pb
from .nmt_pb import translation_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Hypothesis:
    text: str
    tokens: int
    score: float  # 0 unless scores were asked for
    normalized_score: float


@dataclass(frozen=True)
class Connection:
    target: str = DEFAULT_TARGET
    token: str | None = None  # sent as `authorization: Bearer <token>`
    tls: bool = False  # implied by any of ca/cert/key
    ca: str | None = None  # PEM roots to trust (default: the system's)
    cert: str | None = None  # PEM client certificate, for mutual TLS
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.ca or self.cert or self.key):
            return None
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_args(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]


def request_options(
    beam_size: int | None = None,
    n_best: int | None = None,
    length_penalty: float | None = None,
    max_len_extra: int | None = None,
    return_scores: bool = False,
) -> pb.DecodeOptions:
    """DecodeOptions with only the given fields set (the server fills in the rest)."""
    given = {"beam_size": beam_size, "n_best": n_best, "length_penalty": length_penalty, "max_len_extra": max_len_extra}
    return pb.DecodeOptions(return_scores=return_scores, **{k: v for k, v in given.items() if v is not None})


def translate_request(
    texts: list[str], model: str = "", version: int | None = None, **options: Any
) -> pb.TranslateRequest:
    return pb.TranslateRequest(texts=texts, options=request_options(**options), model=model, version=version)


def from_proto(response: pb.TranslateResponse) -> list[list[Hypothesis]]:
    return [
        [Hypothesis(h.text, h.tokens, h.score, h.normalized_score) for h in t.hypotheses] for t in response.translations
    ]


class TranslationClient:
    """Blocking client. Methods raise grpc.RpcError (with .code() and .details()) on failure."""

    def __init__(self, connection: Connection | None = None, **kwargs: Any):
        self.connection = connection or Connection(**kwargs)
        c, creds = self.connection, self.connection.credentials()
        self.channel = (
            grpc.secure_channel(c.target, creds, c.channel_args())
            if creds
            else grpc.insecure_channel(c.target, c.channel_args())
        )
        self.stub = pb_grpc.TranslationServiceStub(self.channel)

    def translate(
        self,
        texts: list[str],
        *,
        timeout: float | None = None,
        model: str = "",
        version: int | None = None,
        **options: Any,
    ) -> list[list[Hypothesis]]:
        """Hypotheses per text, best first, from `model` (empty: the server's default) at `version` (None: the
        served one). options: beam_size, n_best, length_penalty, max_len_extra, return_scores."""
        request = translate_request(texts, model, version, **options)
        return from_proto(self.stub.Translate(request, timeout=timeout, metadata=self.connection.metadata()))

    def translate_stream(
        self,
        requests: Iterable[tuple[str, list[str]]],
        *,
        timeout: float | None = None,
        model: str = "",
        version: int | None = None,
        **options: Any,
    ) -> Iterator[tuple[str, list[list[Hypothesis]] | grpc.StatusCode, str]]:
        """(id, hypotheses, "") per done request, or (id, status code, message) for a failed one; any order."""
        opts = request_options(**options)
        stream = (
            pb.TranslateStreamRequest(id=i, texts=texts, options=opts, model=model, version=version)
            for i, texts in requests
        )
        for r in self.stub.TranslateStream(stream, timeout=timeout, metadata=self.connection.metadata()):
            yield _stream_item(r)

    def model_info(self, model: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(
            pb.GetModelInfoRequest(model=model), timeout=timeout, metadata=self.connection.metadata()
        )

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelEntry]:
        response = self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=self.connection.metadata())
        return list(response.models)

    def load_model(self, name: str, *, timeout: float | None = None) -> None:
        """Load, or reload, model `name`'s highest version (Triton's RepositoryModelLoad); returns once new
        requests go to it."""
        request = kpb.RepositoryModelLoadRequest(model_name=name)
        kpb_grpc.GRPCInferenceServiceStub(self.channel).RepositoryModelLoad(
            request, timeout=timeout, metadata=self.connection.metadata()
        )

    def unload_model(self, name: str, *, timeout: float | None = None) -> None:
        """Stop serving model `name` (Triton's RepositoryModelUnload)."""
        request = kpb.RepositoryModelUnloadRequest(model_name=name)
        kpb_grpc.GRPCInferenceServiceStub(self.channel).RepositoryModelUnload(
            request, timeout=timeout, metadata=self.connection.metadata()
        )

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... of the server ("") or one service."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TranslationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTranslationClient:
    """asyncio client (grpc.aio); the same methods as TranslationClient, awaitable."""

    def __init__(self, connection: Connection | None = None, **kwargs: Any):
        self.connection = connection or Connection(**kwargs)
        c, creds = self.connection, self.connection.credentials()
        self.channel = (
            grpc.aio.secure_channel(c.target, creds, c.channel_args())
            if creds
            else grpc.aio.insecure_channel(c.target, c.channel_args())
        )
        self.stub = pb_grpc.TranslationServiceStub(self.channel)

    async def translate(
        self,
        texts: list[str],
        *,
        timeout: float | None = None,
        model: str = "",
        version: int | None = None,
        **options: Any,
    ) -> list[list[Hypothesis]]:
        request = translate_request(texts, model, version, **options)
        return from_proto(await self.stub.Translate(request, timeout=timeout, metadata=self.connection.metadata()))

    async def translate_stream(
        self,
        requests: Iterable[tuple[str, list[str]]],
        *,
        timeout: float | None = None,
        model: str = "",
        version: int | None = None,
        **options: Any,
    ) -> AsyncIterator[tuple[str, list[list[Hypothesis]] | grpc.StatusCode, str]]:
        opts = request_options(**options)
        stream = (
            pb.TranslateStreamRequest(id=i, texts=texts, options=opts, model=model, version=version)
            for i, texts in requests
        )
        async for r in self.stub.TranslateStream(stream, timeout=timeout, metadata=self.connection.metadata()):
            yield _stream_item(r)

    async def model_info(self, model: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(
            pb.GetModelInfoRequest(model=model), timeout=timeout, metadata=self.connection.metadata()
        )

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelEntry]:
        response = await self.stub.ListModels(
            pb.ListModelsRequest(), timeout=timeout, metadata=self.connection.metadata()
        )
        return list(response.models)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        status = (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncTranslationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _stream_item(r: pb.TranslateStreamResponse) -> tuple[str, list[list[Hypothesis]] | grpc.StatusCode, str]:
    if r.WhichOneof("result") == "error":
        code = next((c for c in grpc.StatusCode if c.value[0] == r.error.code), grpc.StatusCode.UNKNOWN)
        return r.id, code, r.error.message
    return r.id, from_proto(r.response), ""


# ---- CLI ----


def default_target(env: Mapping[str, str]) -> str:
    """NMT_TARGET; else the port nmt-serve reads (NMT_PORT) on localhost, so a HEALTHCHECK in exec
    form (no shell to expand variables) finds the server wherever NMT_PORT puts it; else 50051."""
    if env.get("NMT_TARGET"):
        return env["NMT_TARGET"]
    port = env.get("NMT_PORT", "")
    return f"localhost:{port}" if port.isdigit() else DEFAULT_TARGET


def _connection_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--target, --token, TLS and --deadline. The subcommands get them too (default SUPPRESS), so
    they work before the subcommand (as grpcurl and kubectl users type them) and after it; given
    after, they win; unset after, the values before it (or the defaults) stay."""
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)  # noqa: E731
    target = default_target(os.environ)
    parser.add_argument(
        "--target", default=default(target), help=f"server host:port [env NMT_TARGET] (default: {target})"
    )
    parser.add_argument(
        "--token", default=default(os.environ.get("NMT_AUTH_TOKEN")), help="bearer token [env NMT_AUTH_TOKEN]"
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False), help="use TLS (implied by --ca/--cert/--key)"
    )
    parser.add_argument("--ca", default=default(None), help="PEM CA certificates to trust")
    parser.add_argument("--cert", default=default(None), help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key", default=default(None), help="PEM private key of --cert")
    parser.add_argument("--deadline", type=float, default=default(30.0), help="seconds per call (default: 30)")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, defaults=False)
    parser = argparse.ArgumentParser(
        prog="nmt-client",
        description="Translate with an nmt-serve server over gRPC. Connection flags go before or after the command.",
    )
    _connection_flags(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)
    tr = commands.add_parser("translate", parents=[common], help="translate texts (arguments, else stdin lines)")
    tr.add_argument("texts", nargs="*", help="texts to translate; none: read lines from stdin")
    tr.add_argument(
        "--model", default="", help="model name (nmt-client models list); default: the server's default model"
    )
    tr.add_argument("--version", type=int, help="model version (default: the one the server serves)")
    tr.add_argument("--beam", type=int, help="beam size (server default when unset); 1 = greedy")
    tr.add_argument("--n-best", type=int, help="translations per text")
    tr.add_argument("--length-penalty", type=float, help="GNMT length penalty alpha")
    tr.add_argument("--max-len-extra", type=int, help="output may be this many tokens longer than the input")
    tr.add_argument("--scores", action="store_true", help="print INDEX, NORMALIZED_SCORE and TRANSLATION")
    tr.add_argument("--batch-size", type=int, default=32, help="stdin lines per request (default: %(default)s)")
    info = commands.add_parser("info", parents=[common], help="print a served model's info")
    info.add_argument("--model", default="", help="model name; default: the server's default model")
    models = commands.add_parser("models", parents=[common], help="the models the server serves")
    models.add_argument(
        "action",
        choices=["list", "load", "unload"],
        help="list: name, versions, serving version, languages, state; load NAME: load or reload "
        "its highest version; unload NAME: stop serving it",
    )
    models.add_argument("name", nargs="?", help="the model to load or unload")
    commands.add_parser("health", parents=[common], help="print the server's health status (exit 1 unless SERVING)")
    return parser


def _translate(client: TranslationClient, args: argparse.Namespace) -> int:
    texts: Iterable[str] = args.texts or (line.rstrip("\r\n") for line in sys.stdin)
    detailed = args.scores or (args.n_best or 1) > 1
    index = 0
    iterator = iter(texts)
    while chunk := list(itertools.islice(iterator, max(1, args.batch_size))):
        found = client.translate(
            chunk,
            timeout=args.deadline,
            model=args.model,
            version=args.version,
            beam_size=args.beam,
            n_best=args.n_best,
            length_penalty=args.length_penalty,
            max_len_extra=args.max_len_extra,
            return_scores=detailed,
        )
        for hypotheses in found:
            if detailed:
                print("\n".join(f"{index}\t{h.normalized_score:.4f}\t{h.text}" for h in hypotheses))
            else:
                print(hypotheses[0].text)
            index += 1
        sys.stdout.flush()
    return 0


def _print_models(models: list[pb.ModelEntry]) -> None:
    """One line per model: NAME, VERSIONS (the served one in brackets), SRC-TGT, STATE, and * for the default."""
    print("NAME\tVERSIONS\tLANGUAGES\tSTATE\tDEFAULT")
    for m in models:
        versions = ",".join(f"[{v}]" if v == m.serving_version else str(v) for v in m.versions) or "-"
        print(f"{m.name}\t{versions}\t{m.src_lang}-{m.tgt_lang}\t{m.state}\t{'*' if m.default_model else ''}")


def _models(client: TranslationClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        _print_models(client.list_models(timeout=args.deadline))
        return 0
    if not args.name:
        print(f"nmt-client: error: models {args.action} needs a model name", file=sys.stderr)
        return 2
    if args.action == "unload":
        client.unload_model(args.name, timeout=args.deadline)
        print(f"{args.name}: unloaded")
        return 0
    client.load_model(args.name, timeout=args.deadline)
    print(f"{args.name}: serving version {client.model_info(args.name, timeout=args.deadline).version}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    connection = Connection(args.target, args.token, args.tls, args.ca, args.cert, args.key)
    try:
        with TranslationClient(connection) as client:
            if args.command == "translate":
                return _translate(client, args)
            if args.command == "info":
                print(str(client.model_info(args.model, timeout=args.deadline)).strip())
                return 0
            if args.command == "models":
                return _models(client, args)
            status = client.health(timeout=args.deadline)
            print(status)
            return 0 if status == "SERVING" else 1
    except grpc.RpcError as e:
        details = " ".join(str(e.details() or "").split())  # type: ignore[attr-defined]
        print(f"nmt-client: error: {e.code().name}: {details}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except OSError as e:  # an unreadable certificate or key file
        print(f"nmt-client: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
