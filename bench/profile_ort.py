"""Where ONNX Runtime's decoding time goes: kernels, the run() call around them, and Python.

    python -m nmt.bench.profile_ort [--bundles bundles/bench] [--sentences 64] [--threads 2]

For the unfused and fused fp32 bundles and the int8 variant, with and without the vocabulary
shortlist (the bundles `nmt-bench decode` caches), decodes test_2016_flickr sources with the
engine's Decoder (its decoder sessions, the step decoder's when the bundle has one: engine/runtime.py),
in three passes:
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

from .engines import ORT_ENGINES, reopen_cpu_session

# nmt-bench decode's CPU engines: (bundle in its cache, precision, vocabulary shortlist on, step decoder on).
ENGINES = {name: spec for name, spec in ORT_ENGINES.items() if spec[1] != "fp16"}
# Kernels of matrix products (fp32 and the int8 variant's); "If" holds the output head's projection,
# whose Gemm the profiler also lists on its own, so If is left out of every total.
MATRIX_OPS = frozenset(
    {
        "MatMul",
        "Gemm",
        "FusedGemm",
        "FusedMatMul",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
    }
)


class _TimedRun:
    """Forwards to an InferenceSession, adding up the wall time of run() and run_with_iobinding()."""

    def __init__(self, session: ort.InferenceSession):
        self.session, self.seconds = session, 0.0

    def _timed(self, method: str, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return getattr(self.session, method)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("run", *args, **kwargs)

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("run_with_iobinding", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def _sessions(
    bundle: Path,
    precision: str,
    shortlist: bool,
    step: bool,
    threads: int,
    spinning: bool = False,
    profile_prefix: Path | None = None,
):
    """The engine's sessions (with `spinning`), the decoders (the engine's second, single-threaded
    one for small steps too) reopened with ORT's profiler when profile_prefix is given, and
    wrapped to time run()."""
    from nmt.engine.bundle import manifest_variants
    from nmt.engine.runtime import RuntimeConfig, load_sessions

    cfg = RuntimeConfig(
        device="cpu",
        precision=precision,
        intra_op_threads=threads,
        spinning=spinning,
        shortlist=shortlist,
        step_decoder=step,
    )
    sessions = load_sessions(bundle, cfg)
    entry = manifest_variants(sessions.manifest)[sessions.variant]
    found = {}
    for role, key, file in (("decoder", "decoder_small", "decoder"), ("step", "step_small", "step_decoder")):
        session, small = getattr(sessions, role), getattr(sessions, key)
        if profile_prefix is not None and session is not None:
            path, prefix = bundle / entry[file], profile_prefix.with_name(f"{profile_prefix.name}-{role}")
            session = reopen_cpu_session(path, threads, spinning, prefix)
            small = small and reopen_cpu_session(path, 1, spinning, prefix.with_name(prefix.name + "-1"))
        found[role], found[key] = session and _TimedRun(session), small and _TimedRun(small)
    return dataclasses.replace(sessions, **found)


def _decoders(sessions) -> list[_TimedRun]:
    """The sessions that run decoder steps (the step decoder's, when the search uses it)."""
    return [s for s in (sessions.decoder, sessions.decoder_small, sessions.step, sessions.step_small) if s]


def _run_seconds(sessions) -> float:
    return sum(s.seconds for s in _decoders(sessions))


def _decode_all(sessions, sources: list[list[int]], batch: int, beam: int) -> dict[str, float]:
    """Search every batch; seconds of the whole search and of its decoder steps, and the steps."""
    from nmt.engine.decoding import DecodeOptions, Decoder

    decoder, options = Decoder(sessions), DecodeOptions(beam_size=beam)
    decoder.search(sources[:batch], options)  # warm-up
    for session in _decoders(sessions):
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


def profile(
    bundle: Path, engine: tuple[str, str, bool, bool], sources: list[list[int]], batch: int, beam: int, threads: int
) -> dict[str, Any]:
    """The three passes of the module docstring for one engine (an ENGINES value), search and batch size."""
    _, precision, shortlist, step = engine
    served = _decode_all(_sessions(bundle, precision, shortlist, step, threads), sources, batch, beam)
    spinning = _decode_all(_sessions(bundle, precision, shortlist, step, threads, spinning=True), sources, batch, beam)
    with tempfile.TemporaryDirectory() as tmp:
        profiled = _sessions(bundle, precision, shortlist, step, threads, profile_prefix=Path(tmp) / "decoder")
        _decode_all(profiled, sources, batch, beam)
        ops: Counter[str] = Counter()
        for session in _decoders(profiled):
            ops += _op_shares(Path(session.session.end_profiling()))
    steps, n = served["steps"], len(sources)
    per_step = lambda s: round(1e3 * s / steps, 3)  # noqa: E731
    return {
        "steps": steps,
        "sentence_ms": round(1e3 * served["total"] / n, 2),
        "step_ms": per_step(served["decode"]),
        "run_ms": per_step(served["run"]),
        "python_ms": per_step(served["decode"] - served["run"]),
        "sentence_ms_spinning": round(1e3 * spinning["total"] / n, 2),
        "ops": ops,
    }


def markdown(rows: list[dict[str, Any]], top: int = 8) -> str:
    lines = [
        "| engine | search | batch | ms/sentence | decoder step ms | in run() | Python around it | "
        "ms/sentence, spinning on | engine's speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = lambda key: f"{r[key]:.2f} ({100 * r[key] / r['step_ms']:.0f}%)"  # noqa: E731
        lines.append(
            f"| {r['engine']} | {r['search']} | {r['batch']} | {r['sentence_ms']:.1f} | {r['step_ms']:.2f} | "
            f"{share('run_ms')} | {share('python_ms')} | {r['sentence_ms_spinning']:.1f} | "
            f"{r['sentence_ms_spinning'] / r['sentence_ms']:.2f}× |"
        )
    lines += [
        "",
        "Decoder kernel time by op type (share of all kernel time, from ORT's profiler; the head's If "
        'left out, its Gemm counted on its own); "outside matrix kernels": every op but '
        f"{', '.join(sorted(MATRIX_OPS))}:",
        "",
        "| engine | search | batch | outside matrix kernels | " + " | ".join(f"op {i + 1}" for i in range(top)) + " |",
        "|---|---|---:|---:|" + "---|" * top,
    ]
    for r in rows:
        ops = Counter({op: t for op, t in r["ops"].items() if op != "If"})
        total = sum(ops.values()) or 1.0
        outside = sum(t for op, t in ops.items() if op not in MATRIX_OPS) / total
        cells = [f"{op} {100 * t / total:.0f}%" for op, t in ops.most_common(top)]
        lines.append(
            f"| {r['engine']} | {r['search']} | {r['batch']} | {100 * outside:.0f}% | "
            + " | ".join(cells + [""] * (top - len(cells)))
            + " |"
        )
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
        for search, beam in (("greedy", 1), ("beam4", 4)):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                found = profile(args.bundles / ENGINES[engine][0], ENGINES[engine], sources, batch, beam, args.threads)
                rows.append({"engine": engine, "search": search, "batch": batch, **found})
                print(f"{engine} {search} b={batch}: {found['sentence_ms']} ms/sentence", flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
