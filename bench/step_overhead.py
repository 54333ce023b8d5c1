"""Where a decoding step's time goes: the decoder session's run() versus the numpy search around it.

    python -m nmt.bench.step_overhead --bundle BUNDLE [--sentences FILE] [--threads 1] [--batches 1,8,32]

For greedy and beam 4 at each batch size, prints per decoder step: total ms, ms inside the
decoder's run(), ms outside it (numpy bookkeeping: cache row selection, top-k, Python loops), and
run()'s share of the decode time. The encoder is timed apart and not counted. Each configuration
runs --repeat times and the fastest run is reported (the machine may be shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import time
from pathlib import Path
from typing import Any

from nmt.engine.decoding import DecodeOptions, Decoder
from nmt.engine.runtime import RuntimeConfig
from nmt.engine.translator import Translator

DEFAULT_SENTENCES = Path(os.environ.get("NMT_DATA_DIR", "../shared/data/multi30k")) / "test_2016_flickr.en.gz"


class TimedSession:
    """Forwards to an InferenceSession, adding up the seconds spent in run()/run_with_iobinding()."""

    def __init__(self, session: Any):
        self.session, self.seconds, self.calls = session, 0.0, 0

    def _timed(self, method: str, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return getattr(self.session, method)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("run", *args, **kwargs)

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("run_with_iobinding", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def read_sentences(path: Path, limit: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line, _ in zip(f, range(limit))]


def measure(translator: Translator, sources: list[list[int]], batch: int, options: DecodeOptions) -> dict[str, float]:
    """Decode `sources` in batches of `batch` sentences once; per-step times in ms."""
    sessions = translator.sessions
    timed = [TimedSession(s) if s is not None else None for s in (sessions.decoder, sessions.decoder_small)]
    decoder = Decoder(dataclasses.replace(sessions, decoder=timed[0], decoder_small=timed[1]))
    decode = encode = 0.0
    steps = 0
    for start in range(0, len(sources), batch):
        result = decoder.search(sources[start : start + batch], options)
        decode, encode, steps = decode + result.decode_seconds, encode + result.encode_seconds, steps + result.steps
    run = sum(t.seconds for t in timed if t is not None)  # both decoder sessions (engine/runtime.py)
    return {
        "step_ms": 1e3 * decode / steps,
        "run_ms": 1e3 * run / steps,
        "other_ms": 1e3 * (decode - run) / steps,
        "run_share": run / decode,
        "encode_ms_per_batch": 1e3 * encode / -(-len(sources) // batch),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nmt.bench.step_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--sentences", type=Path, default=DEFAULT_SENTENCES, help="one source a line (.gz ok)")
    parser.add_argument("--count", type=int, default=64, help="sentences per configuration")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the fastest is reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)
    translator = Translator.from_bundle(args.bundle, RuntimeConfig(args.device, args.precision, args.threads))
    sources = translator.tokenize(read_sentences(args.sentences, args.count))
    print(
        f"bundle {args.bundle}, variant {translator.info.precision} on {translator.info.provider}, "
        f"{args.threads} thread(s), {len(sources)} sentences"
    )
    print("| search | batch | step ms | run() ms | other ms | run() share | encode ms/batch | steps |")
    print("|--------|-------|---------|----------|----------|-------------|-----------------|-------|")
    for name, options in (("greedy", DecodeOptions(beam_size=1)), ("beam 4", DecodeOptions(beam_size=4))):
        for batch in (int(b) for b in args.batches.split(",")):
            m = min(
                (measure(translator, sources, batch, options) for _ in range(args.repeat)), key=lambda r: r["step_ms"]
            )
            print(
                f"| {name} | {batch} | {m['step_ms']:.2f} | {m['run_ms']:.2f} | {m['other_ms']:.3f} | "
                f"{100 * m['run_share']:.1f}% | {m['encode_ms_per_batch']:.1f} | {m['steps']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
