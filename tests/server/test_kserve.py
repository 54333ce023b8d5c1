"""KServe v2 (Open Inference Protocol) on our port: the real tritonclient (grpc.aio) against a real server
on 127.0.0.1, and a raw stub from our generated code for what tritonclient never sends (contents.bytes_contents,
double parameters, malformed raw contents).

The server runs on the test's event loop, so only tritonclient's asyncio client can be used here.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_helpers import TEXTS, channel, serve, server_config, stub

from nmt.engine.decoding import DecodeOptions
from nmt.server.kserve_pb import grpc_predict_v2_pb2 as kpb
from nmt.server.kserve_pb import grpc_predict_v2_pb2_grpc as kpb_grpc
from nmt.server.main import NmtServer
from nmt.server.nmt_pb import translation_pb2 as pb

triton_aio = pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] (the dev extra) is the client")
from tritonclient.grpc import InferInput, InferRequestedOutput  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from nmt.server.metrics import sample_sum  # noqa: E402

pytestmark = pytest.mark.asyncio
INVALID, NOT_FOUND = "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"


@contextlib.asynccontextmanager
async def triton(server: NmtServer, **kwargs: Any) -> AsyncIterator[Any]:
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}", **kwargs)
    try:
        yield client
    finally:
        await client.close()


def text_input(texts: list[str], shape: list[int] | None = None, name: str = "TEXT") -> InferInput:
    shape = [len(texts)] if shape is None else shape
    tensor = InferInput(name, shape, "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_).reshape(shape))
    return tensor


def decoded(array: np.ndarray) -> list[Any]:
    return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array).tolist()


async def translate(server: NmtServer, texts: list[str], **options: Any) -> list[list[str]]:
    async with channel(server) as ch:
        request = pb.TranslateRequest(texts=texts, options=pb.DecodeOptions(**options))
        response = await stub(ch).Translate(request)
    return [[h.text for h in t.hypotheses] for t in response.translations]


def raw_request(model: str, texts: list[bytes], **fields: Any) -> kpb.ModelInferRequest:
    """Triton's wire form: each element a 4-byte little-endian length, then its bytes."""
    raw = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    tensor = kpb.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[len(texts)])
    return kpb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[raw], **fields)


async def test_live_ready_and_metadata(default_server) -> None:
    info = default_server.translator.info
    async with triton(default_server) as client:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready(info.name) and await client.is_model_ready(info.name, info.version)
        assert not await client.is_model_ready("no-such-model")
        assert not await client.is_model_ready(info.name, "no-such-version")
        server = await client.get_server_metadata()
        model = await client.get_model_metadata(info.name, as_json=True)
    assert server.name == "nmt-service" and server.version
    assert model["name"] == info.name and model["versions"] == [info.version]
    assert model["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1"]}]
    assert model["outputs"] == [{"name": "TRANSLATION", "datatype": "BYTES", "shape": ["-1"]}]


async def test_model_infer_equals_translate(default_server) -> None:
    info, texts = default_server.translator.info, [*TEXTS, "  "]  # a blank text too
    expected = [hyps[0] for hyps in await translate(default_server, texts)]
    async with triton(default_server) as client:
        flat = await client.infer(info.name, [text_input(texts)], request_id="r-1")
        column = await client.infer(
            info.name,
            [text_input(texts, [len(texts), 1])],
            model_version=info.version,
            outputs=[InferRequestedOutput("TRANSLATION")],
        )
    assert decoded(flat.as_numpy("TRANSLATION")) == expected
    assert decoded(column.as_numpy("TRANSLATION")) == [[t] for t in expected]
    response = flat.get_response()
    assert (response.id, response.model_name, response.model_version) == ("r-1", info.name, info.version)
    count = functools.partial(sample_sum, default_server.registry)
    assert count("nmt_requests_total", {"method": "ModelInfer", "code": "OK"}) == 2
    assert count("nmt_request_duration_seconds_count", {"method": "ModelInfer"}) == 2


