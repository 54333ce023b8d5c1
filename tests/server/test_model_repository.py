"""A model repository (server/repository.py): discovery, routing by model and version over nmt.v1 and
KServe, ListModels, GetModelInfo(model), the default model, NOT_FOUND naming what is served, and one
scheduler per model (a batch never mixes models). Real servers on loopback.

The repository holds the tiny bundle three times: tiny/1, tiny/2 and other/1 (plus entries that are not
model versions). Each model's translator is wrapped in a Gate, so the engine calls of each model are
seen apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_helpers import ONE_THREAD, TEXTS, Gate, alone, channel, eventually, server_config, start_nmt_serve, stub
from prometheus_client import CollectorRegistry

from nmt.engine.decoding import DecodeOptions
from nmt.engine.translator import Translator
from nmt.engine.turns import NO_TURNS, EngineTurns
from nmt.server import client as client_module
from nmt.server.config import ServerConfig, from_args
from nmt.server.main import NmtServer, create_server
from nmt.server.metrics import sample_sum
from nmt.server.nmt_pb import translation_pb2 as pb
from nmt.server.repository import ModelNotFound, Models, discover

pytestmark = pytest.mark.asyncio
SERVED = "other (version 1), tiny (version 2)"
GREEDY = pb.DecodeOptions(beam_size=1)


@pytest.fixture(scope="session")
def repository(grpc_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    for name, version in (("tiny", "1"), ("tiny", "2"), ("other", "1")):
        shutil.copytree(grpc_bundle, root / name / version)
    (root / "tiny" / "latest").mkdir()  # not a positive integer
    (root / "tiny" / "0").mkdir()
    (root / "other" / "3").mkdir()  # no manifest: not a bundle
    (root / "empty").mkdir()  # a model without versions
    (root / "bad name").mkdir()
    (root / "README.md").write_text("not a model\n")
    return root


@pytest.fixture(scope="session")
def loaded(repository: Path) -> dict[Path, Translator]:
    """The translators of the served versions, loaded once for the whole session."""
    return {
        repository / "tiny" / "2": Translator.from_bundle(repository / "tiny" / "2", ONE_THREAD),
        repository / "other" / "1": Translator.from_bundle(repository / "other" / "1", ONE_THREAD),
    }


@contextlib.asynccontextmanager
async def serve_repository(
    repository: Path, loaded: dict[Path, Any], **overrides: Any
) -> AsyncIterator[tuple[NmtServer, dict[str, Gate]]]:
    """A started server on the repository; each model's translator in a Gate (by model name)."""
    gates: dict[str, Gate] = {}

    def load(path: Path) -> Gate:
        gates[path.parent.name] = Gate(loaded[path])
        return gates[path.parent.name]

    cfg = replace(server_config(Path("unused")), model_dir=None, model_repository=str(repository), **overrides)
    server, _ = await create_server(cfg, registry=CollectorRegistry(), load=load)
    await server.start()
    try:
        yield server, gates
    finally:
        for gate in gates.values():
            gate.open()
        await server.stop(1.0)


