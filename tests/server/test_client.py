"""The Python clients (sync and asyncio) and the nmt-client CLI against a real server."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest
from grpc_helpers import TEXTS, alone

from nmt.engine.decoding import DecodeOptions
from nmt.server import client as client_module
from nmt.server.client import AsyncTranslationClient, Connection, TranslationClient

pytestmark = pytest.mark.asyncio


async def test_sync_client(default_server, grpc_translator) -> None:
    target = f"127.0.0.1:{default_server.port}"

    def use() -> tuple:
        with TranslationClient(target=target) as c:
            found = c.translate(
                TEXTS[:3],
                beam_size=2,
                n_best=2,
                max_len_extra=9,
                return_scores=True,  # noqa
                timeout=10,
            )
            streamed = sorted(
                c.translate_stream([("a", TEXTS[:1]), ("b", [])], beam_size=1, timeout=10), key=lambda r: r[0]
            )
            return found, streamed, c.model_info(timeout=10), c.health(timeout=10)

    found, streamed, info, health = await asyncio.to_thread(use)
    want = grpc_translator.translate(TEXTS[:3], DecodeOptions(beam_size=2, n_best=2, max_len_extra=9))  # noqa
    assert [[h.text for h in hyps] for hyps in found] == [[t.text for t in ts] for ts in want]
    assert found[0][0].normalized_score == pytest.approx(want[0][0].normalized_score, abs=1e-4)
    assert streamed[0][0] == "a" and len(streamed[0][1]) == 1
    assert streamed[1][:2] == ("b", grpc.StatusCode.INVALID_ARGUMENT) and "texts is empty" in streamed[1][2]
    assert info.vocab_size == grpc_translator.info.vocab_size and health == "SERVING"


async def test_async_client(default_server, grpc_translator) -> None:
    async with AsyncTranslationClient(Connection(f"127.0.0.1:{default_server.port}")) as c:
        found = await c.translate(TEXTS[:2], beam_size=1, timeout=10)
        answers = {i: r async for i, r, _ in c.translate_stream([("x", TEXTS[2:4])], timeout=10)}
        assert (await c.model_info()).name == grpc_translator.info.name
    assert [hyps[0].text for hyps in found] == [
        a[0] for a in alone(grpc_translator, TEXTS[:2], DecodeOptions(beam_size=1))
    ]
    assert len(answers["x"]) == 2


async def test_cli_translates_arguments_and_stdin(default_server, grpc_translator, capsys, monkeypatch) -> None:
    target = ["--target", f"127.0.0.1:{default_server.port}"]
    beam = DecodeOptions(beam_size=1)
    assert (
        await asyncio.to_thread(
            client_module.main,
            [
                "translate",
                TEXTS[0],
                TEXTS[1],
                "--beam",
                "1",  # noqa
                *target,
            ],
        )
        == 0
    )
    expected = [a[0] for a in alone(grpc_translator, TEXTS[:5], beam)]
    assert capsys.readouterr().out.splitlines() == expected[:2]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TEXTS[:5]) + "\n"))
    assert await asyncio.to_thread(client_module.main, ["translate", "--beam", "1", "--batch-size", "2", *target]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    assert (
        await asyncio.to_thread(client_module.main, ["translate", "A dog.", "--beam", "3", "--n-best", "2", *target])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("0\t") for line in lines)
    assert await asyncio.to_thread(client_module.main, ["health", *target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


async def test_cli_errors_are_one_line_with_the_status_code(default_server, capsys) -> None:
    target = ["--target", f"127.0.0.1:{default_server.port}"]
    assert await asyncio.to_thread(client_module.main, ["translate", "A dog.", "--beam", "0", *target]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nmt-client: error: INVALID_ARGUMENT: beam_size must be between 1 and max_beam_size=16, got 0"]
    assert await asyncio.to_thread(client_module.main, ["info", "--target", "127.0.0.1:1", "--deadline", "2"]) == 1
    assert capsys.readouterr().err.startswith("nmt-client: error: UNAVAILABLE: ")


async def test_cli_connection_flags_before_or_after_the_command(default_server, grpc_translator, capsys) -> None:
    """`nmt-client --target HOST:PORT translate ...` (as grpcurl and kubectl users type it) works as the
    flags after the command do; given on both sides, the one after the command wins."""
    target = f"127.0.0.1:{default_server.port}"
    expected = [a[0] for a in alone(grpc_translator, TEXTS[:2], DecodeOptions(beam_size=1))]
    run = lambda argv: asyncio.to_thread(client_module.main, argv)  # noqa: E731
    assert await run(["--target", target, "--deadline", "10", "translate", *TEXTS[:2], "--beam", "1"]) == 0  # noqa
    assert capsys.readouterr().out.splitlines() == expected
    assert await run(["--target", "127.0.0.1:1", "health", "--target", target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert await run(["--target", target, "info"]) == 0
    assert f'name: "{grpc_translator.info.name}"' in capsys.readouterr().out
    # A flag given only before the command is not reset by the command's own (suppressed) default.
    assert await run(["--target", "127.0.0.1:1", "--deadline", "2", "health"]) == 1
    assert capsys.readouterr().err.startswith("nmt-client: error: UNAVAILABLE: ")
