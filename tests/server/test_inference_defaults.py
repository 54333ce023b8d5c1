"""The inference settings stored in a checkpoint reach the bundle, the Translator, nmt-translate and
the server's defaults; flags still override them."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from grpc_helpers import ONE_THREAD, channel, serve, server_config, stub

from nmt.engine.decoding import DecodeOptions
from nmt.engine.translator import Translator
from nmt.export.export import ExportOptions, export_checkpoint
from nmt.server.config import ServerConfig
from nmt.server.nmt_pb import translation_pb2 as pb
from nmt.server.translate import main as translate_main
from nmt.training.checkpoint import InferenceSettings, update_inference

TUNED = InferenceSettings(beam_size=3, length_penalty=1.2, max_len_extra=7)


@pytest.fixture(scope="module")
def tuned_bundle(server_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tuned")
    shutil.copytree(server_checkpoint, root / "ckpt")
    update_inference(root / "ckpt", TUNED)
    export_checkpoint(
        root / "ckpt", root / "bundle", options=ExportOptions(variants=("fp32",), validate=False, shortlist=False)
    )
    return root / "bundle"


def test_bundle_and_translator_carry_the_settings(tuned_bundle):
    manifest = json.loads((tuned_bundle / "manifest.json").read_text())
    assert manifest["inference"] == TUNED.to_dict()
    assert Translator.from_bundle(tuned_bundle, ONE_THREAD).default_options() == DecodeOptions(3, 1.2, 7)


def test_old_bundles_without_settings_get_the_engine_defaults(server_bundle):
    assert Translator.from_bundle(server_bundle, ONE_THREAD).default_options() == DecodeOptions()


def test_server_flag_overrides_only_the_beam(tuned_bundle):
    cfg = ServerConfig(model_dir=str(tuned_bundle))
    assert cfg.default_options(DecodeOptions(3, 1.2, 7)) == DecodeOptions(3, 1.2, 7)
    override = ServerConfig(model_dir=str(tuned_bundle), default_beam_size=5)
    assert override.default_options(DecodeOptions(3, 1.2, 7)) == DecodeOptions(5, 1.2, 7)


@pytest.mark.asyncio
async def test_server_announces_and_uses_the_bundle_settings(tuned_bundle):
    translator = Translator.from_bundle(tuned_bundle, ONE_THREAD)
    async with serve(server_config(tuned_bundle), translator) as server, channel(server) as ch:
        info = await stub(ch).GetModelInfo(pb.GetModelInfoRequest())
        reply = await stub(ch).Translate(pb.TranslateRequest(texts=["A dog runs."]))
    assert (info.default_options.beam_size, info.default_options.length_penalty) == (3, pytest.approx(1.2))
    expected = translator.translate(["A dog runs."], DecodeOptions(3, 1.2, 7))[0][0].text
    assert reply.translations[0].hypotheses[0].text == expected


def test_nmt_translate_defaults_to_the_bundle_settings(tuned_bundle, monkeypatch, capsys):
    translator = Translator.from_bundle(tuned_bundle, ONE_THREAD)
    text = "Two men are playing football in a park near the river."
    for argv, options in (([], DecodeOptions(3, 1.2, 7)), (["--beam", "1"], DecodeOptions(1, 1.2, 7))):
        monkeypatch.setattr(sys, "stdin", io.StringIO(text + "\n"))
        assert translate_main(["--bundle", str(tuned_bundle), "--threads", "1", "--quiet", *argv]) == 0
        assert capsys.readouterr().out == translator.translate([text], options)[0][0].text + "\n"
