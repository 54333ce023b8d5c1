"""Translate a test set with the torch reference search and score it with sacreBLEU.

    nmt-eval --checkpoint models/default --split test_2016_flickr --beam 4

BLEU is sacreBLEU's default (13a tokenization, cased, detokenized); the lowercased score is
printed too, to compare with papers that report lowercased BLEU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import sacrebleu
import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .data import DataError, multi30k, read_parallel
from .model import Transformer
from .search import beam_search, greedy_search
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class SearchOptions:
    beam_size: int = 4
    alpha: float = 0.6
    max_len_extra: int = 50
    batch_size: int = 64


def translate(
    model: Transformer,
    tokenizer: Tokenizer,
    sentences: list[str],
    options: SearchOptions,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[str]:
    """Translate in batches of similar length; the output order matches the input."""
    encoded = tokenizer.encode(sentences)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[list[int]] = [[] for _ in sentences]
    chunks = [order[i : i + options.batch_size] for i in range(0, len(order), options.batch_size)]
    for chunk in tqdm(chunks, desc="translate", unit="batch", disable=not progress):
        sources = [encoded[i] for i in chunk]
        if options.beam_size == 1:
            best = [h.tokens for h in greedy_search(model, sources, options.max_len_extra, device)]
        else:
            found = beam_search(model, sources, options.beam_size, options.alpha, 1, options.max_len_extra, device)
            best = [hyps[0].tokens for hyps in found]
        for i, tokens in zip(chunk, best):
            outputs[i] = tokens
    return tokenizer.decode(outputs)


def score(hypotheses: list[str], references: list[str]) -> dict:
    bleu = sacrebleu.metrics.BLEU()
    bleu_lc = sacrebleu.metrics.BLEU(lowercase=True)
    chrf = sacrebleu.metrics.CHRF()
    refs = [references]
    return {
        "bleu": round(bleu.corpus_score(hypotheses, refs).score, 2),
        "bleu_lowercase": round(bleu_lc.corpus_score(hypotheses, refs).score, 2),
        "chrf": round(chrf.corpus_score(hypotheses, refs).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "bleu_lowercase_signature": str(bleu_lc.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nmt-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. models/default)")
    parser.add_argument("--split", default="test_2016_flickr", help="Multi30k split (default: test_2016_flickr)")
    parser.add_argument("--data-dir", help="Multi30k directory (default: $NMT_DATA_DIR, else download)")
    parser.add_argument("--src", help="plain-text source file instead of a Multi30k split")
    parser.add_argument("--ref", help="plain-text reference file (with --src)")
    parser.add_argument("--beam", type=int, help="beam size; 1 = greedy (default: the checkpoint's setting)")
    parser.add_argument("--alpha", type=float, help="length penalty alpha (default: the checkpoint's setting)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write the translations here, one per line")
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    args = parser.parse_args(argv)
    if bool(args.src) != bool(args.ref):
        parser.error("--src and --ref go together")
    if args.beam is not None and args.beam < 1:
        parser.error(f"--beam must be at least 1, got {args.beam}")
    try:
        checkpoint = load_checkpoint(args.checkpoint, args.device)
        meta = checkpoint.meta
        if args.src:
            corpus = read_parallel(args.src, args.ref)
        else:
            corpus = multi30k(args.split, meta.src_lang, meta.tgt_lang, args.data_dir)
    except (DataError, ValueError) as e:
        print(f"nmt-eval: error: {e}", file=sys.stderr)
        return 2
    stored = checkpoint.inference
    args.beam = stored.beam_size if args.beam is None else args.beam
    args.alpha = stored.length_penalty if args.alpha is None else args.alpha
    options = SearchOptions(args.beam, args.alpha, stored.max_len_extra, batch_size=args.batch_size)
    start = time.perf_counter()
    hypotheses = translate(checkpoint.model, checkpoint.tokenizer, corpus.src, options, args.device, progress=True)
    result = score(hypotheses, corpus.tgt)
    result.update(
        split=args.src or args.split,
        sentences=len(corpus),
        beam=args.beam,
        alpha=args.alpha,
        seconds=round(time.perf_counter() - start, 1),
    )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hypotheses)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['split']} ({meta.src_lang}->{meta.tgt_lang}, beam {args.beam}, alpha {args.alpha}):")
        print(f"  BLEU            {result['bleu']:6.2f}  {result['bleu_signature']}")
        print(f"  BLEU lowercased {result['bleu_lowercase']:6.2f}  {result['bleu_lowercase_signature']}")
        print(f"  chrF            {result['chrf']:6.2f}  {result['chrf_signature']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
