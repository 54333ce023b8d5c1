"""bench/ct2.py: our checkpoint converted to CTranslate2 computes what the torch model computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ctranslate2 = pytest.importorskip("ctranslate2")

from nmt.bench.ct2 import convert_checkpoint, vocabulary  # noqa: E402
from nmt.bench.engines import CT2Engine, SearchSettings  # noqa: E402
from nmt.training.checkpoint import CheckpointMeta, load_checkpoint, write_checkpoint  # noqa: E402
from nmt.training.data import multi30k  # noqa: E402
from nmt.training.model import ModelConfig, Transformer  # noqa: E402
from nmt.training.search import beam_search, greedy_search, pad_batch  # noqa: E402
from nmt.training.tokenizer import BOS_ID, EOS_ID, Tokenizer  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "default"
N_SENTENCES = 20


@pytest.fixture(scope="module")
def tiny_checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model (2+3 layers, d_model 32, vocab 600) with a tokenizer trained on Multi30k lines."""
    root = tmp_path_factory.mktemp("ct2_tiny")
    corpus = multi30k("train", "en", "de", data_dir)
    Tokenizer.train(corpus.src[:300] + corpus.tgt[:300], root / "spm.model", vocab_size=600)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=600, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=3, dropout=0.0
    )
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a mix-up between them shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return write_checkpoint(root / "ckpt", model, root / "spm.model", CheckpointMeta("en", "de"))


@pytest.fixture(scope="module")
def test_sentences(data_dir: Path) -> list[str]:
    return multi30k("test_2016_flickr", "en", "de", data_dir).src[:N_SENTENCES]


def test_vocabulary_keeps_our_ids(tiny_checkpoint: Path) -> None:
    pieces = vocabulary(load_checkpoint(tiny_checkpoint).tokenizer)
    assert (pieces[BOS_ID], pieces[EOS_ID]) == ("<s>", "</s>")
    assert len(pieces) == 600 and len(set(pieces)) == 600


def test_refuses_to_overwrite_and_unknown_quantization(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = convert_checkpoint(tiny_checkpoint, tmp_path / "ct2")
    with pytest.raises(ValueError, match="exists; pass force=True"):
        convert_checkpoint(tiny_checkpoint, out)
    convert_checkpoint(tiny_checkpoint, out, force=True)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        convert_checkpoint(tiny_checkpoint, tmp_path / "other", quantization="int4")


def test_tiny_model_log_probs_match_torch(tiny_checkpoint: Path, test_sentences: list[str], tmp_path: Path) -> None:
    """Teacher-forced log-probabilities of every target token (EOS included), fp32: the whole
    network (embedding scale, positions, post-norm, fused Q/K/V, tied projection) must match."""
    loaded = load_checkpoint(tiny_checkpoint)
    model, pieces = loaded.model.eval(), vocabulary(loaded.tokenizer)
    sources = loaded.tokenizer.encode(test_sentences[:8])
    generator = torch.Generator().manual_seed(1)
    targets = [torch.randint(4, 600, (n,), generator=generator).tolist() for n in (1, 3, 5, 9, 2, 7, 4, 6)]
    translator = ctranslate2.Translator(
        str(convert_checkpoint(tiny_checkpoint, tmp_path / "ct2")), compute_type="float32", intra_threads=1
    )
    scored = translator.score_batch(
        [[pieces[i] for i in s] for s in sources], [[pieces[i] for i in t] for t in targets]
    )
    src, src_mask = pad_batch([s + [EOS_ID] for s in sources])
    tgt_in, _ = pad_batch([[BOS_ID] + t for t in targets])
    with torch.no_grad():
        log_probs = F.log_softmax(model(src, src_mask, tgt_in), dim=-1)  # (B, T, V)
    for row, (target, result) in enumerate(zip(targets, scored)):
        expected = [log_probs[row, t, token].item() for t, token in enumerate(target + [EOS_ID])]
        assert result.tokens == [pieces[i] for i in target] + ["</s>"]
        np.testing.assert_allclose(result.log_probs, expected, atol=1e-4, rtol=0)


@pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(), reason="models/default is not here")
def test_default_model_outputs_identical_to_torch(test_sentences: list[str], tmp_path: Path) -> None:
    """The trained default model on test_2016_flickr: CT2 float32 greedy and beam 4 (with our
    length penalty applied to its finished hypotheses) equal training/search.py on every sentence;
    int8 is reported, not required to be identical."""
    torch.set_num_threads(1)
    loaded = load_checkpoint(DEFAULT_MODEL)
    sources = loaded.tokenizer.encode(test_sentences)
    pieces = vocabulary(loaded.tokenizer)
    greedy = [h.tokens for h in greedy_search(loaded.model, sources)]
    beam = [hyps[0].tokens for hyps in beam_search(loaded.model, sources, 4, 0.6)]
    identical = {}
    for quantization in ("float32", "int8"):
        model_dir = convert_checkpoint(DEFAULT_MODEL, tmp_path / quantization, quantization)
        engine = CT2Engine(quantization, model_dir, quantization, 1, pieces, SearchSettings())
        identical[quantization] = (
            sum(a == b for a, b in zip(engine.translate(sources, 1), greedy)),
            sum(a == b for a, b in zip(engine.translate(sources, 4), beam)),
        )
    print(f"identical to torch out of {len(sources)} (greedy, beam 4): {identical}")
    assert identical["float32"] == (len(sources), len(sources))
    assert min(identical["int8"]) >= len(sources) // 2  # int8 changes some outputs, not most
