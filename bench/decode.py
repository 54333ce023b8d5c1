"""`nmt-bench decode`: every decoder side by side on the same weights, in one run.

    nmt-bench decode [--sentences 200] [--engines torch,ort-fp32,...] [--device cpu|cuda] [--out bench/results]

Engines: PyTorch eager with the KV cache (training/search.py), ONNX Runtime through the server's
engine (engine/decoding.py) on an unfused fp32 bundle, the fused fp32 bundle and its int8
variant, each fused one also with the bundle's vocabulary shortlist (engine/shortlist.py), and
CTranslate2 float32 and int8 (bench/ct2.py converts the same checkpoint), each also with that
shortlist as its vocabulary map (vmap.txt: the same ids per batch, so the same outputs). Every
engine gets the same threads (2 by default), the same sources in the same batches, greedy and
beam 4 (length penalty 0.6, at most len(source) + 50 tokens). Batches go through the engines in
turn (the order rotating batch by batch), so load from other processes hits every engine alike.

Measured per engine, search and batch size: target tokens per second (tokens of the best
hypotheses without EOS, over the summed batch latencies), the median (p50) batch latency,
and how many outputs are identical to torch's. Then the encoder alone, as achieved GFLOP/s of
its matrix products against the fp32 matmul peak measured here at the same thread count.
Writes decode.json, decode.md and decode.png into --out.

Bundles are exported from the checkpoint into --cache-dir (git-ignored) when missing or stale;
the CTranslate2 models are converted there on every run (under a second).

--device cuda runs the engines on the GPU (bench/engines.py; default engines: torch, ORT fp32
and fp16 (the bundle's fp32 and fp16-cuda variants), CT2 float32 and float16, and their shortlist
and vmap forms) and refuses to start, in one line, when CUDA is missing here. There is no matmul
peak on cuda (the CPU's sgemm is no yardstick for a GPU): the encoder rows give GFLOP/s alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .engines import (
    ALL_ENGINES,
    CT2_ENGINES,
    CUDA_ENGINES,
    DEVICES,
    ENGINES,
    ONLY_ON,
    ORT_ENGINES,
    CT2Engine,
    Engine,
    OrtEngine,
    SearchSettings,
    TorchEngine,
    cuda_problem,
    default_engines,
    gpu_name,
    wrong_device,
)
from .flops import encoder_flops, first_step_flops, sgemm_peaks

# The variants a bundle must have for an ORT precision (fp32 runs on the fp32 every bundle has).
PRECISION_VARIANT = {"int8": "int8-cpu", "fp16": "fp16-cuda"}
BUNDLE_ATTENTION = {"fused": None, "unfused": "none"}  # None: the exporter's default fused form
DEFAULT_SENTENCES = 200  # ~10 minutes for the whole grid on 2 cores (see README)
ENCODER_ROUNDS = 3  # encoder passes over the sources; each engine's fastest counts
# The CPU features that pick ORT's and CT2's kernels (int8: VNNI; bf16/int8 tiles: AMX).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
SETTLE_SECONDS = 0.005  # idle gap before each timed call: spinning worker threads of the last engine go quiet


@dataclass(frozen=True)
class DecodeBenchConfig:
    checkpoint: Path = Path("models/default")
    data_dir: Path | None = None  # None: $NMT_DATA_DIR, else the verified download cache
    split: str = "test_2016_flickr"
    sentences: int = DEFAULT_SENTENCES
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    modes: tuple[str, ...] = ("greedy", "beam")
    engines: tuple[str, ...] | None = None  # None: default_engines(device)
    device: str = "cpu"  # cpu | cuda
    threads: int = 2
    settings: SearchSettings = field(default_factory=SearchSettings)
    cache_dir: Path = Path("bundles/bench")
    out: Path = Path("bench/results")
    force: bool = False
    parity: bool = True  # the exporter's parity check when a bundle is (re)built
    ort_spinning: bool = False  # True: an experiment, ORT sessions with intra-op spinning on
    sgemm_size: int = 2048  # square matrices for the matmul peak

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.engines is None:
            object.__setattr__(self, "engines", default_engines(self.device))
        unknown = [e for e in self.engines if e not in ALL_ENGINES]
        if unknown or not self.engines:
            raise ValueError(
                f"unknown engines: {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_ENGINES)}"
            )
        if wrong := wrong_device(self.engines, self.device):
            raise ValueError(
                f"engines not for device {self.device}: " + ", ".join(f"{e} ({ONLY_ON[e]} only)" for e in wrong)
            )
        bad_modes = [m for m in self.modes if m not in ("greedy", "beam")]
        if bad_modes or not self.modes:
            raise ValueError(f"unknown modes: {', '.join(bad_modes) or '(none given)'}; choose from greedy, beam")
        for name in ("sentences", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be at least 1, got {list(self.batch_sizes)}")
        if self.settings.beam_size < 2:
            raise ValueError(f"beam size must be at least 2, got {self.settings.beam_size}")

    def mode_beams(self) -> dict[str, int]:
        beams = {"greedy": 1, "beam": self.settings.beam_size}
        return {f"beam{beams[m]}" if m == "beam" else m: beams[m] for m in self.modes}


def load_sources(cfg: DecodeBenchConfig, tokenizer, src_lang: str, tgt_lang: str) -> tuple[list[list[int]], int]:
    """An evenly spaced subsample of the split's sources, in corpus order; and the split's size."""
    from nmt.training.data import multi30k

    lines = multi30k(cfg.split, src_lang, tgt_lang, cfg.data_dir).src
    count = min(cfg.sentences, len(lines))
    picks = np.unique(np.linspace(0, len(lines) - 1, count).round().astype(int))
    return tokenizer.encode([lines[i] for i in picks]), len(lines)


def _bundle_is_current(out: Path, digest: str, attention: str | None, need: tuple[str, ...]) -> bool:
    from nmt.engine.bundle import BUNDLE_FORMAT_VERSION, TOP_IDS, BundleError, shortlist_file, verify_bundle

    try:
        manifest = verify_bundle(out)
    except BundleError:
        return False
    outputs = manifest.get("interface", {}).get("decoder", {}).get("outputs", {})
    return (
        manifest.get("source_checkpoint", {}).get("sha256") == digest
        and manifest.get("format_version") == BUNDLE_FORMAT_VERSION
        and TOP_IDS in outputs
        and shortlist_file(manifest) is not None
        and (manifest.get("attention") == attention if attention else manifest.get("attention") != "none")
        and all(name in manifest.get("variants", {}) for name in need)
    )


def ensure_bundle(
    checkpoint: Path,
    out: Path,
    attention: str | None,
    need: tuple[str, ...] = (),
    parity: bool = True,
    data_dir: Path | None = None,
) -> Path:
    """Export `checkpoint` to `out` (with its shortlist, from Multi30k train in `data_dir`; every
    variant, so int8-cpu and fp16-cuda too) unless a verified bundle of the same weights with the
    variants `need` is there."""
    from nmt.engine import bundle
    from nmt.export.export import ExportOptions, export_checkpoint
    from nmt.training.checkpoint import CONFIG, WEIGHTS, read_config

    digest = bundle.directory_digest(checkpoint, [WEIGHTS, CONFIG, read_config(checkpoint)["tokenizer"]])
    if not out.exists() or not _bundle_is_current(out, digest, attention, need):
        print(f"exporting {checkpoint} -> {out} (attention {attention or 'default'})", file=sys.stderr)
        options = ExportOptions(
            validate=parity, data_dir=data_dir, **({} if attention is None else {"attention": attention})
        )
        export_checkpoint(checkpoint, out, force=True, options=options)
    return out


def needed_variants(engines: tuple[str, ...], kind: str) -> tuple[str, ...]:
    """The variants the ORT engines among `engines` need in the `kind` bundle, beyond fp32."""
    precisions = {ORT_ENGINES[e][1] for e in engines if e in ORT_ENGINES and ORT_ENGINES[e][0] == kind}
    return tuple(sorted(PRECISION_VARIANT[p] for p in precisions if p in PRECISION_VARIANT))


class _EngineFactory:
    """Builds each engine on demand; the bundles it needs are exported once."""

    def __init__(self, cfg: DecodeBenchConfig, loaded):
        self.cfg, self.loaded, self.bundles = cfg, loaded, {}

    def bundle(self, kind: str) -> Path:
        if kind not in self.bundles:
            need = needed_variants(self.cfg.engines, kind)
            self.bundles[kind] = ensure_bundle(
                self.cfg.checkpoint,
                self.cfg.cache_dir / kind,
                BUNDLE_ATTENTION[kind],
                need,
                self.cfg.parity,
                self.cfg.data_dir,
            )
        return self.bundles[kind]

    def build(self, name: str) -> tuple[Engine, str]:
        """(engine, what it runs: the bundle variant, the CT2 compute type or "eager")."""
        from . import ct2

        cfg = self.cfg
        if name == "torch":
            return TorchEngine(self.loaded.model, cfg.settings, device=cfg.device), "eager" + (
                " on cuda" if cfg.device == "cuda" else ""
            )
        if name in ORT_ENGINES:
            kind, precision, shortlist, step = ORT_ENGINES[name]
            engine = OrtEngine(
                name,
                self.bundle(kind),
                precision,
                cfg.threads,
                cfg.settings,
                cfg.ort_spinning,
                shortlist,
                device=cfg.device,
                step_decoder=step,
            )
            return engine, engine.variant
        quantization, vmap = CT2_ENGINES[name]
        pieces = ct2.vocabulary(self.loaded.tokenizer)
        vmap_file = ct2.write_vmap(self.bundle("fused"), pieces, cfg.cache_dir / "vmap.txt") if vmap else None
        model_dir = ct2.convert_checkpoint(
            cfg.checkpoint, cfg.cache_dir / name, quantization, force=True, vmap=vmap_file
        )
        engine = CT2Engine(
            name, model_dir, quantization, cfg.threads, pieces, cfg.settings, use_vmap=vmap, device=cfg.device
        )
        return engine, quantization + (" on cuda" if cfg.device == "cuda" else "") + (", vmap" if vmap else "")


def build_engines(cfg: DecodeBenchConfig, loaded) -> tuple[list[Engine], dict[str, str], dict[str, str]]:
    """The engines asked for; those that cannot run here are skipped with the reason."""
    factory = _EngineFactory(cfg, loaded)
    engines: list[Engine] = []
    skipped: dict[str, str] = {}
    variants: dict[str, str] = {}
    for name in cfg.engines:
        try:
            engine, variants[name] = factory.build(name)
            engines.append(engine)
        except (ImportError, ValueError, RuntimeError, OSError) as e:
            skipped[name] = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"warning: skipping {name}: {skipped[name]}", file=sys.stderr)
    return engines, skipped, variants


def _batches(sources: list[list[int]], size: int) -> list[list[list[int]]]:
    return [sources[i : i + size] for i in range(0, len(sources), size)]


def _timed(engine: Engine, call: str, batch: list[list[int]], *args: Any) -> tuple[float, Any]:
    time.sleep(SETTLE_SECONDS)
    start = time.perf_counter()
    result = getattr(engine, call)(batch, *args)
    return time.perf_counter() - start, result


def _interleaved(
    engines: list[Engine], batches: list[list[list[int]]], call: str, *args: Any, progress=None
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Each batch through every engine, the order rotating; one untimed warm-up batch each."""
    for engine in engines:
        getattr(engine, call)(batches[0], *args)
    times: dict[str, list[float]] = {e.name: [] for e in engines}
    outputs: dict[str, list[Any]] = {e.name: [] for e in engines}
    for i, batch in enumerate(batches):
        for engine in engines[i % len(engines) :] + engines[: i % len(engines)]:
            seconds, result = _timed(engine, call, batch, *args)
            times[engine.name].append(seconds)
            outputs[engine.name].append(result)
        if progress is not None:
            progress.update(1)
    return times, outputs


