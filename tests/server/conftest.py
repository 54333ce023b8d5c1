"""Fixtures of the server tests: the engine tests' tiny bundle, a translator on one thread, a gate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from grpc_helpers import ONE_THREAD, Gate, serve, server_config

from nmt.engine.translator import Translator
from nmt.server.main import NmtServer


@pytest.fixture(scope="session")
def grpc_bundle(request: pytest.FixtureRequest) -> Path:
    """The engine tests' tiny bundle (tests/model_fixtures.py: server_bundle); never modified."""
    return request.getfixturevalue("server_bundle")


@pytest.fixture(scope="session")
def grpc_translator(grpc_bundle: Path) -> Translator:
    return Translator.from_bundle(grpc_bundle, ONE_THREAD)


@pytest.fixture
def gate(grpc_translator: Translator) -> Iterator[Gate]:
    g = Gate(grpc_translator)
    yield g
    g.open()  # never leave an engine thread waiting


@pytest_asyncio.fixture
async def default_server(grpc_bundle: Path, grpc_translator: Translator) -> AsyncIterator[NmtServer]:
    async with serve(server_config(grpc_bundle), grpc_translator) as server:
        yield server
