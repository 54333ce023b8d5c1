"""ONNX Runtime sessions for a bundle: the only module that creates ort.InferenceSession.

A bundle holds one or more *variants* of the encoder/decoder pair (manifest["variants"]):
    fp32       portable graphs, CUDA or CPU          fp32-cpu   ORT-optimized offline, CPU only
    int8-cpu   dynamically quantized, CPU only       fp16-cuda  half precision, CUDA only
Bundles written before variants existed list manifest["graphs"] instead (encoder, decoder and
optionally encoder_cpu/decoder_cpu): they are read as the variants fp32 and fp32-cpu.

Choice: the device picks the execution provider (cpu; cuda, required; auto: CUDA when this
onnxruntime has it, else CPU), then the precision picks the variant among those that run on it:
    provider  auto                 fp32              int8        fp16
    CUDA      fp16-cuda, fp32      fp32              -           fp16-cuda
    CPU       fp32-cpu, fp32       fp32-cpu, fp32    int8-cpu    -
(first one the bundle has; with device auto, a precision only the CPU has, int8, runs there).
Device auto falls back to the CPU, with a warning, when CUDA is missing or does not start.
One log line says which variant and provider are active. Sessions also carries what the search
needs from the graphs (layers, heads, d_head, KV dtype, vocabulary, whether the decoder has the
top-k head), read from their inputs, the bundle's vocabulary shortlist (engine/shortlist.py; only
when RuntimeConfig.shortlist is True), and on the CPU with more than one intra-op thread a
second, single-threaded decoder session for steps of few rows (SINGLE_THREAD_ROWS). On the CPU, the
variant's step decoders open too when it has them (manifest "step_decoder", "rows_decoder":
export/step_decoder.py): the static search runs the first (engine/step_cache.py), continuous
batching the second (RuntimeConfig.per_row_decoder, engine/row_cache.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from . import shortlist as shortlist_
from .bundle import (
    VOCAB_SIZE_KEY,
    BundleError,
    cross_names,
    decoder_outputs,
    has_head,
    head_outputs,
    manifest_variants,
    past_names,
    shortlist_file,
    verify_bundle,
)
from .turns import NO_TURNS, EngineTurns, NoTurns

log = logging.getLogger(__name__)

DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "int8", "fp16")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# Variant names to try, best first, per (provider, precision).
PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {
    (CUDA, "auto"): ("fp16-cuda", "fp32"),
    (CUDA, "fp32"): ("fp32",),
    (CUDA, "int8"): (),
    (CUDA, "fp16"): ("fp16-cuda",),
    (CPU, "auto"): ("fp32-cpu", "fp32"),
    (CPU, "fp32"): ("fp32-cpu", "fp32"),
    (CPU, "int8"): ("int8-cpu",),
    (CPU, "fp16"): (),
}
# ONNX tensor types of the KV inputs -> numpy dtypes.
# What InferenceSession raises for a file it cannot load (pybind exception types, not ValueError).
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(ort_state, name)
    for name in (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "InvalidProtobuf",
        "InvalidGraph",
        "NotImplemented",
        "RuntimeException",
        "EPFail",
    )
    if hasattr(ort_state, name)
)
# Measured (models/default, 2 AMD EPYC cores, intra-op spinning off, engine end to end, the two
# settings taking turns per batch): one thread for steps of <= 64 rows was 1.05-1.28x faster at
# greedy b=1..32 and beam 4 b=1..8, and a tie at beam 4 b=32 (128 rows, shrinking as sentences
# end); thresholds 32, 48 and 96 did no better. ORT wakes its sleeping worker for every parallel
# op; on a step of a few rows that wake-up costs more than the second core saves.
SINGLE_THREAD_ROWS = 64
# The step decoder (export/step_decoder.py: 77 nodes instead of 178) pays the wake-up far less often:
# 2 threads against 1, its run alone, 2 Xeon (AMX) cores, 10 cached positions: 1.00x at 8 rows,
# 1.01 / 1.12x at 16 (greedy / beam 4), 1.14 / 1.25x at 32, 1.25 / 1.34x at 64, 1.41 / 1.45x at 128.
STEP_SINGLE_THREAD_ROWS = 8
KV_TYPES: dict[str, np.dtype] = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


class ProviderError(ValueError):
    """onnxruntime has the execution provider but could not start it (e.g. CUDA libraries missing)."""


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "cpu"  # cpu | cuda | auto
    precision: str = "auto"  # auto | fp32 | int8 | fp16
    intra_op_threads: int = 0  # 0 = ORT's default (one per physical core)
    inter_op_threads: int = 1
    spinning: bool = False  # intra-op workers busy-wait between ops: only for experiments (nmt-bench decode)
    # Score only the bundle's vocabulary shortlist per batch, when it has one. Off by default: a
    # sentence's output then depends on its batch mates (the union of their lists), and the speed-up
    # is 0.94-1.30x here (bench/results/decode.md); BLEU stays within 0.3.
    shortlist: bool = False
    # Decoder steps of at most this many rows run on a second, single-threaded CPU session (0: never):
    # waking a sleeping worker costs more than it saves on small steps (SINGLE_THREAD_ROWS).
    single_thread_rows: int = SINGLE_THREAD_ROWS
    step_single_thread_rows: int = STEP_SINGLE_THREAD_ROWS  # the same for the step decoder
    # Static search runs the bundle's step decoder (in-place KV cache, export/step_decoder.py) when the
    # chosen CPU variant has one, continuous batching its per-row form; False: the traced decoder.
    step_decoder: bool = True
    # Open the per-row step decoder too (only continuous batching runs it: nmt-serve --batching continuous).
    per_row_decoder: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")
        if self.inter_op_threads < 0:
            raise ValueError(f"inter_op_threads must be >= 0, got {self.inter_op_threads}")
        for name in ("single_thread_rows", "step_single_thread_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Sessions:
    """An encoder/decoder session pair and what the search needs to know about the graphs."""

    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    variant: str  # e.g. "fp32-cpu"; "loose" for graph files outside a bundle
    provider: str  # the active execution provider of the decoder
    kv_dtype: np.dtype  # dtype of cross/past/present tensors
    manifest: dict[str, Any] | None  # None for loose graph files
    n_layers: int  # decoder layers
    n_heads: int
    d_head: int
    vocab_size: int
    has_head: bool = False  # the decoder has the top-k head (bundle.has_head): the search feeds vocab_ids, top_k
    shortlist: shortlist_.Shortlist | None = None  # loaded when the bundle has one and RuntimeConfig.shortlist
    decoder_small: ort.InferenceSession | None = None  # one intra-op thread, for steps of few rows
    single_thread_rows: int = 0  # steps of at most this many rows use decoder_small
    turns: EngineTurns | NoTurns = NO_TURNS  # every run takes its threads from the models' budget (engine/turns.py)
    threads: int = 0  # intra-op threads of the encoder and decoder sessions (0: ORT's default, one per core)
    # The bundle's step decoder (export/step_decoder.py: in-place KV cache) for static search, and its
    # single-threaded twin; None: the search runs the decoder above (engine/decoding.py picks).
    step: ort.InferenceSession | None = None
    step_small: ort.InferenceSession | None = None
    step_single_thread_rows: int = 0  # steps of at most this many rows use step_small (rows_small too)
    # Its per-row form for continuous batching (engine/row_cache.py), and its single-threaded twin.
    rows: ort.InferenceSession | None = None
    rows_small: ort.InferenceSession | None = None

    @property
    def all_threads(self) -> int:
        """The threads of the encoder and the (large-step) decoder session."""
        return self.threads or os.cpu_count() or 1

    def threads_for(self, rows: int) -> int:
        """The threads a decoder step of `rows` rows runs on, given them all."""
        return 1 if self.decoder_small is not None and rows <= self.single_thread_rows else self.all_threads

    def decoder_for(self, rows: int, threads: int | None = None) -> ort.InferenceSession:
        """The decoder session for a step of `rows` rows (on one thread when `threads` is 1)."""
        small = self.decoder_small is not None and (rows <= self.single_thread_rows or threads == 1)
        return self.decoder_small if small else self.decoder  # type: ignore[return-value]

    def run_encoder(self, outputs: list[str], feeds: dict[str, Any], rows: int) -> list[np.ndarray]:
        """One encoder run in its turn (one encoder session: it runs on all its threads, shrunk or not)."""
        with self.turns.step(rows, self.all_threads):
            return self.encoder.run(outputs, feeds)

    def run_decoder(self, outputs: list[str], feeds: dict[str, Any], rows: int) -> list[np.ndarray]:
        """One decoder step of `rows` rows in its turn, on the session for the threads it got."""
        with self.turns.step(rows, self.threads_for(rows), shrinks=self.decoder_small is not None) as threads:
            return self.decoder_for(rows, threads).run(outputs, feeds)

    def run_step(
        self, bind: Callable[[ort.InferenceSession], ort.IOBinding], rows: int, per_row: bool = False
    ) -> ort.IOBinding:
        """One step-decoder run (per_row: the per-row graph's) of `rows` rows in its turn: `bind` binds the
        chosen session's inputs and outputs (IO binding: the KV buffers are written in place); returns
        the binding, run."""
        big, small = (self.rows, self.rows_small) if per_row else (self.step, self.step_small)
        assert big is not None, "the bundle has no step decoder"
        alone = small is not None and rows <= self.step_single_thread_rows
        with self.turns.step(rows, 1 if alone else self.all_threads, shrinks=small is not None) as threads:
            session = small if small is not None and (alone or threads == 1) else big
            binding = bind(session)
            session.run_with_iobinding(binding)
            return binding

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the position table covers (None when there is no manifest)."""
        return (self.manifest or {}).get("model", {}).get("max_positions")


def choose_provider(device: str, available: list[str]) -> list[str]:
    """Providers to try, best first; refuses device='cuda' without the CUDA provider."""
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA] if device == "cuda" else [CUDA, CPU]
    if device == "cuda":
        raise ValueError(
            f"device 'cuda' needs onnxruntime's {CUDA}, but this onnxruntime {ort.__version__} has only "
            f"{', '.join(available)} (install onnxruntime-gpu, or use device 'cpu' or 'auto')"
        )
    log.warning("device 'auto': %s is not available in this onnxruntime; falling back to %s", CUDA, CPU)
    return [CPU]


