"""The decoders compared by `nmt-bench decode`, behind one small interface.

Every engine takes token-id sources (without EOS) and returns the best hypothesis's tokens
(without EOS), with the search rules of training/search.py: start from BOS, greedy or beam
with the GNMT length penalty ((5 + len) / 6) ** alpha (len counting EOS), fairseq's finishing
rule, at most len(source) + max_len_extra tokens (EOS included).

Every engine here runs without the repetition guard (no n-gram 4 times in a row, on in the
service): CTranslate2 has no such rule, and the comparison is of equal work and equal outputs.

CTranslate2 differs in two rules, and is driven so that the differences do not show:
- its length penalty is len ** alpha (len without EOS). We ask for all `beam_size` finished
  hypotheses with raw scores (length_penalty 1e-9, which also keeps its fairseq-style finishing
  rule; exactly 0 would switch on its early exit) and pick the best with our penalty;
- its length limit is one per batch (max_decoding_length), and a hypothesis that reaches it is
  cut rather than ended with EOS; we give it the batch's longest source + max_len_extra. Greedy
  outputs are then cut to each sentence's own limit (len(source) + max_len_extra - 1 tokens
  before the forced EOS), which gives exactly our greedy tokens; a beam that reaches the limit
  (rare with a trained model) may differ.

Devices (--device): on cpu every engine runs on the CPU; on cuda torch runs on the GPU (when its
build has CUDA), the ORT engines through the runtime with device "cuda" (fp32: the portable fp32
variant; fp16: fp16-cuda) and CT2 with device "cuda". int8 ORT is CPU only, fp16/float16 GPU only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nmt.engine.decoding import pad_sources
from nmt.engine.hypothesis import length_penalty

TINY_LENGTH_PENALTY = 1e-9  # CT2: raw scores, without its early exit (see the docstring)
DEVICES: tuple[str, ...] = ("cpu", "cuda")
# ORT engines: (bundle in the cache, RuntimeConfig.precision, vocabulary shortlist on, step decoder on).
# "-traced": the traced decoder and its concatenated cache, as before the step decoder (before/after in one run).
ORT_ENGINES: dict[str, tuple[str, str, bool, bool]] = {
    "ort-fp32-unfused": ("unfused", "fp32", False, True),
    "ort-fp32": ("fused", "fp32", False, True),
    "ort-fp32-traced": ("fused", "fp32", False, False),
    "ort-fp32-shortlist": ("fused", "fp32", True, True),
    "ort-int8": ("fused", "int8", False, True),
    "ort-int8-traced": ("fused", "int8", False, False),
    "ort-int8-shortlist": ("fused", "int8", True, True),
    "ort-fp16": ("fused", "fp16", False, True),
    "ort-fp16-shortlist": ("fused", "fp16", True, True),
}
# CT2 engines: (compute type, vocabulary map: the bundle's shortlist as CT2's vmap.txt).
CT2_ENGINES: dict[str, tuple[str, bool]] = {
    "ct2-float32": ("float32", False),
    "ct2-float32-vmap": ("float32", True),
    "ct2-int8": ("int8", False),
    "ct2-int8-vmap": ("int8", True),
    "ct2-float16": ("float16", False),
    "ct2-float16-vmap": ("float16", True),
}
# The default engines per device.
ENGINES: tuple[str, ...] = (
    "torch",
    "ort-fp32-unfused",
    "ort-fp32",
    "ort-fp32-shortlist",
    "ort-int8",
    "ort-int8-shortlist",
    "ct2-float32",
    "ct2-float32-vmap",
    "ct2-int8",
    "ct2-int8-vmap",
)
CUDA_ENGINES: tuple[str, ...] = (
    "torch",
    "ort-fp32-unfused",
    "ort-fp32",
    "ort-fp32-shortlist",
    "ort-fp16",
    "ort-fp16-shortlist",
    "ct2-float32",
    "ct2-float32-vmap",
    "ct2-float16",
    "ct2-float16-vmap",
)
ALL_ENGINES: tuple[str, ...] = ("torch", *ORT_ENGINES, *CT2_ENGINES)
# Engines that run on one device only: ORT's int8-cpu variant; fp16-cuda and CT2 float16 (no
# efficient float16 on the CPU). CT2 int8 runs on both (not in the cuda default).
ONLY_ON: dict[str, str] = {
    "ort-int8": "cpu",
    "ort-int8-shortlist": "cpu",
    "ort-int8-traced": "cpu",
    "ort-fp16": "cuda",
    "ort-fp16-shortlist": "cuda",
    "ct2-float16": "cuda",
    "ct2-float16-vmap": "cuda",
}


def default_engines(device: str) -> tuple[str, ...]:
    return CUDA_ENGINES if device == "cuda" else ENGINES


def wrong_device(engines: Sequence[str], device: str) -> list[str]:
    """The engines among `engines` that do not run on `device`."""
    return [e for e in engines if ONLY_ON.get(e, device) != device]


def _ct2_cuda_devices() -> int:
    import ctranslate2

    try:
        return ctranslate2.get_cuda_device_count()
    except RuntimeError:  # a CTranslate2 built without CUDA
        return 0


def cuda_problem(engines: Sequence[str]) -> str | None:
    """Why `engines` cannot run on device cuda here, in one line; None when nothing is missing.
    A GPU must be visible (to CTranslate2 or torch); ORT engines need onnxruntime's CUDA provider,
    CT2 engines a GPU that CTranslate2 sees. (torch without CUDA only skips the torch row.)"""
    import ctranslate2
    import onnxruntime as ort
    import torch

    problems = []
    ct2_gpus, torch_gpu = _ct2_cuda_devices(), torch.cuda.is_available()
    if not ct2_gpus and not torch_gpu:
        problems.append(
            f"no CUDA device is visible (CTranslate2 {ctranslate2.__version__} counts 0, "
            f"torch {torch.__version__} has none)"
        )
    elif not ct2_gpus and any(e in CT2_ENGINES for e in engines):
        problems.append(f"CTranslate2 {ctranslate2.__version__} sees no CUDA device (engines ct2-*)")
    if any(e in ORT_ENGINES for e in engines) and "CUDAExecutionProvider" not in ort.get_available_providers():
        problems.append(
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (has "
            f"{', '.join(ort.get_available_providers())}; install onnxruntime-gpu)"
        )
    return "; ".join(problems) or None


def gpu_name() -> str | None:
    """The first GPU's name, from torch or else nvidia-smi; None when neither says."""
    import shutil
    import subprocess

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if smi := shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None
    return None


