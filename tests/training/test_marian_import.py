"""nmt-import (issue 24, parts 1 and 2): Marian directories made here with `transformers` become our
checkpoints, and training/model.py on the imported weights computes what MarianMTModel computes."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from marian_fixtures import MarianSpec, encode, make_and_import, make_marian, sentences

from nmt.engine.bundle import sha256_file
from nmt.training.marian import load_imported, main
from nmt.training.search import SpecialIds, greedy_search

transformers = pytest.importorskip("transformers")  # a dev dependency: installed by `make test`

SPECS = {
    "shared-swish": MarianSpec(),
    "separate-gelu": MarianSpec(activation="gelu", shared=False, decoder_layers=2),
    "multilingual-relu": MarianSpec(activation="relu", multilingual=True),
    "pickle-weights": MarianSpec(weights="bin"),
}


@pytest.fixture(scope="module", params=list(SPECS))
def marian(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(name, Hugging Face directory, our imported checkpoint)."""
    return request.param, *make_and_import(tmp_path_factory.mktemp(request.param), SPECS[request.param])


def reference(source: Path) -> torch.nn.Module:
    return transformers.MarianMTModel.from_pretrained(source).eval()


def test_the_checkpoint_names_every_difference_and_its_provenance(marian: tuple[str, Path, Path]) -> None:
    name, source, ours = marian
    config = json.loads((ours / "config.json").read_text())
    hf = json.loads((source / "config.json").read_text())
    model = config["model"]
    assert model["activation"] == {"swish": "swish", "gelu": "gelu", "relu": "relu"}[hf["activation_function"]]
    assert model["position_layout"] == "halves" and model["output_bias"] and model["scale_embedding"]
    assert model["shared_embeddings"] == hf["share_encoder_decoder_embeddings"]
    assert (model["n_encoder_layers"], model["n_decoder_layers"]) == (hf["encoder_layers"], hf["decoder_layers"])
    assert config["special_ids"] == {
        "eos": 0,
        "pad": hf["pad_token_id"],
        "unk": 1,
        "decoder_start": hf["decoder_start_token_id"],
    }
    assert config["generation"]["num_beams"] == 4 and config["generation"]["bad_words_ids"] == [[hf["pad_token_id"]]]
    assert config["target_languages"] == (["deu", "fra"] if name == "multilingual-relu" else [])
    hashes = config["info"]["input_sha256"]
    assert hashes == {p.name: sha256_file(p) for p in source.iterdir() if p.is_file()}
    assert ("pytorch_model.bin" in hashes) == (name == "pickle-weights")


def test_logits_match_transformers(marian: tuple[str, Path, Path]) -> None:
    _, source, ours = marian
    hf, (model, config) = reference(source), load_imported(ours)
    pad = config["special_ids"]["pad"]
    src = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 0, pad, pad]])
    tgt = torch.tensor([[config["special_ids"]["decoder_start"], 11, 12, 13]] * 2)
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=src != pad, decoder_input_ids=tgt).logits
        got = model(src, src != pad, tgt)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_greedy_ids_match_generate(marian: tuple[str, Path, Path]) -> None:
    name, source, ours = marian
    hf, (model, config) = reference(source), load_imported(ours)
    ids = config["special_ids"]
    source_sp = __import__("sentencepiece").SentencePieceProcessor(model_file=str(source / "source.spm"))
    vocab = json.loads((source / "vocab.json").read_text())
    texts = sentences(40, seed=99)
    if name == "multilingual-relu":
        texts = [f">>{'deu' if i % 2 else 'fra'}<< {t}" for i, t in enumerate(texts)]
    sources = [encode(source_sp, vocab, t)[:-1] for t in texts]  # our search appends </s> itself
    special = SpecialIds(start=ids["decoder_start"], eos=ids["eos"], pad=ids["pad"], never=(ids["pad"],))
    found = greedy_search(model, sources, max_len_extra=20, repetition_guard=False, special=special)
    for src, hyp in zip(sources, found):
        row = torch.tensor([src + [ids["eos"]]])
        with torch.no_grad():
            want = hf.generate(
                row, attention_mask=row != ids["pad"], num_beams=1, do_sample=False, max_length=1 + len(src) + 20
            )[0].tolist()  # the start token counts
        assert want[0] == ids["decoder_start"] and want[-1] == ids["eos"], want
        assert hyp.tokens == want[1:-1]
    assert len({tuple(h.tokens) for h in found}) > len(found) // 2  # the outputs depend on the inputs


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_marian(tmp_path_factory.mktemp("good") / "hf", MarianSpec(steps=1))