def choose_variant(variants: dict[str, dict[str, Any]], precision: str, providers: list[str]) -> tuple[str, str]:
    """(variant name, provider): the first preferred variant the bundle has for the first provider that has one."""
    have = ", ".join(sorted(variants))
    if precision != "auto" and not any(name.split("-")[0] == precision for name in variants):
        raise ValueError(f"the bundle has no {precision} variant; it has: {have}")
    for provider in providers:
        for name in PREFERENCE[(provider, precision)]:
            if name in variants and provider in variants[name].get("providers", [CPU]):
                return name, provider
    raise ValueError(
        f"no variant of the bundle runs with precision {precision!r} on {' or '.join(providers)}; it has: {have}"
    )


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 1, spinning: bool = False) -> ort.SessionOptions:
    """The options of every session this project opens (the engine's, the exporter's checks, the bench's)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    # The encoder and decoder each own a thread pool; spinning workers of the idle one steal the
    # cores the other needs (1.3-1.7x slower on 2 vCPUs: bench/results/profile.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def _session(path: Path, provider: str, cfg: RuntimeConfig) -> ort.InferenceSession:
    # CPU stays listed after CUDA: ORT places the few nodes CUDA lacks (shape ops) there.
    providers = [CUDA, CPU] if provider == CUDA else [CPU]
    options = session_options(cfg.intra_op_threads, cfg.inter_op_threads, cfg.spinning)
    try:
        # enable_fallback=0: when CUDA fails to start (no device, driver too old), ORT would print a
        # banner on stdout and quietly retry on the CPU; raise instead, with its reason.
        session = ort.InferenceSession(
            str(path), options, providers=providers, **({"enable_fallback": 0} if provider == CUDA else {})
        )
    except (*ORT_ERRORS, RuntimeError) as e:
        if provider == CUDA:
            raise ProviderError(
                f"{path.name}: onnxruntime {ort.__version__} could not start {provider}: "
                f"{' '.join(str(e).split())}; is a GPU visible (docker run --gpus all)? Else use "
                "device 'cpu'"
            ) from e
        raise BundleError(f"{path.name}: onnxruntime cannot load it: {e}") from e
    if session.get_providers()[0] != provider:  # the CUDA provider library did not load: ORT logged why
        raise ProviderError(
            f"{path.name}: onnxruntime {ort.__version__} could not start {provider} (got "
            f"{session.get_providers()}): its CUDA/cuDNN libraries did not load (onnxruntime's log "
            "above names the missing one); use the CUDA image, or device 'cpu'"
        )
    return session


def _describe(encoder: ort.InferenceSession, decoder: ort.InferenceSession) -> dict[str, Any]:
    """n_layers, n_heads, d_head, kv_dtype, vocab_size read from the graphs' declared inputs/outputs."""
    inputs = {i.name: i for i in decoder.get_inputs()}
    n_layers = sum(1 for name in inputs if name.startswith("past_key_"))
    missing = [n for n in past_names(n_layers) + cross_names(n_layers) + ["tgt_ids", "src_mask"] if n not in inputs]
    outputs = [o.name for o in decoder.get_outputs()]
    head = has_head(outputs)
    if not n_layers or missing or outputs != decoder_outputs(n_layers) + (head_outputs() if head else []):
        raise BundleError(
            f"the decoder graph does not have the bundle interface (inputs missing: {missing}, outputs: {outputs})"
        )
    encoder_outputs = [o.name for o in encoder.get_outputs()]
    if encoder_outputs != cross_names(n_layers):
        raise BundleError(f"the encoder outputs {encoder_outputs}, expected {cross_names(n_layers)}")
    past = inputs["past_key_0"]
    _, n_heads, _, d_head = past.shape  # (batch, n_heads, past_len, d_head): heads and d_head are static
    vocab = decoder.get_outputs()[0].shape[-1]
    if head:  # log_probs has V' columns: the graph states the vocabulary size apart
        stated = decoder.get_modelmeta().custom_metadata_map.get(VOCAB_SIZE_KEY, "")
        vocab = int(stated) if stated.isdigit() else vocab
    if past.type not in KV_TYPES or not all(isinstance(x, int) for x in (n_heads, d_head, vocab)):
        raise BundleError(f"unsupported decoder KV input {past.name}: {past.type} {past.shape}, log_probs {vocab}")
    return {
        "n_layers": n_layers,
        "n_heads": n_heads,
        "d_head": d_head,
        "kv_dtype": KV_TYPES[past.type],
        "vocab_size": vocab,
        "has_head": head,
    }


