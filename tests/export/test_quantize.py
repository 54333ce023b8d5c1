"""export/quantize.py: the static int8 (QDQ) experiment runs end to end on a bundle."""

from __future__ import annotations

from pathlib import Path

import onnx

from nmt.engine import bundle
from nmt.export.fuse import op_counts
from nmt.export.quantize import compare, quantize_pair
from nmt.training.data import multi30k
from nmt.training.tokenizer import Tokenizer


def test_calibrated_qdq_graphs_load_and_decode(bundle_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(bundle_dir / bundle.TOKENIZER)
    train = multi30k("train", "en", "de", data_dir)
    quantize_pair(bundle_dir, tmp_path, tokenizer.encode(list(train.src[:20])), tokenizer.encode(list(train.tgt[:20])))
    for role in ("encoder", "decoder"):
        counts = op_counts(onnx.load(str(tmp_path / f"{role}.qdq.onnx")))
        assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    test = multi30k("test_2016_flickr", "en", "de", data_dir)
    pairs = {
        "fp32-cpu": (bundle_dir / bundle.ENCODER_CPU, bundle_dir / bundle.DECODER_CPU),
        "qdq": (tmp_path / "encoder.qdq.onnx", tmp_path / "decoder.qdq.onnx"),
    }
    found = compare(pairs, tokenizer.encode(list(test.src[:8])), list(test.tgt[:8]), tokenizer, batch=4)
    assert set(found) == set(pairs) and all(row["ms_per_sentence"] > 0 for row in found.values())
