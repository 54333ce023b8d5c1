"""nmt-export: a training checkpoint -> a model bundle; or verify an existing bundle.

nmt-export CHECKPOINT OUT [--variants fp32-cpu,int8-cpu,fp16-cuda | --no-optimize]
           [--attention onnx|mha|none] [--data-dir DIR] [--parity-limit N] [--quiet] [--force]
           [--no-shortlist | --shortlist-corpus SRC TGT]
nmt-export --verify BUNDLE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nmt.engine.bundle import BundleError, verify_bundle

from . import fuse
from .variants import FP32, VARIANTS, parse_variants

if TYPE_CHECKING:
    from .export import ExportOptions


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmt-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="training checkpoint directory")
    parser.add_argument("out", nargs="?", help="bundle directory to write")
    parser.add_argument("--verify", metavar="BUNDLE", help="only verify the sha256 of every file in BUNDLE")
    parser.add_argument(
        "--attention",
        choices=fuse.ATTENTION_FORMS,
        default=fuse.DEFAULT_FORM,
        help="attention op (onnx: ONNX Attention-23; mha: ORT MultiHeadAttention; none: unfused)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--variants",
        default="all",
        metavar="LIST",
        help=f"comma-separated variants to write besides fp32 ({', '.join(VARIANTS[1:])}); default: all",
    )
    which.add_argument("--no-optimize", action="store_true", help="write only the portable fp32 graphs")
    parser.add_argument("--no-validate", action="store_true", help="skip the parity checks")
    parser.add_argument("--sentences", type=Path, help="parity source sentences, one a line (no BLEU)")
    parser.add_argument(
        "--data-dir",
        help="Multi30k directory: parity on test_2016_flickr (default: $NMT_DATA_DIR; "
        "without one, a few built-in sentences)",
    )
    parser.add_argument("--parity-limit", type=int, metavar="N", help="check only the first N parity sentences")
    parser.add_argument("--max-len-extra", type=int, default=50, help="greedy length limit in the parity check")
    shortlist = parser.add_mutually_exclusive_group()
    shortlist.add_argument("--no-shortlist", action="store_true", help="write no vocabulary shortlist")
    shortlist.add_argument(
        "--shortlist-corpus",
        nargs=2,
        metavar=("SRC", "TGT"),
        help="parallel text for the vocabulary shortlist (default: Multi30k train in --data-dir)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    return parser


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    """The parsed flags as ExportOptions (ValueError for bad values)."""
    from .export import ExportOptions

    sentences = None
    if args.sentences:
        sentences = tuple(line for line in args.sentences.read_text().splitlines() if line.strip())
    variants = (FP32,) if args.no_optimize else parse_variants(args.variants)
    return ExportOptions(
        attention=args.attention,
        variants=variants,
        validate=not args.no_validate,
        sentences=sentences,
        data_dir=args.data_dir,
        parity_limit=args.parity_limit,
        max_len_extra=args.max_len_extra,
        progress=not args.quiet,
        shortlist=not args.no_shortlist,
        shortlist_corpus=tuple(args.shortlist_corpus) if args.shortlist_corpus else None,
    )


def _verify(bundle_dir: str) -> int:
    try:
        manifest = verify_bundle(bundle_dir)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{bundle_dir}: {len(manifest['files'])} files verified")
    return 0


def _summary(out: str, manifest: dict) -> dict:
    """What the CLI prints: files with sizes, variants, and the parity verdicts."""
    parity = {k: v for k, v in manifest["parity"].items() if k != "variants"}
    verdicts = {name: entry.get("validated") for name, entry in manifest["variants"].items()}
    sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
    return {"bundle": out, "files": sizes, "parity": parity, "variants": verdicts}


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.verify:
        return _verify(args.verify)
    if not (args.checkpoint and args.out):
        cli.error("CHECKPOINT and OUT are required (or --verify BUNDLE)")
    # torch is imported only here, so `--verify` works on a server install.
    from nmt.training.checkpoint import CheckpointError

    from .export import export_checkpoint
    from .validate import ParityError

    try:
        options = options_from_args(args)
        manifest = export_checkpoint(args.checkpoint, args.out, force=args.force, options=options)
    except (BundleError, CheckpointError, ParityError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_summary(args.out, manifest), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
