"""The text pipeline through a real loopback server: paragraphs come back sentence by sentence with
their separators, over the nmt proto and over KServe; split_sentences=false keeps one unit per text."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from grpc_helpers import channel, serve, server_config, stub

from nmt.engine.decoding import DecodeOptions
from nmt.engine.text import TextOptions
from nmt.engine.translator import Translator
from nmt.server.nmt_pb import translation_pb2 as pb

triton_aio = pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] (the dev extra) is the client")
from tritonclient.grpc import InferInput  # noqa: E402

pytestmark = pytest.mark.asyncio
GREEDY = DecodeOptions(beam_size=1, max_len_extra=12)
SENTENCES = ["A man rides a bike.", "Two dogs play in the snow.", "A woman sings."]
PARAGRAPH = f"{SENTENCES[0]} {SENTENCES[1]}\n\n{SENTENCES[2]}"


def each_alone(translator: Translator, sentences: list[str]) -> list[str]:
    return [translator.translate([s], GREEDY)[0][0].text for s in sentences]


async def nmt_translate(server: Any, texts: list[str], **options: Any) -> list[str]:
    async with channel(server) as ch:
        options = pb.DecodeOptions(beam_size=1, max_len_extra=12, **options)
        reply = await stub(ch).Translate(pb.TranslateRequest(texts=texts, options=options))
    return [t.hypotheses[0].text for t in reply.translations]


async def test_a_three_sentence_paragraph_gets_three_sentences_back_over_nmt(default_server, grpc_translator):
    one, two, three = each_alone(grpc_translator, SENTENCES)
    assert await nmt_translate(default_server, [PARAGRAPH]) == [f"{one} {two}\n\n{three}"]


async def test_the_same_over_kserve(default_server, grpc_translator):
    one, two, three = each_alone(grpc_translator, SENTENCES)
    tensor = InferInput("TEXT", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([PARAGRAPH.encode()], dtype=np.object_))
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{default_server.port}")
    try:
        name = grpc_translator.info.name
        result = await client.infer(name, [tensor], parameters={"beam_size": 1, "max_len_extra": 12})
        unsplit = await client.infer(
            name, [tensor], parameters={"beam_size": 1, "max_len_extra": 12, "split_sentences": False}
        )
    finally:
        await client.close()
    assert result.as_numpy("TRANSLATION")[0].decode() == f"{one} {two}\n\n{three}"
    whole = grpc_translator.translate([PARAGRAPH], GREEDY, TextOptions(split_sentences=False))[0][0].text
    assert unsplit.as_numpy("TRANSLATION")[0].decode() == whole


async def test_split_sentences_false_translates_a_text_as_one_unit(default_server, grpc_translator):
    # Today's behaviour: the text as the model's one source (the tiny model ignores no sentence boundary).
    source = grpc_translator.tokenize([PARAGRAPH])[0]
    expected = grpc_translator.detokenize([grpc_translator.search([source], GREEDY).hypotheses[0][0].tokens])[0]
    assert await nmt_translate(
        default_server, [PARAGRAPH], split_sentences=False, normalize_case=False, protect_spans=False
    ) == [expected]


async def test_the_sentence_limit_and_the_per_sentence_token_limit(grpc_bundle, grpc_translator):
    cfg = server_config(grpc_bundle, max_sentences=4, max_tokens_per_text=12)
    async with serve(cfg, grpc_translator) as server, channel(server) as ch:

        async def code_of(texts: list[str], **options: Any) -> tuple[Any, str]:
            call = stub(ch).Translate(pb.TranslateRequest(texts=texts, options=pb.DecodeOptions(**options)))
            try:
                await call
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details()
            return grpc.StatusCode.OK, ""

        code, details = await code_of(["A dog. A cat. A bird.", "A man. A woman."])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_sentences_per_request=4" in details
        long = "A man in a red shirt rides a very old bike down the long street."
        code, details = await code_of([f"A dog. {long}"])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("text 0, sentence 1 has")
        code, _ = await code_of(["A dog. A cat runs.", "A bird."], beam_size=1)  # each sentence within the limits
        assert code == grpc.StatusCode.OK
        info = await stub(ch).GetModelInfo(pb.GetModelInfoRequest())
        assert info.max_sentences_per_request == 4


async def test_the_same_over_translate_stream(default_server, grpc_translator):
    one, two, three = each_alone(grpc_translator, SENTENCES)
    options = pb.DecodeOptions(beam_size=1, max_len_extra=12)
    async with channel(default_server) as ch:
        requests = [pb.TranslateStreamRequest(id="p", texts=[PARAGRAPH], options=options)]
        answers = [a async for a in stub(ch).TranslateStream(iter(requests))]
    assert [(a.id, a.response.translations[0].hypotheses[0].text) for a in answers] == [
        ("p", f"{one} {two}\n\n{three}")
    ]