def run_decode_grid(engines: list[Engine], sources: list[list[int]], cfg: DecodeBenchConfig) -> list[dict[str, Any]]:
    """Tokens/s, p50 latency and identity to torch per engine, search mode and batch size."""
    from tqdm import tqdm

    rows = []
    total = sum(len(_batches(sources, b)) for b in cfg.batch_sizes) * len(cfg.mode_beams())
    with tqdm(total=total, desc="decode", unit="batch", file=sys.stderr) as progress:
        for mode, beam in cfg.mode_beams().items():
            for size in cfg.batch_sizes:
                times, outputs = _interleaved(engines, _batches(sources, size), "translate", beam, progress=progress)
                flat = {name: [hyp for batch in out for hyp in batch] for name, out in outputs.items()}
                reference = flat.get("torch")
                for engine in engines:
                    hyps, seconds = flat[engine.name], sum(times[engine.name])
                    tokens = sum(map(len, hyps))
                    rows.append(
                        {
                            "engine": engine.name,
                            "mode": mode,
                            "batch_size": size,
                            "sentences": len(hyps),
                            "batches": len(times[engine.name]),
                            "tokens": tokens,
                            "seconds": round(seconds, 4),
                            "tokens_per_s": round(tokens / seconds, 1),
                            "p50_ms": round(1000 * statistics.median(times[engine.name]), 3),
                            "identical_to_torch": None
                            if reference is None
                            else sum(a == b for a, b in zip(hyps, reference)),
                        }
                    )
    return rows


