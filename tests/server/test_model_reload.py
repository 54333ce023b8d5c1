"""Loading and unloading models while serving (server/control.py), through Triton's repository extension
(the real tritonclient) and nmt-client: the index and its states, a failed load that leaves the served
version serving and says why, the bearer token, and reloads under load that lose no request.

Each test copies the tiny bundle into its own repository (tmp_path/repo/NAME/VERSION). Nothing waits on
time for correctness: the engine gate holds requests in flight, and the clients count their answers.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from bundle_edit import rewrite_manifest, unvalidate
from grpc_helpers import TEXTS, add_version, alone, channel, eventually, loads, repository, serve_repo, stub

from nmt.engine.decoding import DecodeOptions
from nmt.server import client as client_module
from nmt.server.kserve_pb import grpc_predict_v2_pb2 as kpb
from nmt.server.kserve_pb import grpc_predict_v2_pb2_grpc as kpb_grpc
from nmt.server.main import NmtServer
from nmt.server.nmt_pb import translation_pb2 as pb

triton = pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] (the dev extra)")
from tritonclient.grpc import InferInput  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.asyncio
GREEDY = pb.DecodeOptions(beam_size=1)
TOKEN = "s3cret"


def triton_client(server: NmtServer) -> Any:
    return triton.InferenceServerClient(f"127.0.0.1:{server.port}")


def text_input(texts: list[str]) -> InferInput:
    tensor = InferInput("TEXT", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


async def index(client: Any) -> list[tuple[str, str, str, str]]:
    found = await client.get_model_repository_index(as_json=True)
    return [(m["name"], m.get("version", ""), m.get("state", ""), m.get("reason", "")) for m in found.get("models", [])]


async def ready_index(server: NmtServer) -> list[tuple[str, str, str, str]]:
    """RepositoryIndex(ready=true) (tritonclient 2.41 cannot ask for it), over our own stub."""
    async with channel(server) as ch:
        response = await kpb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(kpb.RepositoryIndexRequest(ready=True))
    return [(m.name, m.version, m.state, m.reason) for m in response.models]


async def triton_failure(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        await call
    return caught.value.status(), caught.value.message()


async def test_load_and_unload_through_tritonclient(grpc_bundle: Path, tmp_path: Path) -> None:
    root = repository(tmp_path, grpc_bundle, ("tiny", 1), ("other", 1))
    async with serve_repo(root) as (server, _):
        client = triton_client(server)
        try:
            assert "model_repository" in (await client.get_server_metadata()).extensions
            assert await index(client) == [("other", "1", "READY", ""), ("tiny", "1", "READY", "")]
            first = server.models.get("tiny")
            add_version(root, grpc_bundle, "tiny", 2)
            await client.load_model("tiny")
            assert await index(client) == [("other", "1", "READY", ""), ("tiny", "2", "READY", "")]
            async with channel(server) as ch:
                s = stub(ch)
                assert (await s.GetModelInfo(pb.GetModelInfoRequest(model="tiny"))).version == "2"
                listed = {
                    m.name: (list(m.versions), m.serving_version)
                    for m in (await s.ListModels(pb.ListModelsRequest())).models
                }
                assert listed == {"other": ([1], 1), "tiny": ([1, 2], 2)}
                await client.unload_model("other")
                assert await index(client) == [("other", "", "UNAVAILABLE", "unloaded"), ("tiny", "2", "READY", "")]
                assert await ready_index(server) == [("tiny", "2", "READY", "")]
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await s.Translate(pb.TranslateRequest(texts=["A dog."], model="other"))
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                assert caught.value.details() == "model 'other' is not served; this server serves: tiny (version 2)"
                assert not await client.is_model_ready("other")
                assert await triton_failure(client.unload_model("other")) == (
                    "StatusCode.NOT_FOUND",
                    "failed to unload 'other': it is not loaded; this server serves: tiny (version 2)",
                )
                await client.load_model("other")
                assert await client.is_model_ready("other")
                assert (await s.Translate(pb.TranslateRequest(texts=["A dog."], model="other"))).translations
            status, message = await triton_failure(client.load_model("nope"))
            assert (status, message) == (
                "StatusCode.NOT_FOUND",
                f"failed to load 'nope': no model directory nope in the model repository {root}",
            )
            status, message = await triton_failure(client.load_model("tiny", config='{"backend": "x"}'))
            assert status == "StatusCode.INVALID_ARGUMENT" and "parameters config are not supported" in message
            assert (loads(server, "loaded"), loads(server, "failed")) == (2.0, 1.0)
            await server.models.wait_retired()  # the replaced and the unloaded versions are released
            assert first.service.draining and first.scheduler._closing and not server.models.retiring
        finally:
            await client.close()


async def test_cli_models_load_and_unload(grpc_bundle: Path, tmp_path: Path, capsys) -> None:
    root = repository(tmp_path, grpc_bundle, ("tiny", 1))
    async with serve_repo(root) as (server, _):
        target = ["--target", f"127.0.0.1:{server.port}"]
        cli = lambda *argv: asyncio.to_thread(client_module.main, [*argv, *target])  # noqa: E731
        add_version(root, grpc_bundle, "tiny", 2)
        assert await cli("models", "load", "tiny") == 0
        assert capsys.readouterr().out == "tiny: serving version 2\n"
        assert await cli("models", "list") == 0
        assert capsys.readouterr().out.splitlines()[1].startswith("tiny\t1,[2]\t")
        assert await cli("models", "unload", "tiny") == 0
        assert capsys.readouterr().out == "tiny: unloaded\n"
        assert await cli("translate", "--model", "tiny", "A dog.") == 1
        assert (
            capsys.readouterr().err == "nmt-client: error: NOT_FOUND: model 'tiny' is not served; this server "
            "serves: no model\n"
        )
        assert await cli("models", "load", "nope") == 1
        assert capsys.readouterr().err.startswith("nmt-client: error: NOT_FOUND: failed to load 'nope': no model")
        assert await cli("models", "load") == 2
        assert "needs a model name" in capsys.readouterr().err
        assert await cli("models", "load", "tiny") == 0
        assert capsys.readouterr().out == "tiny: serving version 2\n"


async def test_failed_loads_keep_the_served_version(grpc_bundle: Path, tmp_path: Path, caplog) -> None:
    root = repository(tmp_path, grpc_bundle, ("tiny", 1))
    expected = None
    async with serve_repo(root) as (server, _):
        client = triton_client(server)
        try:
            served = server.models.get("tiny")
            damaged = add_version(root, grpc_bundle, "tiny", 2)
            onnx = sorted(damaged.glob("*.onnx"))[0]
            onnx.write_bytes(onnx.read_bytes() + b"\0")  # its sha256 no longer matches the manifest's
            with caplog.at_level(logging.ERROR, logger="nmt-serve"):
                status, message = await triton_failure(client.load_model("tiny"))
            assert status == "StatusCode.FAILED_PRECONDITION"
            assert message.startswith(f"failed to load 'tiny': BundleError: bundle {damaged} failed verification")
            assert onnx.name in message
            assert any(
                m.startswith("model tiny: load failed, version 1 keeps serving: BundleError") for m in caplog.messages
            ), caplog.messages
            (damaged / "manifest.json").write_text("{ not json")
            status, message = await triton_failure(client.load_model("tiny"))
            assert status == "StatusCode.FAILED_PRECONDITION" and "manifest.json is not valid JSON" in message
            assert server.models.get("tiny") is served and not served.service.draining
            assert await index(client) == [("tiny", "1", "READY", "")]
            result = await client.infer("tiny", [text_input(TEXTS[:2])], parameters={"beam_size": 1})
            assert result.get_response().model_version == "1"
            expected = [a[0] for a in alone(served.translator, TEXTS[:2], DecodeOptions(beam_size=1))]
            assert [t.decode() for t in result.as_numpy("TRANSLATION")] == expected
            assert (loads(server, "loaded"), loads(server, "failed")) == (0.0, 2.0)
            # A model that is not served and fails to load says why in the index.
            (root / "broken" / "1").mkdir(parents=True)
            (root / "broken" / "1" / "manifest.json").write_text("[]")
            await triton_failure(client.load_model("broken"))
            (name, version, state, reason), _ = await index(client)
            assert (name, version, state) == ("broken", "", "UNAVAILABLE") and reason.startswith("load failed: ")
        finally:
            await client.close()


async def test_a_failed_self_check_keeps_the_served_version(bundle_dir: Path, tmp_path: Path) -> None:
    root = repository(tmp_path, bundle_dir, ("tiny", 1))
    rewrite_manifest(bundle_dir, tmp_path / "v2", unvalidate("fp32-cpu", tamper=True))  # not there at start
    async with serve_repo(root, precision="fp32") as (server, _):
        client = triton_client(server)
        try:
            shutil.move(tmp_path / "v2", root / "tiny" / "2")
            status, message = await triton_failure(client.load_model("tiny"))
            assert status == "StatusCode.FAILED_PRECONDITION"
            assert message.startswith("failed to load 'tiny': SelfCheckError: self-check failed: variant fp32-cpu")
            assert server.models.get("tiny").version == "1" and await client.is_model_ready("tiny")
        finally:
            await client.close()


async def test_control_calls_need_the_token(grpc_bundle: Path, tmp_path: Path, default_server: NmtServer) -> None:
    root = repository(tmp_path, grpc_bundle, ("tiny", 1))
    async with serve_repo(root, auth_token=TOKEN) as (server, _):
        client = triton_client(server)
        try:
            for call in (client.load_model("tiny"), client.unload_model("tiny"), client.get_model_repository_index()):
                status, _ = await triton_failure(call)
                assert status == "StatusCode.UNAUTHENTICATED"
            headers = {"authorization": f"Bearer {TOKEN}"}
            await client.load_model("tiny", headers=headers)
            await client.unload_model("tiny", headers=headers)
            assert await index_with(client, headers) == [("tiny", "", "UNAVAILABLE", "unloaded")]
        finally:
            await client.close()
    # A single bundle has no repository to load from.
    client = triton_client(default_server)
    try:
        for call in (client.load_model("tiny"), client.unload_model("tiny")):
            status, message = await triton_failure(call)
            assert status == "StatusCode.FAILED_PRECONDITION" and "serves a single bundle (--model-dir)" in message
    finally:
        await client.close()


async def index_with(client: Any, headers: dict[str, str]) -> list[tuple[str, str, str, str]]:
    found = await client.get_model_repository_index(headers=headers, as_json=True)
    return [(m["name"], m.get("version", ""), m.get("state", ""), m.get("reason", "")) for m in found["models"]]


async def test_requests_in_flight_finish_on_the_version_that_accepted_them(grpc_bundle: Path, tmp_path: Path) -> None:
    root = repository(tmp_path, grpc_bundle, ("tiny", 1))
    async with serve_repo(root, gated=True) as (server, gates):
        client = triton_client(server)
        try:
            v1 = gates["tiny"][0]
            v1.close()  # version 1's engine holds what it gets
            held = [
                asyncio.ensure_future(client.infer("tiny", [text_input([text])], parameters={"beam_size": 1}))
                for text in TEXTS[:3]
            ]
            first = server.models.get("tiny")
            await eventually(
                lambda: v1.entered.is_set() and first.service._active == 3, what="version 1 accepted the three requests"
            )
            add_version(root, grpc_bundle, "tiny", 2)
            await client.load_model("tiny")  # returns while version 1 still holds its requests
            assert first.service.draining and first in server.models.retiring
            new = await client.infer("tiny", [text_input(TEXTS[:1])], parameters={"beam_size": 1})
            assert new.get_response().model_version == "2"
            await client.unload_model("tiny")  # version 2 is idle: released at once; version 1 still works
            await triton_failure(client.infer("tiny", [text_input(["a"])]))
            assert not any(f.done() for f in held)
            v1.open()
            answers = await asyncio.gather(*held)
            assert [a.get_response().model_version for a in answers] == ["1", "1", "1"]
            expected = [a[0] for a in alone(v1.translator, TEXTS[:3], DecodeOptions(beam_size=1))]
            assert [a.as_numpy("TRANSLATION")[0].decode() for a in answers] == expected
            await server.models.wait_retired()
            assert first.scheduler._closing and not server.models.retiring
        finally:
            await client.close()


async def test_reload_under_load_loses_nothing(grpc_bundle: Path, tmp_path: Path) -> None:
    """Four clients translate without pause (two over KServe, which names the answering version, two over
    nmt.v1) while versions 2 and 3 are loaded: no request fails, every answer is the expected translation
    from a version served at the time, and a request sent after a load returned is answered by the new one."""
    root = repository(tmp_path, grpc_bundle, ("tiny", 1))
    texts = TEXTS[:2]
    async with serve_repo(root) as (server, _):
        expected = [a[0] for a in alone(server.models.get("tiny").translator, texts, DecodeOptions(beam_size=1))]
        served = {"version": 1}  # the version the last finished load switched to
        answers: list[list[tuple[int, int]]] = [[] for _ in range(4)]  # per client: (served when sent, answered)
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def kserve_client(seen: list[tuple[int, int]]) -> None:
            client = triton_client(server)
            try:
                while not stop.is_set():
                    sent = served["version"]
                    result = await client.infer("tiny", [text_input(texts)], parameters={"beam_size": 1})
                    assert [t.decode() for t in result.as_numpy("TRANSLATION")] == expected
                    seen.append((sent, int(result.get_response().model_version)))
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)
            finally:
                await client.close()

        async def nmt_client(seen: list[tuple[int, int]]) -> None:
            try:
                async with channel(server) as ch:
                    s = stub(ch)
                    while not stop.is_set():
                        sent = served["version"]
                        response = await s.Translate(pb.TranslateRequest(texts=texts, options=GREEDY, model="tiny"))
                        assert [t.hypotheses[0].text for t in response.translations] == expected
                        seen.append((sent, 0))
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)

        tasks = [
            asyncio.ensure_future(kserve_client(answers[0])),
            asyncio.ensure_future(kserve_client(answers[1])),
            asyncio.ensure_future(nmt_client(answers[2])),
            asyncio.ensure_future(nmt_client(answers[3])),
        ]
        control = triton_client(server)
        try:
            for version in (2, 3):
                counts = [len(a) for a in answers]
                await eventually(
                    lambda: failures or all(len(a) >= c + 2 for a, c in zip(answers, counts)),
                    what="every client answered twice more",
                )
                add_version(root, grpc_bundle, "tiny", version)
                await control.load_model("tiny")
                served["version"] = version
            counts = [len(a) for a in answers]
            await eventually(
                lambda: failures or all(len(a) >= c + 2 for a, c in zip(answers, counts)),
                what="every client answered twice after the last load",
            )
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await control.close()
        assert not failures, failures
        kserve = answers[0] + answers[1]
        assert {answered for _, answered in kserve} == {1, 2, 3}
        assert all(answered >= sent for sent, answered in kserve), kserve  # never an older version after a load
        assert sum(len(a) for a in answers) >= 4 * 6
        await server.models.wait_retired()
        assert [e.version for e in server.models] == ["3"] and not server.models.retiring
