"""The model bundle: the only contract between the exporter and the server.

    manifest.json       format + version, model config, graph inputs/outputs, special ids,
                        tokenizer, inference settings (the decoding defaults), opset, versions, source checkpoint hash, parity summary,
                        variants, and every other file with its sha256 and size
    encoder.onnx        variant fp32: portable graphs (fused attention, any ORT provider)
    decoder.onnx
    encoder.cpu.onnx    variant fp32-cpu: after ORT's offline optimization, CPU provider only
    decoder.cpu.onnx
    encoder.int8.onnx   variant int8-cpu: dynamic int8 quantization of fp32-cpu
    decoder.int8.onnx
    encoder.fp16.onnx   variant fp16-cuda: fp16 weights and KV tensors, for the CUDA provider
    decoder.fp16.onnx
    spm.model           the SentencePiece model
    shortlist.npz       optional: the vocabulary shortlist (engine/shortlist.py); manifest["shortlist"]
                        says how it was built, or why there is none

manifest["variants"] maps each variant written to {"encoder", "decoder", "providers",
"kv_dtype", "validated"}; every variant has the same graph input/output names (export/variants.py).
Format version 2 added "variants" (and dropped version 1's "graphs"); version 1 is still read.
Format version 3 added the decoder input "past_mask" (rows of one batch may hold caches of different
lengths: continuous batching); bundles of version 1 and 2 are still read and served with static
batching (takes_past_mask). Format 3 also added the decoder's output head (inputs vocab_ids and
top_k with defaults, outputs top_log_probs, top_ids, eos_log_probs: export/decoder_head.py) and
the optional shortlist.npz; decoders without the head are searched from log_probs (has_head).

This module must not import torch: the server reads bundles with it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .tokenizer import MODEL_FILENAME

BUNDLE_FORMAT = "nmt-bundle"
BUNDLE_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
ENCODER, DECODER = "encoder.onnx", "decoder.onnx"
ENCODER_CPU, DECODER_CPU = "encoder.cpu.onnx", "decoder.cpu.onnx"
ENCODER_INT8, DECODER_INT8 = "encoder.int8.onnx", "decoder.int8.onnx"
# The step decoder (export/step_decoder.py) of the CPU variants, manifest["variants"][name]["step_decoder"];
# STEP_DECODER is the export's intermediate, removed once the variants are built.
STEP_DECODER, STEP_DECODER_CPU, STEP_DECODER_INT8 = (
    "decoder.step.onnx",
    "decoder.step.cpu.onnx",
    "decoder.step.int8.onnx",
)
# The per-row step decoder for continuous batching, manifest["variants"][name]["rows_decoder"] (same scheme).
ROWS_DECODER, ROWS_DECODER_CPU, ROWS_DECODER_INT8 = (
    "decoder.rows.onnx",
    "decoder.rows.cpu.onnx",
    "decoder.rows.int8.onnx",
)
# The step decoders' own inputs (export/step_decoder.py); the others are the traced decoder's names.
TOKENS, PAST_LENGTH, BEAM_WIDTH, CACHE_INDIRECTION = "tokens", "past_sequence_length", "beam_width", "cache_indirection"
SEQLENS_K, TOTAL_LENGTH = "seqlens_k", "total_sequence_length"  # the per-row one's
ENCODER_FP16, DECODER_FP16 = "encoder.fp16.onnx", "decoder.fp16.onnx"
TOKENIZER = MODEL_FILENAME
SELF_HASH = "manifest_sha256"


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, altered, or would be overwritten."""


# Graph inputs and outputs, declared as data; the exporter names them, the server feeds them.
def encoder_inputs() -> list[str]:
    return ["src_ids", "src_mask"]