async def test_decode_parameters_reach_the_engine(grpc_bundle, gate) -> None:
    """The parameters become the engine's DecodeOptions; n_best > 1 answers [N, n_best], blank rows padded."""
    texts = TEXTS[:3]
    async with serve(server_config(grpc_bundle), gate) as server, triton(server) as client:
        name = server.translator.info.name
        parameters = {"beam_size": 3, "n_best": 2, "max_len_extra": 7, "length_penalty": "0.5"}
        result = await client.infer(name, [text_input([*texts, ""])], parameters=parameters)
        # The engine is asked for the whole beam; the service drops degenerate ones and answers n_best.
        assert gate.calls[-1][1] == DecodeOptions(beam_size=3, length_penalty=0.5, max_len_extra=7, n_best=3)
        greedy = await client.infer(name, [text_input(texts)], parameters={"beam_size": 1, "length_penalty": 0})
        assert (gate.calls[-1][1].beam_size, gate.calls[-1][1].length_penalty) == (1, 0.0)
        async with channel(server) as ch:  # tritonclient 2.41 cannot send a double parameter
            request = raw_request(name, [t.encode() for t in texts])
            request.parameters["length_penalty"].double_param = 1.25
            request.parameters["beam_size"].uint64_param = 2
            await kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request)
        assert (gate.calls[-1][1].beam_size, gate.calls[-1][1].length_penalty) == (2, 1.25)
        n_best = await translate(server, texts, beam_size=3, n_best=2, max_len_extra=7, length_penalty=0.5)
        best = await translate(server, texts, beam_size=1, length_penalty=0.0)
    assert result.as_numpy("TRANSLATION").shape == (4, 2)
    assert decoded(result.as_numpy("TRANSLATION")) == [*n_best, ["", ""]]
    assert decoded(greedy.as_numpy("TRANSLATION")) == [hyps[0] for hyps in best]


async def test_bytes_contents_through_a_raw_stub(default_server) -> None:
    name, texts = default_server.translator.info.name, TEXTS[:4]
    tensor = kpb.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    async with channel(default_server) as ch:
        response = await kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            kpb.ModelInferRequest(model_name=name, inputs=[tensor])
        )
    raw, out = response.raw_output_contents[0], []
    while raw:
        (size,) = struct.unpack_from("<I", raw)
        out, raw = [*out, raw[4 : 4 + size].decode()], raw[4 + size :]
    assert list(response.outputs[0].shape) == [len(texts)]
    assert out == [hyps[0] for hyps in await translate(default_server, texts)]


async def test_bad_inputs_get_the_protocols_errors(default_server) -> None:
    info = default_server.translator.info
    floats = InferInput("TEXT", [2], "FP32")
    floats.set_data_from_numpy(np.zeros(2, dtype=np.float32))
    cases = [  # (call kwargs, status, message fragment)
        (
            {"inputs": [floats]},
            INVALID,
            f"inference input 'TEXT' data-type is 'FP32', but model '{info.name}' expects 'BYTES'",
        ),
        (
            {"inputs": [text_input(["a"] * 6, [2, 3])]},
            INVALID,
            f"unexpected shape for input 'TEXT' for model '{info.name}'. Expected [-1] or [-1,1], got [2,3]",
        ),
        ({"inputs": [text_input(["a"], [1, 1, 1])]}, INVALID, "got [1,1,1]"),
        (
            {"inputs": [text_input(["a"], name="INPUT0")]},
            INVALID,
            f"unexpected inference input 'INPUT0' for model '{info.name}'",
        ),
        (
            {"inputs": [text_input(["a"])], "outputs": [InferRequestedOutput("SCORES")]},
            INVALID,
            f"unexpected inference output 'SCORES' for model '{info.name}'",
        ),
        ({"inputs": [text_input(["a"] * 65)]}, INVALID, "65 texts; the limit is max_texts_per_request=64"),
        (
            {"inputs": [text_input(["a"])], "parameters": {"beam_size": 99}},
            INVALID,
            "beam_size must be between 1 and max_beam_size=16, got 99",
        ),
        (
            {"inputs": [text_input(["a"])], "parameters": {"beam_size": "2"}},
            INVALID,
            "parameter 'beam_size' must be an int64 parameter, got string_param",
        ),
        (
            {"inputs": [text_input(["a"])], "parameters": {"length_penalty": "much"}},
            INVALID,
            "parameter 'length_penalty' must be a number, got string 'much'",
        ),
        (
            {"inputs": [text_input(["a"])], "model_name": "no-such-model"},
            NOT_FOUND,
            "Request for unknown model: 'no-such-model' is not found",
        ),
        (
            {"inputs": [text_input(["a"])], "model_version": "7"},
            NOT_FOUND,
            f"Request for unknown model: '{info.name}' version 7 is not found",
        ),
    ]
    async with triton(default_server) as client:
        for kwargs, status, message in cases:
            with pytest.raises(InferenceServerException) as caught:
                await client.infer(**{"model_name": info.name, **kwargs})
            assert (caught.value.status(), message in caught.value.message()) == (status, True), caught.value
        with pytest.raises(InferenceServerException) as caught:
            await client.get_model_metadata("no-such-model")
        assert caught.value.status() == NOT_FOUND and "'no-such-model' is not found" in caught.value.message()
    count = functools.partial(sample_sum, default_server.registry)
    assert count("nmt_requests_total", {"method": "ModelInfer", "code": "INVALID_ARGUMENT"}) == 9
    assert count("nmt_requests_total", {"method": "ModelInfer", "code": "NOT_FOUND"}) == 2


