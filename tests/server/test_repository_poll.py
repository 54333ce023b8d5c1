"""Polling the model repository (--repository-poll-seconds, server/control.py poll()): new models and versions
load, models whose directory is gone unload, a broken version is tried once and keeps what serves, and a
model unloaded over the API stays unloaded. Most tests call poll() themselves (what the timer calls); one
runs the timer and waits for its result."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from grpc_helpers import TEXTS, add_version, channel, eventually, loads, repository, serve_repo, stub

from nmt.server.config import ServerConfig
from nmt.server.main import NmtServer
from nmt.server.nmt_pb import translation_pb2 as pb

pytestmark = pytest.mark.asyncio


def served(server: NmtServer) -> list[tuple[str, str]]:
    return [(entry.name, entry.version) for entry in server.models]


async def poll(server: NmtServer) -> list[str]:
    assert server.control is not None
    return await server.control.poll()


async def test_a_poll_loads_new_models_and_versions_and_unloads_removed_ones(grpc_bundle: Path, tmp_path: Path) -> None:
    root = repository(tmp_path, grpc_bundle, ("tiny", 1), ("other", 1))
    async with serve_repo(root, gated=True, default_model="tiny") as (server, _):
        assert await poll(server) == []  # nothing changed since start
        add_version(root, grpc_bundle, "tiny", 2)
        add_version(root, grpc_bundle, "third", 1)
        shutil.rmtree(root / "other")
        assert sorted(await poll(server)) == [
            "loaded third version 1",
            "loaded tiny version 2",
            "unloaded other: no version of it is left in the repository",
        ]
        assert served(server) == [("third", "1"), ("tiny", "2")]
        assert loads(server, "loaded") == 2
        assert await poll(server) == []
        shutil.rmtree(root / "tiny" / "2")  # the newest version goes: the one below it serves again
        assert await poll(server) == ["loaded tiny version 1"]
        assert served(server) == [("third", "1"), ("tiny", "1")]


async def test_a_broken_version_is_tried_once_and_the_served_one_keeps_serving(
    grpc_bundle: Path, tmp_path: Path
) -> None:
    root = repository(tmp_path, grpc_bundle, ("tiny", 1))
    async with serve_repo(root, gated=True) as (server, _):
        broken = add_version(root, grpc_bundle, "tiny", 2)
        graph = next(broken.glob("*.onnx"))
        graph.write_bytes(graph.read_bytes() + b"corrupt")
        [line] = await poll(server)
        assert line.startswith("failed to load 'tiny'") and graph.name in line, line
        assert served(server) == [("tiny", "1")] and loads(server, "failed") == 1
        assert await poll(server) == []  # not retried while the directory stays as it is
        assert loads(server, "failed") == 1
        shutil.rmtree(broken)
        add_version(root, grpc_bundle, "tiny", 2)  # fixed: its files changed
        assert await poll(server) == ["loaded tiny version 2"]
        async with channel(server) as ch:
            reply = await stub(ch).Translate(pb.TranslateRequest(texts=TEXTS[:1]))
        assert reply.translations[0].hypotheses[0].text


async def test_a_model_unloaded_over_the_api_stays_unloaded(grpc_bundle: Path, tmp_path: Path) -> None:
    root = repository(tmp_path, grpc_bundle, ("tiny", 1), ("other", 1))
    async with serve_repo(root, gated=True, default_model="tiny") as (server, _):
        assert server.control is not None
        await server.control.unload("other")
        add_version(root, grpc_bundle, "other", 2)
        assert await poll(server) == []
        assert served(server) == [("tiny", "1")]
        await server.control.load("other")  # the API brings it back; polls follow it again
        assert served(server) == [("other", "2"), ("tiny", "1")]
        add_version(root, grpc_bundle, "other", 3)
        assert await poll(server) == ["loaded other version 3"]


async def test_the_server_polls_by_itself(grpc_bundle: Path, tmp_path: Path) -> None:
    root = repository(tmp_path, grpc_bundle, ("tiny", 1))
    async with serve_repo(root, gated=True, repository_poll_seconds=0.05) as (server, _):
        add_version(root, grpc_bundle, "tiny", 2)
        await eventually(lambda: served(server) == [("tiny", "2")], what="the poll to load version 2")


async def test_polling_needs_a_repository_and_a_period_of_zero_or_more(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repository_poll_seconds needs a model repository"):
        ServerConfig(model_dir=str(tmp_path), repository_poll_seconds=5)
    base = ServerConfig(model_repository=str(tmp_path))
    with pytest.raises(ValueError, match="repository_poll_seconds must be >= 0"):
        replace(base, repository_poll_seconds=-1)
    assert replace(base, repository_poll_seconds=0).repository_poll_seconds == 0