def run_encoder(
    engines: list[Engine], sources: list[list[int]], cfg: DecodeBenchConfig, model_cfg, peak: float | None
) -> list[dict[str, Any]]:
    """Encoder-only GFLOP/s per engine and batch size (CT2: encoder plus its first decoder step);
    the fraction of `peak` where there is one (None on cuda)."""
    rows = []
    for size in cfg.batch_sizes:
        batches = _batches(sources, size)
        rounds = [_interleaved(engines, batches, "encode")[0] for _ in range(ENCODER_ROUNDS)]
        seconds_of = {e.name: min(sum(r[e.name]) for r in rounds) for e in engines}  # the least disturbed round
        shapes = [(len(b), max(map(len, b)) + 1) for b in batches]  # + EOS
        flops = sum(encoder_flops(model_cfg, *shape) for shape in shapes)
        step = sum(first_step_flops(model_cfg, *shape) for shape in shapes)
        for engine in engines:
            plus_step = isinstance(engine, CT2Engine)
            total, seconds = flops + (step if plus_step else 0.0), seconds_of[engine.name]
            gflops = total / seconds / 1e9
            rows.append(
                {
                    "engine": engine.name,
                    "batch_size": size,
                    "gflop": round(total / 1e9, 3),
                    "seconds": round(seconds, 4),
                    "gflops_per_s": round(gflops, 2),
                    "fraction_of_peak": None if peak is None else round(gflops / peak, 3),
                    "includes_first_decoder_step": plus_step,
                }
            )
    return rows


