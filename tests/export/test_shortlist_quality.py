"""The shortlist's effect on the committed default model, on the parity set (test_2016_flickr, greedy, batches of 64).

The bounds are what export/shortlist.py reports: measured 92.8% of the greedy outputs identical
with and without the shortlist, BLEU 38.49 -> 38.44; at most 8% may change, and BLEU by at most
0.3 (the int8 variant's allowed loss).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sacrebleu

from nmt.engine.decoding import DecodeOptions, Decoder
from nmt.engine.runtime import RuntimeConfig, load_sessions
from nmt.export.export import ExportOptions, export_checkpoint
from nmt.export.validate import BATCH_SIZE, PARITY_SPLIT
from nmt.training.data import multi30k
from nmt.training.tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "default"
MIN_IDENTICAL = 0.92
MAX_BLEU_CHANGE = 0.3


@pytest.fixture(scope="module")
def default_bundle(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("models/default is not in this checkout")
    out = tmp_path_factory.mktemp("default") / "bundle"
    export_checkpoint(
        DEFAULT_MODEL, out, options=ExportOptions(variants=("fp32", "fp32-cpu"), validate=False, data_dir=str(data_dir))
    )
    return out


def _greedy(bundle_dir: Path, shortlist: bool, sources: list[list[int]]) -> list[list[int]]:
    sessions = load_sessions(bundle_dir, RuntimeConfig(device="cpu", intra_op_threads=1, shortlist=shortlist))
    assert (sessions.shortlist is not None) == shortlist
    result = Decoder(sessions, max_batch_rows=BATCH_SIZE).search(sources, DecodeOptions(beam_size=1))
    return [hyps[0].tokens for hyps in result.hypotheses]


def test_the_shortlist_changes_few_greedy_outputs_and_no_bleu(default_bundle: Path, data_dir: Path) -> None:
    corpus = multi30k(PARITY_SPLIT, "en", "de", data_dir)
    tokenizer = Tokenizer.load(default_bundle / "spm.model")
    sources = tokenizer.encode(list(corpus.src))
    full, short = _greedy(default_bundle, False, sources), _greedy(default_bundle, True, sources)
    identical = sum(a == b for a, b in zip(full, short)) / len(sources)
    bleu = [sacrebleu.corpus_bleu(tokenizer.decode(out), [list(corpus.tgt)]).score for out in (full, short)]
    print(f"greedy identical {identical:.3f}, BLEU {bleu[0]:.2f} -> {bleu[1]:.2f}")
    assert identical >= MIN_IDENTICAL
    assert abs(bleu[1] - bleu[0]) <= MAX_BLEU_CHANGE