async def failure(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


def sources_of(gate: Any) -> list[list[int]]:
    return [source for sources, _ in gate.calls for source in sources]


async def test_discovery_skips_what_is_not_a_model_version(repository: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="nmt-serve"):
        models = discover(repository)
    assert [(m.name, sorted(m.versions), m.latest) for m in models] == [("other", [1], 1), ("tiny", [1, 2], 2)]
    why = "\n".join(caplog.messages)
    for expected in (
        "skipping tiny/latest: a version is a positive integer",
        "skipping tiny/0: a version is",
        "skipping other/3: no manifest.json",
        "skipping empty: no version directory",
        "skipping 'bad name': a model name is made of",
        "skipping README.md: not a directory",
    ):
        assert expected in why, why
    with pytest.raises(ValueError, match="holds no model: expected NAME/VERSION/manifest.json"):
        discover(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        discover(tmp_path / "missing")


async def test_routes_by_model_and_version(repository: Path, loaded, grpc_translator) -> None:
    async with serve_repository(repository, loaded, default_model="tiny") as (server, gates):
        expected = [a[0] for a in alone(grpc_translator, TEXTS[:2], DecodeOptions(beam_size=1))]
        async with channel(server) as ch:
            s = stub(ch)
            for request, model in (
                (pb.TranslateRequest(texts=TEXTS[:2], options=GREEDY), "tiny"),
                (pb.TranslateRequest(texts=TEXTS[:2], options=GREEDY, model="other"), "other"),
                (pb.TranslateRequest(texts=TEXTS[:2], options=GREEDY, model="tiny", version=2), "tiny"),
            ):
                for gate in gates.values():
                    gate.calls.clear()
                response = await s.Translate(request)
                assert [t.hypotheses[0].text for t in response.translations] == expected
                assert {name for name, gate in gates.items() if gate.calls} == {model}, request
            cases = [
                (
                    pb.TranslateRequest(texts=["a"], model="nope"),
                    f"model 'nope' is not served; this server serves: {SERVED}",
                ),
                (
                    pb.TranslateRequest(texts=["a"], model="tiny", version=1),
                    f"model 'tiny' version 1 is not served (it is on disk; only the highest version is loaded); "
                    f"this server serves: {SERVED}",
                ),
                (
                    pb.TranslateRequest(texts=["a"], model="other", version=7),
                    f"model 'other' version 7 is not served; this server serves: {SERVED}",
                ),
            ]
            for request, message in cases:
                assert await failure(s.Translate(request)) == (grpc.StatusCode.NOT_FOUND, message)
            # A stream routes each request on its own; an unknown model fails that request only.
            requests = [
                pb.TranslateStreamRequest(id="a", texts=TEXTS[:1], options=GREEDY, model="other"),
                pb.TranslateStreamRequest(id="b", texts=TEXTS[:1], options=GREEDY, model="nope"),
                pb.TranslateStreamRequest(id="c", texts=TEXTS[:1], options=GREEDY),
            ]
            answers = {r.id: r async for r in s.TranslateStream(iter(requests))}
            assert answers["a"].response.translations[0].hypotheses[0].text == expected[0]
            assert answers["c"].response.translations[0].hypotheses[0].text == expected[0]
            assert answers["b"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert answers["b"].error.message.startswith("model 'nope' is not served")


async def test_list_models_and_model_info(repository: Path, loaded, grpc_translator) -> None:
    async with serve_repository(repository, loaded, default_model="tiny") as (server, _):
        async with channel(server) as ch:
            s = stub(ch)
            listed = (await s.ListModels(pb.ListModelsRequest())).models
            info = grpc_translator.info
            assert [
                (m.name, list(m.versions), m.serving_version, m.src_lang, m.tgt_lang, m.state, m.default_model)
                for m in listed
            ] == [
                ("other", [1], 1, info.src_lang, info.tgt_lang, "READY", False),
                ("tiny", [1, 2], 2, info.src_lang, info.tgt_lang, "READY", True),
            ]
            for model, name, version in (("", "tiny", "2"), ("tiny", "tiny", "2"), ("other", "other", "1")):
                got = await s.GetModelInfo(pb.GetModelInfoRequest(model=model))
                assert (got.name, got.version, got.bundle_sha256) == (name, version, info.bundle_sha256)
            assert await failure(s.GetModelInfo(pb.GetModelInfoRequest(model="nope"))) == (
                grpc.StatusCode.NOT_FOUND,
                f"model 'nope' is not served; this server serves: {SERVED}",
            )
            server.servicer.draining = True  # what stop() does first
            assert {m.state for m in (await s.ListModels(pb.ListModelsRequest())).models} == {"UNAVAILABLE"}
            server.servicer.draining = False


async def test_no_default_model_with_several(repository: Path, loaded) -> None:
    async with serve_repository(repository, loaded) as (server, _):
        async with channel(server) as ch:
            s = stub(ch)
            code, message = await failure(s.Translate(pb.TranslateRequest(texts=["a"])))
            assert code == grpc.StatusCode.NOT_FOUND and message.endswith(f"this server serves: {SERVED}")
            assert "--default-model" in message
            assert not any(m.default_model for m in (await s.ListModels(pb.ListModelsRequest())).models)
            assert (await s.Translate(pb.TranslateRequest(texts=["A dog."], model="tiny"))).translations
    with pytest.raises(ValueError, match="default model 'nope' is not in the model repository; it holds: other, tiny"):
        async with serve_repository(repository, loaded, default_model="nope"):
            pass


async def test_a_batch_never_mixes_models(repository: Path, loaded) -> None:
    async with serve_repository(repository, loaded, default_model="tiny", max_wait_ms=50.0) as (server, gates):
        tiny_texts, other_texts = TEXTS[:3], TEXTS[3:6]
        for gate in gates.values():
            gate.close()
        async with channel(server) as ch:
            s = stub(ch)
            calls = [
                s.Translate(pb.TranslateRequest(texts=[text], options=GREEDY, model=model))
                for texts, model in ((tiny_texts, "tiny"), (other_texts, "other"))
                for text in texts
            ]
            pending = asyncio.gather(*calls)
            await eventually(
                lambda: gates["tiny"].entered.is_set() and gates["other"].entered.is_set(), what="both models' engines"
            )
            for gate in gates.values():
                gate.open()
            assert len(await pending) == 6
        tokenize = gates["tiny"].translator.tokenize
        assert sorted(sources_of(gates["tiny"])) == sorted(tokenize(tiny_texts))
        assert sorted(sources_of(gates["other"])) == sorted(tokenize(other_texts))
        assert server.models.lookup("tiny").scheduler is not server.models.lookup("other").scheduler
        for model, version, texts in (("tiny", "2", tiny_texts), ("other", "1", other_texts)):  # each its own series
            labels = {"model": model, "version": version}
            assert sample_sum(server.registry, "nmt_queue_wait_seconds_count", labels) == len(texts)
            assert sample_sum(server.registry, "nmt_requests_total", {"method": "Translate", **labels}) == len(texts)


def model_series(server: NmtServer, name: str) -> list[tuple[str, str]]:
    return sorted(
        (s.labels["model"], s.labels["version"]) for f in server.registry.collect() for s in f.samples if s.name == name
    )


async def test_each_model_has_its_own_info_and_unloading_removes_its_gauges(repository: Path, loaded) -> None:
    async with serve_repository(repository, loaded, default_model="tiny") as (server, _):
        for name in ("nmt_model_info", "nmt_engine_info", "nmt_queue_sentences"):
            assert model_series(server, name) == [("other", "1"), ("tiny", "2")], name
        assert server.control is not None
        await server.control.unload("other")
        await server.models.wait_retired()
        for name in ("nmt_model_info", "nmt_engine_info", "nmt_queue_sentences"):
            assert model_series(server, name) == [("tiny", "2")], name


async def test_kserve_routes_by_model_name_and_version(repository: Path, loaded, grpc_translator) -> None:
    triton = pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] (the dev extra)")
    from tritonclient.grpc import InferInput
    from tritonclient.utils import InferenceServerException

    def text_input(texts: list[str]) -> InferInput:
        tensor = InferInput("TEXT", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(__import__("numpy").array([t.encode() for t in texts], dtype=object))
        return tensor

    expected = [a[0] for a in alone(grpc_translator, TEXTS[:2], DecodeOptions(beam_size=1))]
    async with serve_repository(repository, loaded, default_model="tiny") as (server, gates):
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            for model, version in (("other", ""), ("tiny", "2"), ("tiny", "")):
                for gate in gates.values():
                    gate.calls.clear()
                result = await client.infer(
                    model, [text_input(TEXTS[:2])], model_version=version, parameters={"beam_size": 1}
                )
                assert [t.decode() for t in result.as_numpy("TRANSLATION")] == expected
                assert result.get_response().model_name == model
                assert result.get_response().model_version == ("1" if model == "other" else "2")
                assert {name for name, gate in gates.items() if gate.calls} == {model}
            for model, version, what in (("nope", "", "'nope'"), ("tiny", "1", "'tiny' version 1"), ("", "", "''")):
                with pytest.raises(InferenceServerException) as caught:
                    await client.infer(model, [text_input(["a"])], model_version=version)
                assert caught.value.status() == "StatusCode.NOT_FOUND"
                assert caught.value.message() == (
                    f"Request for unknown model: {what} is not found; this server serves: {SERVED}"
                )
            assert await client.is_model_ready("other") and await client.is_model_ready("tiny", "2")
            assert not await client.is_model_ready("tiny", "1") and not await client.is_model_ready("nope")
            metadata = await client.get_model_metadata("tiny")
            assert (metadata.name, list(metadata.versions)) == ("tiny", ["2"])
            with pytest.raises(InferenceServerException) as caught:
                await client.get_model_metadata("other", "2")
            assert "Request for unknown model: 'other' version 2 is not found" in caught.value.message()
        finally:
            await client.close()


async def test_single_bundle_is_a_registry_of_one(default_server, grpc_translator) -> None:
    info = grpc_translator.info
    async with channel(default_server) as ch:
        s = stub(ch)
        (entry,) = (await s.ListModels(pb.ListModelsRequest())).models
        assert (entry.name, entry.state, entry.default_model) == (info.name, "READY", True)
        assert (await s.GetModelInfo(pb.GetModelInfoRequest(model=info.name))).version == info.version
        code, message = await failure(s.Translate(pb.TranslateRequest(texts=["a"], model="nope")))
        assert (code, message) == (
            grpc.StatusCode.NOT_FOUND,
            f"model 'nope' is not served; this server serves: {info.name} (version {info.version})",
        )
        assert (await s.Translate(pb.TranslateRequest(texts=["A dog."], model=info.name))).translations


async def test_cli_model_flag_and_models_list(repository: Path, loaded, grpc_translator, capsys) -> None:
    async with serve_repository(repository, loaded, default_model="tiny") as (server, gates):
        target = ["--target", f"127.0.0.1:{server.port}"]
        assert await asyncio.to_thread(client_module.main, ["models", "list", *target]) == 0
        info = grpc_translator.info
        langs = f"{info.src_lang}-{info.tgt_lang}"
        assert capsys.readouterr().out.splitlines() == [
            "NAME\tVERSIONS\tLANGUAGES\tSTATE\tDEFAULT",
            f"other\t[1]\t{langs}\tREADY\t",
            f"tiny\t1,[2]\t{langs}\tREADY\t*",
        ]
        gates["tiny"].calls.clear()
        assert (
            await asyncio.to_thread(
                client_module.main, ["translate", "--model", "other", "--beam", "1", TEXTS[0], *target]
            )
            == 0
        )
        expected = alone(grpc_translator, TEXTS[:1], DecodeOptions(beam_size=1))[0][0]
        assert capsys.readouterr().out.strip() == expected and not gates["tiny"].calls
        assert await asyncio.to_thread(client_module.main, ["info", "--model", "other", *target]) == 0
        assert 'name: "other"' in capsys.readouterr().out
        assert await asyncio.to_thread(client_module.main, ["translate", "--model", "nope", "a", *target]) == 1
        assert capsys.readouterr().err.startswith("nmt-client: error: NOT_FOUND: model 'nope' is not served")


async def test_config_needs_one_model_source() -> None:
    with pytest.raises(ValueError, match="a model is required: --model-dir"):
        ServerConfig()
    with pytest.raises(ValueError, match="not both"):
        ServerConfig(model_dir="/b", model_repository="/r")
    env = {"NMT_MODEL_DIR": "/b"}  # as the image sets it: a repository on the command line wins
    assert (
        from_args(["--model-repository", "/r"], env).model_repository,
        from_args(["--model-repository", "/r"], env).model_dir,
    ) == ("/r", None)
    cfg = from_args([], {"NMT_MODEL_REPOSITORY": "/r", "NMT_DEFAULT_MODEL": "tiny"})
    assert (cfg.model_dir, cfg.model_repository, cfg.default_model) == (None, "/r", "tiny")
    image = {"NMT_MODEL_REPOSITORY": "/r", "NMT_DEFAULT_MODEL": "en-de"}  # as the image sets them
    cfg = from_args([], {**image, "NMT_MODEL_DIR": "/b"})  # docker run -e NMT_MODEL_DIR=...: that bundle
    assert (cfg.model_dir, cfg.model_repository, cfg.default_model) == ("/b", None, None)
    with pytest.raises(SystemExit):
        from_args(["--model-dir", "/b", "--model-repository", "/r"], {})


async def test_lookup_rules() -> None:
    with pytest.raises(ModelNotFound) as caught:
        Models.lookup(_fake_models(), "x")
    assert str(caught.value) == "model 'x' is not served; this server serves: a (version 3), b (version 1)"


def _fake_models() -> Models:
    from nmt.engine.translator import ModelInfo
    from nmt.server.repository import ModelEntry

    def entry(name: str, version: int) -> ModelEntry:
        info = ModelInfo(name, str(version), "en", "de", 1, "", "fp32-cpu", "cpu")
        return ModelEntry(info, None, (version,), version)  # type: ignore[arg-type]

    models = Models([entry("b", 1), entry("a", 3)], "a")
    assert models.lookup("", None).name == "a" and models.lookup("a", 3).name == "a"
    assert models.lookup("a", "3").name == "a" and models.lookup("b", "").name == "b"
    return models


async def test_nmt_serve_loads_a_repository(repository: Path, tmp_path: Path) -> None:
    """The real start path: nmt-serve loads and checks every model's highest version itself."""
    proc, port, _, lines = await asyncio.to_thread(
        start_nmt_serve,
        repository / "tiny" / "2",
        tmp_path / "ports.json",
        NMT_MODEL_DIR="",
        NMT_MODEL_REPOSITORY=str(repository),
        NMT_DEFAULT_MODEL="other",
        NMT_METRICS_PORT="-1",
    )
    try:

        def check() -> None:
            with client_module.TranslationClient(target=f"127.0.0.1:{port}") as c:
                assert [(m.name, m.serving_version, m.default_model) for m in c.list_models(timeout=30)] == [
                    ("other", 1, True),
                    ("tiny", 2, False),
                ]
                assert c.model_info(timeout=30).name == "other"
                assert c.translate(["A dog."], model="tiny", version=2, timeout=30)[0][0].text

        await asyncio.to_thread(check)
    finally:
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 30) == 0, "".join(lines)
    assert any("skipping tiny/latest" in line for line in lines), "".join(lines)


async def test_the_models_take_engine_turns_together(repository: Path, loaded) -> None:
    """--engine-turns shared or exclusive: one EngineTurns for the repository's models (engine/turns.py), of
    --threads cores (the default) or one; off: none."""
    for mode, cores in (("shared", 2), ("exclusive", 1)):
        async with serve_repository(repository, loaded, default_model="tiny", engine_turns=mode, threads=2) as (
            server,
            _,
        ):
            tiny, other = (server.models.lookup(name).service.translator.sessions.turns for name in ("tiny", "other"))
            assert isinstance(tiny, EngineTurns) and tiny is other and tiny.cores == cores
    async with serve_repository(repository, loaded, default_model="tiny") as (server, _):  # the default
        async with channel(server) as ch:
            reply = await stub(ch).Translate(pb.TranslateRequest(texts=TEXTS[:2], model="other"))
        assert len(reply.translations) == 2 and all(t.hypotheses[0].text for t in reply.translations)
        assert server.registry.get_sample_value("nmt_engine_turn_wait_seconds_count") is not None
    async with serve_repository(repository, loaded, default_model="tiny", engine_turns="off") as (server, _):
        assert all(
            server.models.lookup(name).service.translator.sessions.turns is NO_TURNS for name in ("tiny", "other")
        )