def open_sessions(
    encoder_path: str | Path,
    decoder_path: str | Path,
    providers: list[str] | str = CPU,
    cfg: RuntimeConfig | None = None,
    *,
    variant: str = "loose",
    manifest: dict[str, Any] | None = None,
    step_path: str | Path | None = None,
    rows_path: str | Path | None = None,
) -> Sessions:
    """Sessions for two graph files (loose, or one variant of a bundle).

    `providers` is the provider to use (CPU or CUDA), or a list of which the first is used.
    """
    cfg = cfg or RuntimeConfig()
    provider = providers if isinstance(providers, str) else providers[0]
    if provider not in (CPU, CUDA):
        raise ValueError(f"provider must be {CPU} or {CUDA}, got {provider!r}")
    if provider not in ort.get_available_providers():
        raise ValueError(f"this onnxruntime has no {provider} (available: {', '.join(ort.get_available_providers())})")
    encoder = _session(Path(encoder_path), provider, cfg)
    decoder = _session(Path(decoder_path), provider, cfg)
    steps: dict[str, ort.InferenceSession | None] = {}
    twins = provider == CPU and cfg.step_single_thread_rows and cfg.intra_op_threads != 1
    for role, path, wanted in (("step", step_path, True), ("rows", rows_path, cfg.per_row_decoder)):
        use = path is not None and provider == CPU and cfg.step_decoder and wanted
        steps[role] = _session(Path(path), provider, cfg) if use else None
        alone = replace(cfg, intra_op_threads=1)
        steps[f"{role}_small"] = _session(Path(path), provider, alone) if use and twins else None
    # The traced decoder runs steps unless the step decoders cover the search (and continuous batching,
    # when asked for): its single-threaded twin only then (each session holds its own weights).
    traced_steps = steps["step"] is None or (cfg.per_row_decoder and steps["rows"] is None)
    small = None
    if traced_steps and provider == CPU and cfg.single_thread_rows and cfg.intra_op_threads != 1:
        small = _session(Path(decoder_path), provider, replace(cfg, intra_op_threads=1))
    return Sessions(
        encoder=encoder,
        decoder=decoder,
        variant=variant,
        provider=provider,
        manifest=manifest,
        decoder_small=small,
        single_thread_rows=cfg.single_thread_rows if small else 0,
        threads=cfg.intra_op_threads if provider == CPU else 0,
        **steps,
        step_single_thread_rows=cfg.step_single_thread_rows if twins else 0,
        **_describe(encoder, decoder),
    )