@dataclass(frozen=True)
class SearchSettings:
    beam_size: int = 4  # for the beam rows; greedy rows use 1
    length_penalty: float = 0.6
    max_len_extra: int = 50


class Engine(Protocol):
    name: str

    def translate(self, sources: list[list[int]], beam_size: int) -> list[list[int]]:
        """Best hypothesis per source (token ids without EOS)."""

    def encode(self, sources: list[list[int]]) -> None:
        """Run the encoder (and what each engine computes from it once per sentence)."""


class TorchEngine:
    """training/search.py: PyTorch eager with the KV cache (threads: torch.set_num_threads).

    device "cuda" moves the model to the GPU (in place) and needs a CUDA build of torch."""

    def __init__(self, model, settings: SearchSettings, name: str = "torch", device: str = "cpu"):
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} has no CUDA (a CPU build, or no GPU visible)")
        self.name, self.model, self.settings, self.device = name, model.eval().to(device), settings, device

    def translate(self, sources: list[list[int]], beam_size: int) -> list[list[int]]:
        from nmt.training.search import beam_search, greedy_search

        extra = self.settings.max_len_extra
        if beam_size == 1:
            found = greedy_search(self.model, sources, max_len_extra=extra, device=self.device, repetition_guard=False)
            return [h.tokens for h in found]
        found = beam_search(
            self.model,
            sources,
            beam_size,
            self.settings.length_penalty,
            1,
            extra,
            device=self.device,
            repetition_guard=False,
        )
        return [hyps[0].tokens for hyps in found]

    def encode(self, sources: list[list[int]]) -> None:
        import torch

        ids, mask = (torch.from_numpy(a).to(self.device) for a in pad_sources(sources))
        with torch.no_grad():
            self.model.cross_kv(self.model.encode(ids, mask))
        if self.device == "cuda":
            torch.cuda.synchronize()  # the timing covers the kernels, not only their launch


