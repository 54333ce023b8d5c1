"""Choose the inference settings (beam size, length penalty) on the validation set.

    python -m nmt.training.tune_inference --checkpoint runs/default/final --beams 1,4,5 --alphas 0.6,1.0 --write

Translates the validation split with every combination (the torch reference search), prints a
table of sacreBLEU scores, and with --write stores the best combination in the checkpoint's
config.json, where nmt-eval, the exporter (and so nmt-translate and the server) read it.
Ties go to the smaller beam (faster), then the smaller alpha.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .checkpoint import CheckpointError, InferenceSettings, load_checkpoint, update_inference
from .data import DataError, multi30k
from .evaluate import SearchOptions, score, translate


def sweep(checkpoint, corpus, beams: list[int], alphas: list[float]) -> list[dict]:
    rows = []
    for beam in beams:
        for alpha in alphas if beam > 1 else alphas[:1]:  # greedy ignores alpha
            start = time.perf_counter()
            options = SearchOptions(beam, alpha, checkpoint.inference.max_len_extra, batch_size=128)
            hypotheses = translate(checkpoint.model, checkpoint.tokenizer, corpus.src, options)
            result = score(hypotheses, corpus.tgt)
            rows.append(
                {
                    "beam": beam,
                    "alpha": alpha,
                    "bleu": result["bleu"],
                    "chrf": result["chrf"],
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(
                f"beam {beam:2d}  alpha {alpha:4.2f}  BLEU {result['bleu']:6.2f}  chrF {result['chrf']:6.2f}",
                flush=True,
            )
    return rows


def best_of(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (r["bleu"], -r["beam"], -r["alpha"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nmt.training.tune_inference", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="val", help="tuning split (never a test set)")
    parser.add_argument("--data-dir", help="Multi30k directory (default: $NMT_DATA_DIR, else download)")
    parser.add_argument("--beams", default="1,4,5", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--alphas", default="0.6,1.0", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--write", action="store_true", help="store the best settings in the checkpoint")
    parser.add_argument("--json", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.split.startswith("test"):
        parser.error("tune on a validation split, not a test set")
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        corpus = multi30k(args.split, checkpoint.meta.src_lang, checkpoint.meta.tgt_lang, args.data_dir)
        for beam, alpha in ((b, a) for b in args.beams for a in args.alphas):
            InferenceSettings(beam, alpha)  # validates before the long part
    except (CheckpointError, DataError, ValueError) as e:
        print(f"tune_inference: error: {e}", file=sys.stderr)
        return 2
    rows = sweep(checkpoint, corpus, args.beams, args.alphas)
    best = best_of(rows)
    print(f"best on {args.split}: beam {best['beam']}, alpha {best['alpha']} (BLEU {best['bleu']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"split": args.split, "rows": rows, "best": best}, f, indent=2)
    if args.write:
        inference = dataclasses.replace(checkpoint.inference, beam_size=best["beam"], length_penalty=best["alpha"])
        update_inference(
            checkpoint.directory, inference, inference_tuned_on=args.split, inference_valid_bleu=best["bleu"]
        )
        print(f"stored in {checkpoint.directory / 'config.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