def _open_variant(bundle_dir: Path, manifest: dict[str, Any], cfg: RuntimeConfig, providers: list[str]) -> Sessions:
    """`manifest` is verify_bundle's: it has variants, and each one's graphs are listed files."""
    variants = manifest_variants(manifest)
    name, provider = choose_variant(variants, cfg.precision, providers)
    entry = variants[name]
    step, rows = (entry.get(role) for role in ("step_decoder", "rows_decoder"))
    sessions = open_sessions(
        bundle_dir / entry["encoder"],
        bundle_dir / entry["decoder"],
        provider,
        cfg,
        variant=name,
        manifest=manifest,
        step_path=None if step is None else bundle_dir / step,
        rows_path=None if rows is None else bundle_dir / rows,
    )
    declared = entry.get("kv_dtype", "float32")
    if np.dtype(declared) != sessions.kv_dtype:
        raise BundleError(f"variant {name}: manifest says kv_dtype {declared}, the decoder takes {sessions.kv_dtype}")
    found = shortlist_file(manifest)
    if cfg.shortlist and sessions.has_head and found is not None:
        sessions = replace(sessions, shortlist=shortlist_.load(bundle_dir / found, sessions.vocab_size))
    return sessions


def load_sessions(bundle_dir: str | Path, cfg: RuntimeConfig | None = None) -> Sessions:
    """Verify the bundle (sha256 of every file), choose a variant and provider, open both sessions."""
    cfg = cfg or RuntimeConfig()
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)
    providers = choose_provider(cfg.device, ort.get_available_providers())
    try:
        sessions = _open_variant(bundle_dir, manifest, cfg, providers)
    except ProviderError as e:
        if cfg.device != "auto" or providers == [CPU]:
            raise
        log.warning("device 'auto': %s; falling back to %s", e, CPU)
        sessions = _open_variant(bundle_dir, manifest, cfg, [CPU])
    log.info(
        "bundle %s: variant %s on %s (intra_op_threads=%d, inter_op_threads=%d, vocabulary shortlist %s)",
        bundle_dir.name,
        sessions.variant,
        sessions.provider,
        cfg.intra_op_threads,
        cfg.inter_op_threads,
        "on" if sessions.shortlist is not None else "off",
    )
    return sessions
