"""nmt-translate: translate stdin to stdout with a model bundle, in batches, in order.

    nmt-translate --bundle DIR [--beam 4] [--length-penalty 0.6] [--max-len-extra 50]
                  [--n-best 1] [--batch-size 32] [--device cpu|cuda|auto]
                  [--precision auto|fp32|int8|fp16] [--threads 0] [--shortlist] [--quiet]
                  [--no-split-sentences] [--no-normalize-case] [--no-protect-spans]

One translation per input line: the line's sentences are translated and joined back (engine/text.py). With --n-best N > 1, N lines per input:
`INDEX<TAB>NORMALIZED_SCORE<TAB>TRANSLATION` (INDEX counts input lines from 0).
A progress bar goes to stderr when it is a terminal (never with --quiet).
Exit codes: 0 done, 2 bad arguments or a bundle that cannot be loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

from nmt.engine.decoding import DecodeOptions
from nmt.engine.runtime import DEVICES, PRECISIONS, RuntimeConfig
from nmt.engine.text import TextOptions
from nmt.engine.translator import Translation, Translator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmt-translate", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="model bundle directory (from nmt-export)")
    parser.add_argument("--beam", type=int, help="beam size; 1 = greedy (default: the bundle's setting)")
    parser.add_argument("--length-penalty", type=float, help="GNMT length penalty alpha (default: the bundle's)")
    parser.add_argument(
        "--max-len-extra", type=int, help="output may be this many tokens longer than the input (default: the bundle's)"
    )
    parser.add_argument("--n-best", type=int, default=1, help="translations per input line")
    parser.add_argument("--batch-size", type=int, default=32, help="input lines per search call")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
    parser.add_argument(
        "--shortlist",
        action="store_true",
        help="score only the bundle's vocabulary shortlist per batch (faster; outputs may differ "
        "from the torch reference and depend on the batch)",
    )
    parser.add_argument(
        "--no-split-sentences",
        action="store_true",
        help="translate each line as one sentence (default: split it, join the translations back)",
    )
    parser.add_argument(
        "--no-normalize-case", action="store_true", help="give ALL CAPS and Title Case lines to the model as they are"
    )
    parser.add_argument(
        "--no-protect-spans",
        action="store_true",
        help="let the model translate URLs, e-mail addresses, handles, paths and numbers",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no log lines")
    return parser


def batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(lines)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def format_output(index: int, translations: list[Translation], n_best: int) -> str:
    if n_best == 1:
        return translations[0].text
    return "\n".join(f"{index}\t{t.normalized_score:.4f}\t{t.text}" for t in translations)


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def translate_stream(
    translator: Translator,
    options: DecodeOptions,
    source: TextIO,
    out: TextIO,
    batch_size: int,
    progress: bool,
    text_options: TextOptions = TextOptions(),
) -> int:
    """Translate every line of `source` to `out` (flushed per batch); returns the number of lines."""
    done = 0
    lines = (line.rstrip("\r\n") for line in source)
    with tqdm(unit="line", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in batches(lines, batch_size):
            for translations in translator.translate(batch, options, text_options):
                out.write(format_output(done, translations, options.n_best) + "\n")
                done += 1
            out.flush()
            bar.update(len(batch))
    return done


def command_line_options(args: argparse.Namespace, defaults: DecodeOptions) -> DecodeOptions:
    """The bundle's inference settings, overridden by the flags given."""
    given = {"beam_size": args.beam, "length_penalty": args.length_penalty, "max_len_extra": args.max_len_extra}
    return dataclasses.replace(defaults, n_best=args.n_best, **{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        cfg = RuntimeConfig(args.device, args.precision, args.threads, shortlist=args.shortlist)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="nmt-translate: %(message)s")
    try:
        translator = Translator.from_bundle(args.bundle, cfg)
    except (ValueError, OSError) as e:  # BundleError is a ValueError
        print(f"nmt-translate: error: {one_line(e)}", file=sys.stderr)
        return 2
    try:
        options = command_line_options(args, translator.default_options())
    except ValueError as e:
        parser.error(str(e))
    progress = not args.quiet and sys.stderr.isatty()
    try:
        text_options = TextOptions(not args.no_split_sentences, not args.no_normalize_case, not args.no_protect_spans)
        translate_stream(translator, options, sys.stdin, sys.stdout, args.batch_size, progress, text_options)
    except ValueError as e:  # e.g. a line longer than the model's positions
        print(f"nmt-translate: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
