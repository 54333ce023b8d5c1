"""The Open Inference Protocol (KServe v2 gRPC, `inference.GRPCInferenceService`) as Triton speaks it,
on the same port as our own service, so KServe and Triton clients work against this server.

Every served model (server/repository.py), by the name and version ListModels and GetModelInfo give;
a request names its model (model_name) and may name a version (model_version; empty: the served one),
and is routed to that model's service and scheduler. ModelInfer takes input "TEXT":
BYTES, shape [N] or [N, 1], in contents.bytes_contents or in raw_input_contents (each element a
4-byte little-endian length, then its UTF-8 bytes, as Triton's clients send them). It answers output
"TRANSLATION": BYTES in raw_output_contents, as Triton does (tritonclient reads only that form
with NumPy 2), shaped like the input, or [N, n_best] when n_best > 1 (a blank text's extra
hypotheses are empty strings). Request parameters beam_size, max_len_extra, n_best (int64 or
uint64) and length_penalty (double, int64, or a string holding a number: tritonclient 2.41 cannot
send doubles) become DecodeOptions, and so do the text pipeline's switches split_sentences,
normalize_case and protect_spans (bool, or the string "true"/"false"); other parameters are
ignored, as Triton leaves them to the model.

The texts go through the same service (server/service.py) as Translate: the same limits, text
pipeline, scheduler, drain and metrics as Translate (nmt_requests_total{method="ModelInfer"}). Errors are Triton's: an unknown model or
version NOT_FOUND ("Request for unknown model: ..."), a bad tensor or parameter INVALID_ARGUMENT,
and ModelReady answers ready=false for an unknown model. Ready means the health service says
SERVING for our service (not while warming up or draining) and the model is not draining. The other RPCs are not counted: like
health checks, probes would drown the translations in nmt_requests_total.

Triton's model repository extension (server/control.py does the work): RepositoryIndex lists every model of
the repository with its served version and state (READY; UNAVAILABLE with a reason: "unloaded", "not
loaded", "load failed: ..."), `ready` only the READY ones; RepositoryModelLoad loads, or reloads, a model's
highest version beside the served one and switches to it; RepositoryModelUnload stops serving it. Both
answer once new requests are routed accordingly (the old version finishes its requests in the background).
Load parameters that override the model's files or configuration ("config", "file:...") are refused
(INVALID_ARGUMENT: a model is read from its directory); other parameters (unload_dependents) and
repository_name (there is one repository) are ignored. The --auth-token check covers these calls as every
other one.
"""

from __future__ import annotations

import importlib.metadata
import struct
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from nmt.engine.translator import ModelInfo, Translation

from .control import ControlError, ModelControl
from .interceptors import abort
from .kserve_pb import grpc_predict_v2_pb2 as kpb
from .kserve_pb import grpc_predict_v2_pb2_grpc as kpb_grpc
from .nmt_pb import translation_pb2 as pb
from .repository import ModelEntry, ModelNotFound, Models
from .transport import (
    SERVICE,
    Call,
    Status,
    TranslationServicer,
    deadline_of,
    decode_options,
    status_of,
    text_options,
)

SERVER_NAME = "nmt-service"
PLATFORM = "onnxruntime_onnx"  # Triton's name for the engine's runtime and model format
INPUT, OUTPUT, BYTES = "TEXT", "TRANSLATION", "BYTES"
INT_PARAMETERS = ("beam_size", "max_len_extra", "n_best")
BOOL_PARAMETERS = ("split_sentences", "normalize_case", "protect_spans")  # the text pipeline (engine/text.py)
INT32 = (-(2**31), 2**31 - 1)  # DecodeOptions' integer fields are int32
LENGTH = struct.Struct("<I")  # Triton's BYTES element prefix
Parameters = Mapping[str, kpb.InferParameter]


class UnknownModel(LookupError):
    """A model name or version this server does not serve: NOT_FOUND, as Triton answers."""


def server_version() -> str:
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def find_model(models: Models, name: str, version: str) -> ModelEntry:
    """The entry serving model `name` at `version` (empty: the served one); UnknownModel, in Triton's words,
    for any other (a KServe request always names its model: an empty name is not the default model)."""
    try:
        if name:
            return models.lookup(name, version)
        raise ModelNotFound("no model named", models.served())
    except ModelNotFound as e:
        what = f"'{name}' version {version}" if version and any(m.name == name for m in models) else f"'{name}'"
        raise UnknownModel(f"Request for unknown model: {what} is not found; this server serves: {e.served}") from None


def _int_parameter(name: str, parameter: kpb.InferParameter) -> int:
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise ValueError(f"parameter '{name}' must be an int64 parameter, got {kind or 'no value'}")
    value: int = getattr(parameter, kind)
    if not INT32[0] <= value <= INT32[1]:
        raise ValueError(f"parameter '{name}' must be between {INT32[0]} and {INT32[1]}, got {value}")
    return value