def reopen_cpu_session(path: Path, threads: int, spinning: bool = False, profile_prefix: Path | None = None):
    """An ORT CPU session with the engine's options, plus spinning/profiling settings."""
    import onnxruntime as ort

    from nmt.engine.runtime import session_options

    options = session_options(threads, 1, spinning)
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, str(profile_prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtEngine:
    """The engine's Decoder on the sessions its runtime makes (one bundle, one precision).

    spinning=True turns intra-op spinning on, an experiment (the engine keeps it off); the variant
    name says so. device "cuda": the runtime's CUDA provider (fp32 -> the portable fp32 variant,
    fp16 -> fp16-cuda; engine/runtime.py PREFERENCE)."""

    def __init__(
        self,
        name: str,
        bundle_dir: Path,
        precision: str,
        threads: int,
        settings: SearchSettings,
        spinning: bool = False,
        shortlist: bool = False,
        device: str = "cpu",
        step_decoder: bool = True,
    ):
        from nmt.engine.decoding import DecodeOptions, Decoder
        from nmt.engine.runtime import RuntimeConfig, load_sessions

        cfg = RuntimeConfig(
            device=device,
            precision=precision,
            intra_op_threads=threads,
            inter_op_threads=1,
            spinning=spinning,
            shortlist=shortlist,
            step_decoder=step_decoder,
        )
        self.name, self.sessions, self.spinning = name, load_sessions(bundle_dir, cfg), spinning
        if shortlist and self.sessions.shortlist is None:
            raise ValueError(f"{bundle_dir} has no vocabulary shortlist")
        self.decoder = Decoder(self.sessions)
        self._options = {
            beam: DecodeOptions(
                beam_size=beam,
                length_penalty=settings.length_penalty,
                max_len_extra=settings.max_len_extra,
                repetition_guard=False,
            )
            for beam in {1, settings.beam_size}
        }

    @property
    def variant(self) -> str:
        shortlist = ", shortlist" if self.sessions.shortlist is not None else ""
        cuda = " on CUDA" if self.sessions.on_cuda else ""
        step = ", step decoder" if self.sessions.step is not None else ""
        return str(self.sessions.variant) + cuda + step + shortlist + (", spinning on" if self.spinning else "")

    def translate(self, sources: list[list[int]], beam_size: int) -> list[list[int]]:
        result = self.decoder.search(sources, self._options[beam_size])
        return [hyps[0].tokens for hyps in result.hypotheses]

    def encode(self, sources: list[list[int]]) -> None:
        ids, mask = pad_sources(sources)
        self.sessions.encoder.run(None, {"src_ids": ids, "src_mask": mask})


class CT2Engine:
    """A CTranslate2 Translator on a model converted by bench/ct2.py (inter 1, intra `threads`)."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        compute_type: str,
        threads: int,
        pieces: Sequence[str],
        settings: SearchSettings,
        use_vmap: bool = False,
        device: str = "cpu",
    ):
        import ctranslate2

        self.name, self.settings, self.pieces, self.use_vmap = name, settings, list(pieces), use_vmap
        self.index = {piece: i for i, piece in enumerate(self.pieces)}
        self.translator = ctranslate2.Translator(
            str(model_dir), device=device, compute_type=compute_type, inter_threads=1, intra_threads=threads
        )

    def _run(self, sources: list[list[int]], **options):
        tokens = [[self.pieces[i] for i in s] for s in sources]  # EOS is added by the model config
        return self.translator.translate_batch(
            tokens, min_decoding_length=0, return_scores=True, use_vmap=self.use_vmap, **options
        )

    def translate(self, sources: list[list[int]], beam_size: int) -> list[list[int]]:
        max_len = max(map(len, sources)) + self.settings.max_len_extra
        if beam_size == 1:
            results = self._run(sources, beam_size=1, max_decoding_length=max_len)
            limits = [len(s) + self.settings.max_len_extra - 1 for s in sources]
            return [[self.index[p] for p in r.hypotheses[0][:limit]] for r, limit in zip(results, limits)]
        results = self._run(
            sources,
            beam_size=beam_size,
            num_hypotheses=beam_size,
            patience=1.0,
            length_penalty=TINY_LENGTH_PENALTY,
            max_decoding_length=max_len,
        )
        alpha = self.settings.length_penalty
        best = []
        for r in results:
            scored = [(score / length_penalty(len(h) + 1, alpha), h) for h, score in zip(r.hypotheses, r.scores)]
            best.append([self.index[p] for p in max(scored, key=lambda x: x[0])[1]])
        return best

    def encode(self, sources: list[list[int]]) -> None:
        # Its Python API has no encoder-only call: this is the encoder plus one greedy step.
        self._run(sources, beam_size=1, max_decoding_length=1)