@pytest.mark.parametrize(
    "mangle, message",
    [
        (
            lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-2]),
            "element 1 of input 'TEXT' has a length prefix of 4 bytes, but only 2 follow",
        ),
        (
            lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0] + b"x"),
            "raw_input_contents of input 'TEXT' has 1 bytes after its 2 elements",
        ),
        (
            lambda r: r.inputs[0].shape.__setitem__(0, 3),
            "raw_input_contents of input 'TEXT' holds 2 elements; its shape says 3",
        ),
        (
            lambda r: r.raw_input_contents.__setitem__(
                0, struct.pack("<I", 2) + b"\xff\xfe" + struct.pack("<I", 1) + b"a"
            ),
            "element 0 of input 'TEXT' is not valid UTF-8 (invalid start byte at byte 0)",
        ),
        (
            lambda r: r.inputs[0].contents.bytes_contents.append(b"a"),
            "contents field must not be specified when using raw_input_contents for 'TEXT'",
        ),
        (
            lambda r: r.ClearField("raw_input_contents"),
            "expected 2 string elements for inference input 'TEXT' (shape [2]), got 0 in contents.bytes_contents",
        ),
        (lambda r: r.ClearField("inputs"), "expected 1 inputs but got 0 inputs for model"),
    ],
)
async def test_malformed_tensors_are_invalid_argument(default_server, mangle, message) -> None:
    request = raw_request(default_server.translator.info.name, [b"A man.", b"Dogs"])
    mangle(request)
    async with channel(default_server) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()


async def test_draining_server_is_not_ready_and_refuses_inference(default_server) -> None:
    name = default_server.translator.info.name
    async with triton(default_server) as client:
        default_server.servicer.draining = True  # what stop() does first, with the health status
        await default_server.health.enter_graceful_shutdown()
        assert await client.is_server_live()
        assert not await client.is_server_ready() and not await client.is_model_ready(name)
        with pytest.raises(InferenceServerException) as caught:
            await client.infer(name, [text_input(["A man."])])
    assert caught.value.status() == "StatusCode.UNAVAILABLE" and "shutting down" in caught.value.message()
    assert (
        sample_sum(default_server.registry, "nmt_requests_total", {"method": "ModelInfer", "code": "UNAVAILABLE"}) == 1
    )


async def test_bearer_token_applies_to_kserve_too(grpc_bundle, grpc_translator) -> None:
    cfg = server_config(grpc_bundle, auth_token="s3cret")
    async with serve(cfg, grpc_translator) as server, triton(server) as client:
        name = server.translator.info.name
        with pytest.raises(InferenceServerException) as caught:
            await client.infer(name, [text_input(["A man."])])
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        result = await client.infer(name, [text_input(["A man."])], headers={"authorization": "Bearer s3cret"})
    assert result.as_numpy("TRANSLATION").shape == (1,)
