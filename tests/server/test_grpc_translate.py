"""Translate, TranslateStream and GetModelInfo through a real server on loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_helpers import TEXTS, alone, channel, eventually, serve, server_config, stub

from nmt.engine.decoding import DecodeOptions
from nmt.server.metrics import sample_sum
from nmt.server.nmt_pb import translation_pb2 as pb

pytestmark = pytest.mark.asyncio
BEAM = DecodeOptions(beam_size=3, max_len_extra=12)
GREEDY = DecodeOptions(beam_size=1, max_len_extra=12)


def options_pb(options: DecodeOptions, **kw: object) -> pb.DecodeOptions:
    return pb.DecodeOptions(
        beam_size=options.beam_size,
        max_len_extra=options.max_len_extra,
        length_penalty=options.length_penalty,
        n_best=options.n_best,
        **kw,
    )


def texts_of(response: pb.TranslateResponse) -> list[list[str]]:
    return [[h.text for h in t.hypotheses] for t in response.translations]


@pytest.mark.parametrize("batching", ["continuous", "static"])
async def test_concurrent_clients_get_their_own_answers_in_shared_batches(
    grpc_bundle, grpc_translator, gate, batching
) -> None:
    """Clients sending at once share batches (read from the histogram) yet get what they would get alone.
    The engine's first calls wait until every sentence has reached the scheduler: however slowly the
    calls arrive, the sentences behind them are there to batch together."""
    cases = [(text, BEAM if i % 2 else GREEDY) for i, text in enumerate(TEXTS * 2)]
    expected = {(text, o): alone(grpc_translator, [text], o)[0] for text, o in set(cases)}
    cfg = server_config(grpc_bundle, max_batch_size=64, workers=2, batching=batching)
    async with serve(cfg, gate) as server, channel(server) as ch:
        gate.close()
        calls = [stub(ch).Translate(pb.TranslateRequest(texts=[t], options=options_pb(o))) for t, o in cases]
        responses = asyncio.gather(*calls)
        # Queued (or sent to an engine thread), or in an engine call held at the gate (a sentence being
        # admitted may count twice for a moment; one sentence late changes nothing: the others batch).
        arrived = lambda: server.scheduler.depth + sum(len(sources) for sources, _ in gate.calls)  # noqa: E731
        await eventually(lambda: arrived() >= len(cases), what="every sentence to reach the scheduler")  # noqa
        gate.open()
        responses = await responses
        registry = server.registry
    for (text, o), response in zip(cases, responses):
        assert texts_of(response) == [expected[(text, o)]], text
    count = sample_sum(registry, "nmt_batch_sentences_count")
    single = sample_sum(registry, "nmt_batch_sentences_bucket", {"le": "1.0"})
    assert single < count, "batches of more than one sentence formed"
    if batching == "static":  # continuous batching observes every decoder step's batch instead
        assert sample_sum(registry, "nmt_batch_sentences_sum") == len(cases) and count < len(cases)
    assert sample_sum(registry, "nmt_requests_total", {"method": "Translate", "code": "OK"}) == len(cases)


async def test_texts_spanning_batches_come_back_in_order(grpc_bundle, grpc_translator) -> None:
    expected = alone(grpc_translator, TEXTS, BEAM)
    cfg = server_config(grpc_bundle, max_batch_size=3)
    async with serve(cfg, grpc_translator) as server, channel(server) as ch:
        response = await stub(ch).Translate(
            pb.TranslateRequest(texts=TEXTS, options=options_pb(BEAM, return_scores=True))
        )
        assert sample_sum(server.registry, "nmt_batch_sentences_count") >= 3
    assert texts_of(response) == expected
    best = [t.hypotheses[0] for t in response.translations]
    assert all(h.score < 0 and h.normalized_score < 0 and h.tokens > 0 for h in best)


async def test_n_best_and_scores(default_server, grpc_translator) -> None:
    o = DecodeOptions(beam_size=4, n_best=3, max_len_extra=10, length_penalty=0.6)
    expected = grpc_translator.translate(TEXTS[:2], o)
    async with channel(default_server) as ch:
        with_scores = await stub(ch).Translate(
            pb.TranslateRequest(texts=TEXTS[:2], options=options_pb(o, return_scores=True))
        )
        without = await stub(ch).Translate(pb.TranslateRequest(texts=TEXTS[:2], options=options_pb(o)))
    for want, got in zip(expected, with_scores.translations):
        assert [h.text for h in got.hypotheses] == [t.text for t in want]
        assert [h.tokens for h in got.hypotheses] == [t.tokens for t in want]
        assert [h.normalized_score for h in got.hypotheses] == pytest.approx(
            [t.normalized_score for t in want], abs=1e-4
        )
    assert all(h.score == 0 and h.normalized_score == 0 for t in without.translations for h in t.hypotheses)


async def test_empty_string_translates_to_empty_string(default_server, grpc_translator) -> None:
    async with channel(default_server) as ch:
        response = await stub(ch).Translate(pb.TranslateRequest(texts=["", TEXTS[0], "   "]))
        # Nothing left after the tokenizer's normalization (zero-width space, BOM, NUL, word joiner): blank too.
        invisible = await stub(ch).Translate(pb.TranslateRequest(texts=["\u200b\ufeff\x00", "\u2060 \t"]))
    default = DecodeOptions(beam_size=4)
    assert texts_of(response) == [[""], alone(grpc_translator, [TEXTS[0]], default)[0], [""]]
    assert response.translations[0].hypotheses[0].tokens == 0
    assert texts_of(invisible) == [[""], [""]]
    assert all(t.hypotheses[0].tokens == 0 for t in invisible.translations)


async def test_stream_answers_every_request_by_id(default_server, grpc_translator) -> None:
    o = GREEDY
    requests = [pb.TranslateStreamRequest(id=f"r{i}", texts=[t], options=options_pb(o)) for i, t in enumerate(TEXTS)]
    requests.insert(3, pb.TranslateStreamRequest(id="bad", texts=[]))
    requests.insert(5, pb.TranslateStreamRequest(id="bad-beam", texts=["x"], options=pb.DecodeOptions(beam_size=99)))
    async with channel(default_server) as ch:
        answers = [r async for r in stub(ch).TranslateStream(iter(requests))]
    by_id = {a.id: a for a in answers}
    assert len(answers) == len(requests) == len(by_id)
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "texts is empty" in by_id["bad"].error.message
    assert "max_beam_size=16" in by_id["bad-beam"].error.message
    expected = alone(grpc_translator, TEXTS, o)
    for i, want in enumerate(expected):
        assert by_id[f"r{i}"].WhichOneof("result") == "response"
        assert texts_of(by_id[f"r{i}"].response) == [want]


async def test_stream_answers_as_soon_as_done(grpc_bundle, gate) -> None:
    """The second request is answered while the first one is still held in the engine."""
    cfg = server_config(grpc_bundle, workers=2)
    async with serve(cfg, gate) as server, channel(server) as ch:
        call = stub(ch).TranslateStream()
        gate.close()
        await call.write(pb.TranslateStreamRequest(id="slow", texts=[TEXTS[0]]))
        await eventually(gate.entered.is_set)
        await call.write(pb.TranslateStreamRequest(id="empty", texts=[""]))
        first = await call.read()
        gate.open()
        second = await call.read()
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
    assert (first.id, second.id) == ("empty", "slow")


async def test_model_info(default_server, grpc_translator) -> None:
    async with channel(default_server) as ch:
        info = await stub(ch).GetModelInfo(pb.GetModelInfoRequest())
    want = grpc_translator.info
    assert (info.name, info.version, info.vocab_size, info.bundle_sha256) == (
        want.name,
        want.version,
        want.vocab_size,
        want.bundle_sha256,
    )
    assert (info.src_lang, info.tgt_lang, info.precision, info.provider) == (
        "en",
        "de",
        want.precision,
        "CPUExecutionProvider",
    )
    assert (info.max_texts_per_request, info.max_tokens_per_text, info.max_beam_size) == (64, 256, 16)
    assert info.default_options.beam_size == 4