class CpuShare:
    """Cores that other processes kept busy while we ran: the shared machine's noise, reported
    with the results (/proc/stat's busy time minus this process's own CPU time)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        stat = Path("/proc/stat")
        if not stat.exists():
            return None
        fields = [float(x) for x in stat.read_text().splitlines()[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait; no guest
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.time(), busy, usage.ru_utime + usage.ru_stime

    def other_cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self.start, end
        return round(max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0), 2)


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    """The host (CPU, its flags, load), versions, and the device measured (on cuda: the GPU's name)."""
    import ctranslate2
    import onnxruntime
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    gpu = (
        {
            "gpu": gpu_name(),
            "onnxruntime_providers": onnxruntime.get_available_providers(),
            "torch_cuda": torch.version.cuda,
        }
        if device == "cuda"
        else {}
    )
    return {
        "device": device,
        **gpu,
        "cpu": model,
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "nice": os.nice(0),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "ctranslate2": ctranslate2.__version__,
            "numpy": np.__version__,
        },
    }


def run(cfg: DecodeBenchConfig) -> dict[str, Any]:
    """The whole benchmark; returns what decode.json holds."""
    import torch

    from nmt.training.checkpoint import load_checkpoint

    torch.set_num_threads(cfg.threads)
    loaded = load_checkpoint(cfg.checkpoint)
    sources, split_size = load_sources(cfg, loaded.tokenizer, loaded.config["src_lang"], loaded.config["tgt_lang"])
    engines, skipped, variants = build_engines(cfg, loaded)
    if not engines:
        raise ValueError("no engine could be built: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    info = machine_info(cfg.threads, cfg.device)
    on_cpu = cfg.device == "cpu"  # the sgemm peak is the CPU's: no yardstick for GPU engines
    peaks = sgemm_peaks(cfg.threads, cfg.sgemm_size) if on_cpu else None
    started, share = time.time(), CpuShare()
    decode_rows = run_decode_grid(engines, sources, cfg)
    if peaks is not None:  # again, at the end: the best of both
        peaks = {**sgemm_peaks(cfg.threads, cfg.sgemm_size, earlier=peaks), "device": "cpu"}
    encoder_rows = run_encoder(engines, sources, cfg, loaded.model.cfg, None if peaks is None else peaks["peak"])
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    info["other_processes_cores"] = share.other_cores()  # average over the whole measurement
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {
        "config": config,
        "split_sentences": split_size,
        "sentences": len(sources),
        "source_tokens": sum(map(len, sources)),
        "engines": [e.name for e in engines],
        "skipped": skipped,
        "variants": variants,
        "machine": info,
        "sgemm_gflops": peaks,
        "seconds": round(time.time() - started, 1),
        "decode": decode_rows,
        "encoder": encoder_rows,
    }


def _parse(argv: list[str] | None) -> DecodeBenchConfig:
    parser = argparse.ArgumentParser(prog="nmt-bench decode", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("models/default"))
    parser.add_argument("--data-dir", type=Path, default=None, help="Multi30k directory (default: $NMT_DATA_DIR)")
    parser.add_argument("--split", default="test_2016_flickr")
    parser.add_argument(
        "--sentences",
        type=int,
        default=DEFAULT_SENTENCES,
        help=f"evenly spaced subsample of the split (default {DEFAULT_SENTENCES}: ~10 min on 2 cores)",
    )
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--modes", default="greedy,beam")
    parser.add_argument(
        "--engines",
        default=None,
        help=f"comma-separated (default on cpu: {','.join(ENGINES)}; on cuda: {','.join(CUDA_ENGINES)})",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the engines run (cuda: ORT's CUDA provider, CT2 and torch on the GPU)",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=0.6)
    parser.add_argument("--max-len-extra", type=int, default=50)
    parser.add_argument("--cache-dir", type=Path, default=Path("bundles/bench"), help="exported bundles, CT2 models")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--sgemm-size", type=int, default=2048, help="matrix size for the matmul peak")
    parser.add_argument(
        "--ort-spinning",
        choices=["on", "off"],
        default="off",
        help="on: ORT sessions with intra-op spinning on (an experiment; the engine always turns "
        "it off, see bench/results/profile.md)",
    )
    parser.add_argument("--no-parity", action="store_true", help="skip the exporter's parity check (tests)")
    parser.add_argument("--force", action="store_true", help="replace existing results in --out")
    args = parser.parse_args(argv)
    try:
        return DecodeBenchConfig(
            checkpoint=args.checkpoint,
            data_dir=args.data_dir,
            split=args.split,
            sentences=args.sentences,
            batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
            modes=tuple(args.modes.split(",")),
            engines=None if args.engines is None else tuple(args.engines.split(",")),
            device=args.device,
            threads=args.threads,
            settings=SearchSettings(args.beam_size, args.length_penalty, args.max_len_extra),
            cache_dir=args.cache_dir,
            out=args.out,
            force=args.force,
            parity=not args.no_parity,
            ort_spinning=args.ort_spinning == "on",
            sgemm_size=args.sgemm_size,
        )
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


def main(argv: list[str] | None = None) -> int:
    from .report import RESULT_FILES, write_report

    cfg = _parse(argv)
    if cfg.device == "cuda" and (problem := cuda_problem(cfg.engines)):
        print(f"error: --device cuda cannot run here: {problem}; use --device cpu", file=sys.stderr)
        return 2
    existing = [name for name in RESULT_FILES if (cfg.out / name).exists()]
    if existing and not cfg.force:
        print(f"error: {cfg.out} already has {', '.join(existing)}; pass --force to replace", file=sys.stderr)
        return 2
    try:
        results = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_report(results, cfg.out))
    return 0 if not results["skipped"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