def cross_names(n_layers: int) -> list[str]:
    return [f"cross_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def past_names(n_layers: int) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


PAST_MASK = "past_mask"  # format 3: (batch, past_len + tgt_len) bool


def decoder_inputs(n_layers: int) -> list[str]:
    return ["tgt_ids", "src_mask", *past_names(n_layers), *cross_names(n_layers), PAST_MASK]


def takes_past_mask(input_names: list[str]) -> bool:
    """Whether a decoder graph takes past_mask (format 3); older graphs support static batching only."""
    return PAST_MASK in input_names


def decoder_outputs(n_layers: int) -> list[str]:
    return ["log_probs", *present_names(n_layers)]


# The decoder's output head (export/decoder_head.py), format 3: two inputs with defaults in the
# graph (the whole vocabulary; top_k 0) and three outputs after the present K/V. Graphs
# without them are still served, from log_probs (has_head).
VOCAB_IDS, TOP_K = "vocab_ids", "top_k"
TOP_LOG_PROBS, TOP_IDS, EOS_LOG_PROBS = "top_log_probs", "top_ids", "eos_log_probs"
SHORTLIST = "shortlist.npz"  # the vocabulary shortlist (engine/shortlist.py), when the export built one
VOCAB_SIZE_KEY = "vocab_size"  # the decoder's ONNX metadata: log_probs no longer has a static width


def head_outputs() -> list[str]:
    return [TOP_LOG_PROBS, TOP_IDS, EOS_LOG_PROBS]


def has_head(output_names: list[str]) -> bool:
    """Whether a decoder graph has the top-k head (and so takes vocab_ids and top_k)."""
    return output_names[-3:] == head_outputs()


def graph_spec(n_layers: int) -> dict[str, Any]:
    """What the manifest says about the graphs' interface (shapes use the named axes)."""
    kv = "(batch, n_heads, {}, d_head) kv_dtype (the variant's)"
    return {
        "encoder": {
            "inputs": {"src_ids": "(batch, src_len) int64", "src_mask": "(batch, src_len) bool, True = token"},
            "outputs": {name: kv.format("src_len") for name in cross_names(n_layers)},
        },
        "decoder": {
            "inputs": {
                "tgt_ids": "(batch, tgt_len) int64, the new tokens after the cached past_len",
                "src_mask": "(batch, src_len) bool, True = token",
                **{name: kv.format("past_len") for name in past_names(n_layers)},
                **{name: kv.format("src_len") for name in cross_names(n_layers)},
                PAST_MASK: "(batch, past_len + tgt_len) bool, True = a real key (cached slots the row has, and "
                "its new tokens); a row's positions count its real keys",
                VOCAB_IDS: "(vocab',) int64, optional (default: every id): the ids to score, ascending, 0..3 included",
                TOP_K: "(1,) int64, optional (default 0): candidates per row in the top_* outputs",
            },
            "outputs": {
                "log_probs": "(batch, vocab') float32, log-softmax over vocab_ids at the last position",
                **{name: kv.format("past_len + tgt_len") for name in present_names(n_layers)},
                TOP_LOG_PROBS: "(batch, top_k) float32, each row's best log_probs, best first",
                TOP_IDS: "(batch, top_k) int64, their vocabulary ids",
                EOS_LOG_PROBS: "(batch,) float32, each row's log-prob of EOS",
            },
        },
        # The CPU variants' step decoders (export/step_decoder.py): the decoder's outputs, other inputs.
        "step_decoder": {
            "inputs": {
                TOKENS: "(batch,) int64, batch = sentences x beam",
                PAST_LENGTH: "(1,) int32, cached positions of every row",
                BEAM_WIDTH: "(1,) int32",
                CACHE_INDIRECTION: "(sentences, beam, capacity) int32",
                "src_mask": "(sentences, src_len) bool",
                **{name: kv.format("capacity") + ", written in place" for name in past_names(n_layers)},
                **{name: "(sentences, n_heads, src_len, d_head)" for name in cross_names(n_layers)},
                VOCAB_IDS: "(vocab',) int64, required",
                TOP_K: "(1,) int64, required",
            },
        },
        "rows_decoder": {
            "inputs": {
                TOKENS: "(batch,) int64",
                SEQLENS_K: "(batch,) int32, each row's cached positions",
                TOTAL_LENGTH: "() int32, max(seqlens_k) + 1",
                "src_mask": "(batch, src_len) bool",
                **{name: kv.format("capacity") + ", written in place" for name in past_names(n_layers)},
                **{name: kv.format("src_len") for name in cross_names(n_layers)},
                VOCAB_IDS: "(vocab',) int64, required",
                TOP_K: "(1,) int64, required",
            },
        },
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_digest(directory: Path, names: list[str]) -> str:
    """One sha256 over the named files (name and content hash), e.g. a source checkpoint."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(f"{name}\0{sha256_file(directory / name)}\n".encode())
    return digest.hexdigest()


def _bundle_files(directory: Path) -> list[str]:
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return [name for name in files if name != MANIFEST]


def write_manifest(directory: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Hash every file already in `directory` and write manifest.json beside them."""
    files = {
        name: {"sha256": sha256_file(directory / name), "size": (directory / name).stat().st_size}
        for name in _bundle_files(directory)
    }
    manifest = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, **fields, "files": files}
    manifest[SELF_HASH] = content_hash(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def content_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own hash: guards manifest.json itself."""
    content = {k: v for k, v in manifest.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise BundleError(f"not a bundle: {path} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format is not {BUNDLE_FORMAT!r}")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise BundleError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this code reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path}: has no 'files' table")
    if manifest.get(SELF_HASH) != content_hash(manifest):
        raise BundleError(f"{path}: content does not match its {SELF_HASH} (the manifest was altered)")
    return manifest


def manifest_variants(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """manifest["variants"]; without one (version 1), the same built from the "graphs" table."""
    if isinstance(manifest.get("variants"), dict) and manifest["variants"]:
        return manifest["variants"]
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict):
        return {}
    variants = {
        "fp32": {
            "encoder": graphs.get("encoder", ENCODER),
            "decoder": graphs.get("decoder", DECODER),
            "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "kv_dtype": "float32",
        }
    }
    if "encoder_cpu" in graphs:
        variants["fp32-cpu"] = {
            "encoder": graphs["encoder_cpu"],
            "decoder": graphs.get("decoder_cpu"),
            "providers": ["CPUExecutionProvider"],
            "kv_dtype": "float32",
        }
    return variants


def _variant_problems(manifest: dict[str, Any]) -> list[str]:
    """Every graph a variant names must be a file the manifest lists (and so hashes)."""
    variants = manifest_variants(manifest)
    if not variants:
        return ["manifest has neither 'variants' nor 'graphs'"]
    problems = []
    for name, entry in sorted(variants.items()):
        if not isinstance(entry, dict):
            problems.append(f"variant {name}: not a table")
            continue
        problems += [
            f"variant {name}: {entry.get(role)!r} is not a file listed in the manifest"
            for role in ("encoder", "decoder")
            if not isinstance(entry.get(role), str) or entry[role] not in manifest["files"]
        ]
        for role in ("step_decoder", "rows_decoder"):  # optional
            step = entry.get(role)
            if step is not None and (not isinstance(step, str) or step not in manifest["files"]):
                problems.append(f"variant {name}: {role} {step!r} is not a file listed in the manifest")
    return problems


def shortlist_file(manifest: dict[str, Any]) -> str | None:
    """The vocabulary shortlist's file name, when the export wrote one (manifest["shortlist"]["file"])."""
    entry = manifest.get("shortlist")
    return entry.get("file") if isinstance(entry, dict) else None


def _shortlist_problems(manifest: dict[str, Any]) -> list[str]:
    name = shortlist_file(manifest)
    if name is None or (isinstance(name, str) and name in manifest["files"]):
        return []
    return [f"shortlist: {name!r} is not a file listed in the manifest"]


def verify_bundle(directory: str | Path) -> dict[str, Any]:
    """Recompute every file's size and sha256; raise once, naming every file that differs."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = _variant_problems(manifest) + _shortlist_problems(manifest)
    for name, entry in sorted(manifest["files"].items()):
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name}: not a path inside the bundle")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.get("size"):
            problems.append(f"{name}: size {path.stat().st_size} bytes, manifest says {entry.get('size')}")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 {sha256_file(path)} does not match the manifest ({entry.get('sha256')})")
    for name in sorted(set(_bundle_files(directory)) - set(manifest["files"])):
        problems.append(f"{name}: not listed in the manifest")
    if problems:
        raise BundleError(f"bundle {directory} failed verification:\n  " + "\n  ".join(problems))
    return manifest


def staging_dir(out_dir: Path, force: bool) -> Path:
    """A fresh directory beside `out_dir` to build the bundle in; refuses to overwrite."""
    if out_dir.exists() and not force:
        raise BundleError(f"{out_dir} already exists; pass force=True (--force) to replace it")
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # left over from an interrupted export of this same bundle
    staging.mkdir(parents=True)
    return staging


def swap_in(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished staging directory (never a half-written bundle)."""
    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
