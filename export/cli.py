"""nmt-export: a training checkpoint -> a model bundle; or verify an existing bundle.

    nmt-export CHECKPOINT OUT [--attention onnx|mha|none] [--force] [--sentences FILE]
    nmt-export --verify BUNDLE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import fuse
from .bundle import BundleError, verify_bundle


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmt-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="training checkpoint directory")
    parser.add_argument("out", nargs="?", help="bundle directory to write")
    parser.add_argument("--verify", metavar="BUNDLE", help="only verify the sha256 of every file in BUNDLE")
    parser.add_argument("--attention", choices=fuse.ATTENTION_FORMS, default=fuse.DEFAULT_FORM,
                        help="attention op (onnx: ONNX Attention-23; mha: ORT MultiHeadAttention; none: unfused)")
    parser.add_argument("--no-optimize", action="store_true", help="skip the ORT-optimized CPU graphs")
    parser.add_argument("--no-validate", action="store_true", help="skip the parity check against torch")
    parser.add_argument("--sentences", type=Path, help="parity source sentences, one a line")
    parser.add_argument("--max-len-extra", type=int, default=20, help="greedy length limit in the parity check")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verify:
        try:
            manifest = verify_bundle(args.verify)
        except BundleError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{args.verify}: {len(manifest['files'])} files verified")
        return 0
    if not (args.checkpoint and args.out):
        parser.error("CHECKPOINT and OUT are required (or --verify BUNDLE)")
    # torch is imported only here, so `--verify` works on a server install.
    from training.checkpoint import CheckpointError

    from .export import ExportOptions, export_checkpoint
    from .validate import ParityError

    try:
        sentences = None
        if args.sentences:
            sentences = tuple(line for line in args.sentences.read_text().splitlines() if line.strip())
        options = ExportOptions(args.attention, not args.no_optimize, not args.no_validate, sentences,
                                args.max_len_extra)
        manifest = export_checkpoint(args.checkpoint, args.out, force=args.force, options=options)
    except (BundleError, CheckpointError, ParityError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"bundle": args.out, "files": sorted(manifest["files"]), "parity": manifest["parity"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
