"""Where ONNX Runtime's decoding time goes: kernels, the run() call around them, and Python.

    python -m nmt.bench.profile_ort [--bundles bundles/bench] [--sentences 64] [--threads 2]

For the unfused and fused fp32 bundles and the int8 variant, with and without the vocabulary
shortlist (the bundles `nmt-bench decode` caches), decodes test_2016_flickr sources with the
engine's Decoder (both its decoder sessions: engine/runtime.py), in three passes:
1. the sessions exactly as nmt.engine.runtime opens them: search time per sentence, and each
   decoder step split into the decoder's InferenceSession.run() (kernels, feeding numpy inputs,
   returning outputs) and the Python search around it (top-k, bookkeeping, KV row selection);
2. the same sessions with intra-op thread spinning on (session.intra_op.allow_spinning=1, ORT's
   default, which the engine turns off): search time per sentence again;
3. the decoder reopened with ORT's profiler on (enable_profiling): its kernel time by op type.
   The profiler adds time to every node (small kernels the most), so only shares are used.
Prints markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .engines import reopen_cpu_session

# (bundle in nmt-bench decode's cache, precision, vocabulary shortlist on): as bench/decode.py's engines.
ENGINES = {"ort-fp32-unfused": ("unfused", "fp32", False), "ort-fp32": ("fused", "fp32", False),
           "ort-fp32-shortlist": ("fused", "fp32", True), "ort-int8": ("fused", "int8", False),
           "ort-int8-shortlist": ("fused", "int8", True)}


class _TimedRun:
    """Forwards to an InferenceSession, adding up the wall time of run()."""

    def __init__(self, session: ort.InferenceSession):
        self.session, self.seconds = session, 0.0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def _sessions(bundle: Path, precision: str, shortlist: bool, threads: int, spinning: bool = False,
              profile_prefix: Path | None = None):
    """The engine's sessions (with `spinning`), the decoders (the engine's second, single-threaded
    one for small steps too) reopened with ORT's profiler when profile_prefix is given, and
    wrapped to time run()."""
    from nmt.engine.bundle import manifest_variants
    from nmt.engine.runtime import RuntimeConfig, load_sessions

    cfg = RuntimeConfig(device="cpu", precision=precision, intra_op_threads=threads, spinning=spinning,
                        shortlist=shortlist)
    sessions = load_sessions(bundle, cfg)
    decoder, small = sessions.decoder, sessions.decoder_small
    if profile_prefix is not None:
        path = bundle / manifest_variants(sessions.manifest)[sessions.variant]["decoder"]
        decoder = reopen_cpu_session(path, threads, spinning, profile_prefix)
        small = small and reopen_cpu_session(path, 1, spinning, profile_prefix.with_name(profile_prefix.name + "-1"))
    return dataclasses.replace(sessions, decoder=_TimedRun(decoder), decoder_small=small and _TimedRun(small))


def _run_seconds(sessions) -> float:
    return sum(s.seconds for s in (sessions.decoder, sessions.decoder_small) if s is not None)


def _decode_all(sessions, sources: list[list[int]], batch: int, beam: int) -> dict[str, float]:
    """Search every batch; seconds of the whole search and of its decoder steps, and the steps."""
    from nmt.engine.decoding import DecodeOptions, Decoder

    decoder, options = Decoder(sessions), DecodeOptions(beam_size=beam)
    decoder.search(sources[:batch], options)  # warm-up
    for session in (sessions.decoder, sessions.decoder_small):
        if session is not None:
            session.seconds = 0.0
    total = decode = 0.0
    steps = 0
    for start in range(0, len(sources), batch):
        began = time.perf_counter()
        result = decoder.search(sources[start : start + batch], options)
        total += time.perf_counter() - began
        decode, steps = decode + result.decode_seconds, steps + result.steps
    return {"total": total, "decode": decode, "run": _run_seconds(sessions), "steps": steps}


def _op_shares(profile: Path) -> Counter[str]:
    """Kernel seconds per op type from ORT's profile JSON."""
    ops: Counter[str] = Counter()
    for e in json.loads(profile.read_text()):
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            ops[e.get("args", {}).get("op_name", "?")] += e["dur"] / 1e6
    return ops


def profile(bundle: Path, precision: str, shortlist: bool, sources: list[list[int]], batch: int, beam: int,
            threads: int) -> dict[str, Any]:
    """The three passes of the module docstring for one engine, search and batch size."""
    served = _decode_all(_sessions(bundle, precision, shortlist, threads), sources, batch, beam)
    spinning = _decode_all(_sessions(bundle, precision, shortlist, threads, spinning=True), sources, batch, beam)
    with tempfile.TemporaryDirectory() as tmp:
        profiled = _sessions(bundle, precision, shortlist, threads, profile_prefix=Path(tmp) / "decoder")
        _decode_all(profiled, sources, batch, beam)
        ops = _op_shares(Path(profiled.decoder.session.end_profiling()))
        if profiled.decoder_small is not None:
            ops += _op_shares(Path(profiled.decoder_small.session.end_profiling()))
    steps, n = served["steps"], len(sources)
    per_step = lambda s: round(1e3 * s / steps, 3)  # noqa: E731
    return {"steps": steps, "sentence_ms": round(1e3 * served["total"] / n, 2), "step_ms": per_step(served["decode"]),
            "run_ms": per_step(served["run"]), "python_ms": per_step(served["decode"] - served["run"]),
            "sentence_ms_spinning": round(1e3 * spinning["total"] / n, 2), "ops": ops}


def markdown(rows: list[dict[str, Any]], top: int = 8) -> str:
    lines = ["| engine | search | batch | ms/sentence | decoder step ms | in run() | Python around it | "
             "ms/sentence, spinning on | engine's speed-up |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = lambda key: f"{r[key]:.2f} ({100 * r[key] / r['step_ms']:.0f}%)"  # noqa: E731
        lines.append(f"| {r['engine']} | {r['search']} | {r['batch']} | {r['sentence_ms']:.1f} | {r['step_ms']:.2f} | "
                     f"{share('run_ms')} | {share('python_ms')} | {r['sentence_ms_spinning']:.1f} | "
                     f"{r['sentence_ms_spinning'] / r['sentence_ms']:.2f}× |")
    lines += ["", "Decoder kernel time by op type (share of all kernel time, from ORT's profiler):", "",
              "| engine | search | batch | " + " | ".join(f"op {i + 1}" for i in range(top)) + " |",
              "|---|---|---:|" + "---|" * top]
    for r in rows:
        total = sum(r["ops"].values()) or 1.0
        cells = [f"{op} {100 * t / total:.0f}%" for op, t in r["ops"].most_common(top)]
        lines.append(f"| {r['engine']} | {r['search']} | {r['batch']} | " + " | ".join(cells + [""] * (top - len(cells))) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from nmt.training.data import multi30k
    from nmt.training.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="python -m nmt.bench.profile_ort", description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=Path, default=Path("bundles/bench"), help="nmt-bench decode's cache dir")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.load(args.bundles / "fused" / "spm.model")
    sources = tokenizer.encode(multi30k("test_2016_flickr", "en", "de", args.data_dir).src[: args.sentences])
    rows = []
    for engine in args.engines.split(","):
        kind, precision, shortlist = ENGINES[engine]
        for search, beam in (("greedy", 1), ("beam4", 4)):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                found = profile(args.bundles / kind, precision, shortlist, sources, batch, beam, args.threads)
                rows.append({"engine": engine, "search": search, "batch": batch, **found})
                print(f"{engine} {search} b={batch}: {found['sentence_ms']} ms/sentence", flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