def broken(good: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(good, copy)
    return copy


def edit_config(directory: Path, **fields: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **fields}))


class CarriesCode:
    def __reduce__(self):  # unpickling this would run print(); weights_only refuses it
        return (print, ("code ran",))


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda d: (d / "source.spm").unlink(), "source.spm: missing"),
        (lambda d: edit_config(d, activation_function="gelu_new"), "'activation_function' is 'gelu_new'"),
        (lambda d: edit_config(d, vocab_size=7, decoder_vocab_size=7), "pad_id 81 is not an id"),
        (lambda d: edit_config(d, decoder_vocab_size=7), "'decoder_vocab_size' (7) differs"),
        (lambda d: edit_config(d, encoder_ffn_dim=128, decoder_ffn_dim=128), "config.json says (128, 32)"),
        (lambda d: edit_config(d, model_type="bart"), "'model_type' is 'bart'"),
        (lambda d: edit_config(d, decoder_ffn_dim=128), "'encoder_ffn_dim' (64) and 'decoder_ffn_dim' (128) differ"),
        (lambda d: (d / "vocab.json").write_text(json.dumps({"</s>": 0, "<unk>": 1})), "vocab.json: 2 pieces"),
        (
            lambda d: (
                (d / "model.safetensors").unlink(),
                (d / "pytorch_model.bin").write_bytes(pickle.dumps(CarriesCode())),
            ),
            "pytorch_model.bin: refused",
        ),
        (lambda d: (d / "model.safetensors").write_bytes(b"not weights"), "model.safetensors: not a safetensors file"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damage, named: str
) -> None:
    source = broken(good, tmp_path)
    damage(source)
    assert main([str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr()
    assert named in err.err and err.err.count("\n") == 1 and "Traceback" not in err.err, err.err
    assert "code ran" not in err.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no DST, no staging directory left


def test_an_existing_destination_is_kept_without_force(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert main([str(good), str(tmp_path / "out")]) == 2
    assert "exists (use --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    assert main([str(good), str(tmp_path / "out"), "--force"]) == 0
    assert not (tmp_path / "out" / "mine.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_export_refuses_an_imported_checkpoint_by_name(good: Path, tmp_path: Path) -> None:
    """Until the graphs and the engine run Marian's options (issue 24, parts 2-4), export says so."""
    from nmt.training.checkpoint import CheckpointError, load_checkpoint

    assert main([str(good), str(tmp_path / "ours")]) == 0
    with pytest.raises(CheckpointError, match="imported .*Marian.* not exported yet"):
        load_checkpoint(tmp_path / "ours")


def test_beam_ids_match_generate(marian: tuple[str, Path, Path]) -> None:
    """Beam 4 with the generation config's length penalty, ranked as transformers ranks (part 4: at least
    98% of sentences identical)."""
    from nmt.training.search import beam_search

    name, source, ours = marian
    hf, (model, config) = reference(source), load_imported(ours)
    ids, generation = config["special_ids"], config["generation"]
    source_sp = __import__("sentencepiece").SentencePieceProcessor(model_file=str(source / "source.spm"))
    vocab = json.loads((source / "vocab.json").read_text())
    texts = sentences(50, seed=98)
    if name == "multilingual-relu":
        texts = [f">>{'deu' if i % 2 else 'fra'}<< {t}" for i, t in enumerate(texts)]
    sources = [encode(source_sp, vocab, t)[:-1] for t in texts]
    special = SpecialIds(start=ids["decoder_start"], eos=ids["eos"], pad=ids["pad"], never=(ids["pad"],))
    found = beam_search(
        model,
        sources,
        beam_size=generation["num_beams"],
        alpha=generation["length_penalty"],
        max_len_extra=40,
        repetition_guard=False,
        special=special,
        ranking="transformers",
    )
    same = 0
    for src, hyps in zip(sources, found):
        row = torch.tensor([src + [ids["eos"]]])
        with torch.no_grad():
            want = hf.generate(
                row,
                attention_mask=row != ids["pad"],
                num_beams=generation["num_beams"],
                do_sample=False,
                max_length=1 + len(src) + 40,
            )[0].tolist()
        same += hyps[0].tokens == [t for t in want[1:] if t != ids["eos"] and t != ids["pad"]]
    assert same >= 0.98 * len(sources), f"{same} of {len(sources)} identical"