def _float_parameter(name: str, parameter: kpb.InferParameter) -> float:
    kind = parameter.WhichOneof("parameter_choice")
    if kind in ("double_param", "int64_param", "uint64_param"):
        return float(getattr(parameter, kind))
    if kind == "string_param":
        try:
            return float(parameter.string_param)
        except ValueError:
            raise ValueError(
                f"parameter '{name}' must be a number, got string {parameter.string_param[:40]!r}"
            ) from None
    raise ValueError(f"parameter '{name}' must be a double parameter, got {kind or 'no value'}")


def _bool_parameter(name: str, parameter: kpb.InferParameter) -> bool:
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "bool_param":
        return parameter.bool_param
    if kind == "string_param" and parameter.string_param.lower() in ("true", "false"):
        return parameter.string_param.lower() == "true"
    raise ValueError(
        f"parameter '{name}' must be a bool parameter, got {kind or 'no value'}"
        + (f" {parameter.string_param[:40]!r}" if kind == "string_param" else "")
    )


def options_message(parameters: Parameters) -> pb.DecodeOptions:
    """Our DecodeOptions message from request parameters; ranges are checked where Translate's are."""
    options = pb.DecodeOptions()
    for name in INT_PARAMETERS:
        if name in parameters:
            setattr(options, name, _int_parameter(name, parameters[name]))
    if "length_penalty" in parameters:
        options.length_penalty = _float_parameter("length_penalty", parameters["length_penalty"])
    for name in BOOL_PARAMETERS:
        if name in parameters:
            setattr(options, name, _bool_parameter(name, parameters[name]))
    return options


def _dims(shape: list[int]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def split_bytes(raw: bytes, count: int) -> list[bytes]:
    """`count` elements of Triton's BYTES serialization; ValueError when `raw` holds more or fewer."""
    elements, offset = [], 0
    for i in range(count):
        if offset + LENGTH.size > len(raw):
            raise ValueError(f"raw_input_contents of input '{INPUT}' holds {i} elements; its shape says {count}")
        (size,) = LENGTH.unpack_from(raw, offset)
        offset += LENGTH.size
        if offset + size > len(raw):
            raise ValueError(
                f"element {i} of input '{INPUT}' has a length prefix of {size} bytes, "
                f"but only {len(raw) - offset} follow"
            )
        elements.append(raw[offset : offset + size])
        offset += size
    if offset != len(raw):
        raise ValueError(
            f"raw_input_contents of input '{INPUT}' has {len(raw) - offset} bytes after its {count} elements"
        )
    return elements


def input_texts(request: kpb.ModelInferRequest, model: str, max_texts: int) -> tuple[list[str], list[int]]:
    """The texts of the one input (row-major) and its shape; ValueError, with Triton's wording where
    Triton has one, for anything but a BYTES tensor "TEXT" of shape [N] or [N, 1]."""
    for tensor in request.inputs:
        if tensor.name != INPUT:
            raise ValueError(f"unexpected inference input '{tensor.name}' for model '{model}'")
    if len(request.inputs) != 1:
        raise ValueError(
            f"expected 1 inputs but got {len(request.inputs)} inputs for model '{model}': "
            f"send one BYTES tensor '{INPUT}'"
        )
    tensor, shape = request.inputs[0], list(request.inputs[0].shape)
    if tensor.datatype != BYTES:
        raise ValueError(
            f"inference input '{INPUT}' data-type is '{tensor.datatype}', but model '{model}' expects '{BYTES}'"
        )
    if len(shape) not in (1, 2) or shape[0] < 0 or shape[1:] not in ([], [1]):
        raise ValueError(
            f"unexpected shape for input '{INPUT}' for model '{model}'. Expected [-1] or [-1,1], got {_dims(shape)}"
        )
    if shape[0] > max_texts:  # before splitting: the work stays bounded
        raise ValueError(f"{shape[0]} texts; the limit is max_texts_per_request={max_texts}")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise ValueError(f"expected 1 raw_input_contents (one per input), got {len(request.raw_input_contents)}")
        if tensor.HasField("contents"):
            raise ValueError(
                f"contents field must not be specified when using raw_input_contents for '{INPUT}' for model '{model}'"
            )
        elements = split_bytes(request.raw_input_contents[0], shape[0])
    else:
        elements = list(tensor.contents.bytes_contents)
        if len(elements) != shape[0]:
            raise ValueError(
                f"expected {shape[0]} string elements for inference input '{INPUT}' "
                f"(shape {_dims(shape)}), got {len(elements)} in contents.bytes_contents"
            )
    texts = []
    for i, element in enumerate(elements):
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(
                f"element {i} of input '{INPUT}' is not valid UTF-8 ({e.reason} at byte {e.start})"
            ) from None
    return texts, shape


def check_outputs(request: kpb.ModelInferRequest, model: str) -> None:
    for output in request.outputs:
        if output.name != OUTPUT:
            raise ValueError(f"unexpected inference output '{output.name}' for model '{model}'")


def infer_response(
    request: kpb.ModelInferRequest, info: ModelInfo, shape: list[int], n_best: int, results: list[list[Translation]]
) -> kpb.ModelInferResponse:
    """TRANSLATION: the input's shape, or [N, n_best]; blank texts (one empty hypothesis) padded with ""."""
    rows = [[t.text for t in hyps] + [""] * (n_best - len(hyps)) for hyps in results]
    encoded = [text.encode("utf-8") for row in rows for text in row]
    raw = b"".join(LENGTH.pack(len(e)) + e for e in encoded)
    out_shape = shape if n_best == 1 else [shape[0], n_best]
    tensor = kpb.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype=BYTES, shape=out_shape)
    return kpb.ModelInferResponse(
        model_name=info.name, model_version=info.version, id=request.id, outputs=[tensor], raw_output_contents=[raw]
    )


class InferenceServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 in front of a TranslationServicer; readiness from the server's health service."""

    def __init__(self, translation: TranslationServicer, health: HealthServicer, control: ModelControl | None = None):
        self.translation, self.health, self.control = translation, health, control

    @property
    def models(self) -> Models:
        return self.translation.models

    async def ServerLive(
        self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)  # it answers; draining is not being dead

    async def ServerReady(
        self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=await self._ready(context))

    async def ModelReady(
        self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelReadyResponse:
        try:
            entry = find_model(self.models, request.name, request.version)
        except UnknownModel:
            return kpb.ModelReadyResponse(ready=False)  # Triton: not ready, not an error
        return kpb.ModelReadyResponse(ready=not entry.service.draining and await self._ready(context))

    async def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerMetadataResponse:
        # Triton's name for the repository extension, listed where models can be loaded (a repository).
        extensions = ["model_repository"] if self.control is not None and self.models.root is not None else []
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=extensions)

    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelMetadataResponse:
        try:
            info = find_model(self.models, request.name, request.version).info
        except UnknownModel as e:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(e))
        tensor = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=info.name,
            versions=[info.version],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT, datatype=BYTES, shape=[-1])],
            outputs=[tensor(name=OUTPUT, datatype=BYTES, shape=[-1])],
        )

    async def ModelInfer(
        self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelInferResponse:
        deadline = deadline_of(context)
        with self.translation.track("ModelInfer", deadline) as call:
            try:
                return await self._infer(request, deadline, call)
            except Exception as e:  # noqa: BLE001 - mapped to a status code, never UNKNOWN
                status = Status(grpc.StatusCode.NOT_FOUND, str(e)) if isinstance(e, UnknownModel) else status_of(e)
            call.code = status.code
            await abort(context, *status)
        raise AssertionError("unreachable: abort raises")

    async def _infer(
        self, request: kpb.ModelInferRequest, deadline: float | None, call: Call
    ) -> kpb.ModelInferResponse:
        entry = call.routed(find_model(self.models, request.model_name, request.model_version))
        info = entry.info
        texts, shape = input_texts(request, info.name, entry.limits.max_texts)
        check_outputs(request, info.name)
        message = options_message(request.parameters)
        options = decode_options(message, entry.limits)
        results = await entry.service.translate(texts, options, text_options(message), deadline)
        return infer_response(request, info, shape, options.n_best, results)

    async def RepositoryIndex(
        self, request: kpb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> kpb.RepositoryIndexResponse:
        control = await self._control(context)
        index = kpb.RepositoryIndexResponse.ModelIndex
        return kpb.RepositoryIndexResponse(
            models=[
                index(name=m.name, version=m.version, state=m.state, reason=m.reason)
                for m in control.index(request.ready)
            ]
        )

    async def RepositoryModelLoad(
        self, request: kpb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> kpb.RepositoryModelLoadResponse:
        control = await self._control(context)
        overrides = sorted(k for k in request.parameters if k == "config" or k.startswith("file:"))
        try:
            if overrides:
                raise ControlError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"failed to load '{request.model_name}': "
                    f"parameters {', '.join(overrides)} are not supported: a model is read from its "
                    f"directory in the model repository",
                )
            await control.load(request.model_name)
        except ControlError as e:
            await abort(context, e.code, str(e))
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: kpb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> kpb.RepositoryModelUnloadResponse:
        control = await self._control(context)
        try:
            await control.unload(request.model_name)
        except ControlError as e:
            await abort(context, e.code, str(e))
        return kpb.RepositoryModelUnloadResponse()

    async def _control(self, context: grpc.aio.ServicerContext) -> ModelControl:
        if self.control is None:
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, "this server has no model control")
        return self.control

    async def _ready(self, context: grpc.aio.ServicerContext) -> bool:
        # The health service's public Check; our service's status is always set (create_server).
        answer = await self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), context)
        return answer.status == health_pb2.HealthCheckResponse.SERVING


def add_inference_service(
    server: grpc.aio.Server,
    translation: TranslationServicer,
    health: HealthServicer,
    control: ModelControl | None = None,
) -> None:
    """Serve KServe v2 on `server`, through `translation`'s path, and Triton's repository extension through
    `control`."""
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(translation, health, control), server)
