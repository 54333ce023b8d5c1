"""torch -> ONNX: a checkpoint becomes a bundle with an encoder and a decoder graph.

encoder.onnx  (src_ids, src_mask) -> cross-attention keys/values of every decoder layer,
              computed once per sentence (model.cross_kv(model.encode(...))).
decoder.onnx  one graph for every step, the first included (past_len 0, no If node):
              (tgt_ids, src_mask, past keys/values, cross keys/values, past_mask)
              -> (log-probabilities at the last position, present keys/values).
              It returns log-probs, not logits: both greedy and beam search need them.
              past_mask (batch, past_len + tgt_len) marks each row's real keys, so rows that
              joined a running batch at different steps share one cache (continuous batching).
              Optional inputs vocab_ids and top_k (defaults: every id, 0) and outputs top_log_probs,
              top_ids, eos_log_probs: the output head of export/decoder_head.py.

Named dynamic axes: batch, src_len, tgt_len, past_len. Attention is fused (export/fuse.py).

export_checkpoint then builds the other variants from these two graphs (export/variants.py:
fp32-cpu, int8-cpu, fp16-cuda), checks the parity of each (export/validate.py) and writes
manifest.json (engine/bundle.py), all in a staging directory that replaces the bundle only at
the end. A tqdm bar on stderr follows the steps (ExportOptions.progress, terminals only).
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import onnx
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm

from nmt.engine import bundle
from nmt.training.checkpoint import CONFIG, WEIGHTS, LoadedCheckpoint, load_checkpoint
from nmt.training.model import KV, Transformer

from . import decoder_head, fuse, step_decoder
from . import shortlist as shortlist_
from . import variants as variants_
from .validate import ParityRun, parity_set

# Example sizes for tracing: all different and >= 2, so no axis is specialized or merged.
EXAMPLE_BATCH, EXAMPLE_SRC, EXAMPLE_TGT, EXAMPLE_PAST = 3, 7, 2, 5


class ExportError(RuntimeError):
    """The export itself failed (not the user's input)."""


@dataclass(frozen=True)
class ExportOptions:
    attention: str = fuse.DEFAULT_FORM  # one of fuse.ATTENTION_FORMS
    variants: tuple[str, ...] = variants_.VARIANTS  # fp32 always; see export/variants.py
    validate: bool = True  # parity of every variant before the bundle is swapped in
    sentences: tuple[str, ...] | None = None  # parity sources; None: Multi30k or the built-in ones
    data_dir: str | Path | None = None  # Multi30k directory for the parity set; None: $NMT_DATA_DIR
    parity_limit: int | None = None  # only the first N parity sentences
    max_len_extra: int = 50  # greedy length limit during the parity check
    progress: bool = False  # a progress bar on stderr (only when it is a terminal)
    shortlist: bool = True  # build shortlist.npz when a training corpus is found (export/shortlist.py)
    shortlist_corpus: tuple[str, str] | None = None  # (source, target) files; None: Multi30k train in data_dir

    def __post_init__(self) -> None:
        if self.attention not in fuse.ATTENTION_FORMS:
            forms = ", ".join(fuse.ATTENTION_FORMS)
            raise ValueError(f"unknown attention form {self.attention!r}; choose one of {forms}")
        variants_.check_variants(self.variants)
        if self.max_len_extra < 1:
            raise ValueError(f"max_len_extra must be at least 1, got {self.max_len_extra}")
        if self.parity_limit is not None and self.parity_limit < 1:
            raise ValueError(f"parity_limit must be at least 1, got {self.parity_limit}")


class Progress:
    """One tqdm bar over the export steps, on stderr; off when disabled or stderr is no terminal."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None):
        stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and stream.isatty()
        self.bar = tqdm(
            total=total, desc="export", unit="step", file=stream, disable=not self.enabled, dynamic_ncols=True
        )

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.bar.set_description_str(label)
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _pairs(flat: list[torch.Tensor]) -> list[KV]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


class EncoderGraph(nn.Module):
    """What encoder.onnx computes: cross-attention K/V per decoder layer, flattened."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> list[torch.Tensor]:
        memory = self.model.encode(src_ids, src_mask)  # (B, S, d_model)
        return [t for kv in self.model.cross_kv(memory) for t in kv]  # each (B, H, S, d_head)


class DecoderGraph(nn.Module):
    """What decoder.onnx computes: one step (or several tokens) after a cached past."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(
        self,
        tgt_ids: torch.Tensor,
        src_mask: torch.Tensor,
        past: list[torch.Tensor],
        cross: list[torch.Tensor],
        past_mask: torch.Tensor,
        vocab_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states, present = self.model.decoder_states(tgt_ids, _pairs(cross), src_mask, _pairs(past), past_mask)
        log_probs = decoder_head.log_probs(self.model, states[:, -1], vocab_ids)  # (B, V'); top-k: add_top_k
        return log_probs, [t for kv in present for t in kv]


def _example_inputs(model: Transformer) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
    """Encoder and decoder example inputs for tracing."""
    cfg = model.cfg
    generator = torch.Generator().manual_seed(0)
    B, S, T, P = EXAMPLE_BATCH, EXAMPLE_SRC, EXAMPLE_TGT, EXAMPLE_PAST
    src = torch.randint(4, cfg.vocab_size, (B, S), generator=generator)
    src_mask = torch.ones(B, S, dtype=torch.bool)
    src_mask[0, S - 2 :] = False
    kv = lambda n: torch.randn(B, cfg.n_heads, n, cfg.d_head, generator=generator)  # noqa: E731
    n = 2 * cfg.n_decoder_layers
    tgt = torch.randint(4, cfg.vocab_size, (B, T), generator=generator)
    past_mask = torch.ones(B, P + T, dtype=torch.bool)
    past_mask[1, : P - 2] = False  # a row that joined later: padded cache slots in front
    return (src, src_mask), (
        tgt,
        src_mask,
        [kv(P) for _ in range(n)],
        [kv(S) for _ in range(n)],
        past_mask,
        decoder_head.example_vocab_ids(cfg.vocab_size),
    )


def _export(
    module: nn.Module,
    args: tuple[Any, ...],
    dynamic_shapes: tuple[Any, ...],
    names: tuple[list[str], list[str]],
    form: str,
    path: Path,
) -> onnx.ModelProto:
    """One torch.onnx.export (dynamo) call, saved as a single file."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" per op
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # axis-renaming and deprecation chatter
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamic_shapes=dynamic_shapes,
                input_names=names[0],
                output_names=names[1],
                opset_version=fuse.opset_for(form),
                custom_translation_table=fuse.translation_table(form),
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; keep the cause
        raise ExportError(f"torch.onnx.export failed for {path.name}: {e}") from e
    assert program is not None
    program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return model


def _axes() -> dict[str, Any]:
    """The named dynamic axes; one Dim object per name, shared by every input that has it."""
    return {name: torch.export.Dim(name) for name in ("batch", "src_len", "tgt_len", "past_len")}


def _total_len(axes: dict[str, Any]) -> Any:
    """past_len + tgt_len, the width of past_mask: a sum of two dims cannot be declared, so the
    exporter infers it (the mask must broadcast against the keys)."""
    return torch.export.Dim.AUTO


def _name_axis(model: onnx.ModelProto, input_name: str, axis: int, name: str, path: Path) -> None:
    """Give an inferred (Dim.AUTO) axis of a graph input its name, and save the graph again."""
    value = next(i for i in model.graph.input if i.name == input_name)
    value.type.tensor_type.shape.dim[axis].dim_param = name
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_encoder(model: Transformer, path: Path, attention: str = fuse.DEFAULT_FORM) -> onnx.ModelProto:
    """encoder.onnx: (src_ids, src_mask) -> cross K/V per decoder layer; fusion asserted."""
    (src, src_mask), _ = _example_inputs(model)
    axes = _axes()
    seq = {0: axes["batch"], 1: axes["src_len"]}
    names = (bundle.encoder_inputs(), bundle.cross_names(model.cfg.n_decoder_layers))
    encoder = _export(EncoderGraph(model), (src, src_mask), (seq, seq), names, attention, path)
    fuse.check_fused(encoder, attention, model.cfg.n_encoder_layers, path.name)
    return encoder


def export_decoder(model: Transformer, path: Path, attention: str = fuse.DEFAULT_FORM) -> onnx.ModelProto:
    """decoder.onnx: one step after a cached past (past_len may be 0); fusion asserted."""
    _, args = _example_inputs(model)
    axes, L = _axes(), model.cfg.n_decoder_layers
    kv_past, kv_src = {0: axes["batch"], 2: axes["past_len"]}, {0: axes["batch"], 2: axes["src_len"]}
    shapes = (
        {0: axes["batch"], 1: axes["tgt_len"]},
        {0: axes["batch"], 1: axes["src_len"]},
        [kv_past] * 2 * L,
        [kv_src] * 2 * L,
        {0: axes["batch"], 1: _total_len(axes)},
        {0: torch.export.Dim("vocab")},
    )
    names = ([*bundle.decoder_inputs(L), bundle.VOCAB_IDS], bundle.decoder_outputs(L))
    decoder = _export(DecoderGraph(model), args, shapes, names, attention, path)
    _name_axis(decoder, bundle.PAST_MASK, 1, "past_len + tgt_len", path)  # the exporter's own name: "s22"
    decoder_head.add_top_k(decoder, model.cfg.vocab_size)
    onnx.save(decoder, str(path))
    fuse.check_fused(decoder, attention, 2 * L, path.name)
    return decoder


def export_graphs(model: Transformer, out_dir: Path, attention: str = fuse.DEFAULT_FORM) -> dict[str, onnx.ModelProto]:
    """Write encoder.onnx and decoder.onnx into `out_dir`."""
    return {
        bundle.ENCODER: export_encoder(model, out_dir / bundle.ENCODER, attention),
        bundle.DECODER: export_decoder(model, out_dir / bundle.DECODER, attention),
    }


def export_checkpoint(
    checkpoint_dir: str | Path, out_dir: str | Path, force: bool = False, options: ExportOptions | None = None
) -> dict[str, Any]:
    """Export a training checkpoint to a bundle directory with every selected variant; returns
    the manifest. Nothing is written to `out_dir` unless every step (parity included) passed."""
    options = options or ExportOptions()
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    staging = bundle.staging_dir(out_dir, force)  # refuses before any work is done
    on_cpu = variants_.FP32_CPU in options.variants or variants_.INT8_CPU in options.variants  # step decoders
    n_steps = 3 + variants_.steps(options.variants) + on_cpu + (len(options.variants) if options.validate else 0)
    progress = Progress(n_steps, options.progress)
    try:
        loaded = load_checkpoint(checkpoint_dir)
        cfg = loaded.model.eval().cfg
        with progress.step("export encoder"):
            export_encoder(loaded.model, staging / bundle.ENCODER, options.attention)
        with progress.step("export decoder"):
            export_decoder(loaded.model, staging / bundle.DECODER, options.attention)
        if on_cpu:
            with progress.step("write step decoders"):
                step_decoder.export_step_decoder(loaded.model, staging / bundle.STEP_DECODER)
                step_decoder.export_step_decoder(loaded.model, staging / bundle.ROWS_DECODER, per_row=True)
        counts = variants_.FusionCounts(options.attention, cfg.n_encoder_layers, 2 * cfg.n_decoder_layers)
        variants_.build(staging, options.variants, counts, progress.step)
        shutil.copyfile(checkpoint_dir / loaded.config["tokenizer"], staging / bundle.TOKENIZER)
        shortlist = _shortlist(loaded, staging, options)
        parity = _parity(loaded, staging, options, progress) if options.validate else {"checked": False}
        with progress.step("write manifest"):
            fields = _manifest_fields(loaded, checkpoint_dir, options, parity, staging)
            manifest = bundle.write_manifest(staging, {**fields, "shortlist": shortlist})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the error itself is re-raised below
        raise
    finally:
        progress.close()
    bundle.swap_in(staging, out_dir)
    return manifest


def _shortlist(loaded: LoadedCheckpoint, staging: Path, options: ExportOptions) -> dict[str, Any]:
    """shortlist.npz from the training corpus; manifest["shortlist"] (or why there is none)."""
    if not options.shortlist:
        return {"skipped": "disabled (--no-shortlist)"}
    config = loaded.config
    return shortlist_.write(
        staging,
        loaded.tokenizer,
        loaded.model.cfg.vocab_size,
        config["src_lang"],
        config["tgt_lang"],
        options.shortlist_corpus,
        options.data_dir,
    )


def _parity(loaded: LoadedCheckpoint, staging: Path, options: ExportOptions, progress: Progress) -> dict[str, Any]:
    """Every variant written, exact ones against torch, the others against fp32; one error for all."""
    config = loaded.config
    found = parity_set(
        config["src_lang"], config["tgt_lang"], options.sentences, options.data_dir, options.parity_limit
    )
    run = ParityRun(loaded.model, loaded.tokenizer, found, options.max_len_extra)
    for name in options.variants:
        spec = variants_.SPECS[name]
        with progress.step(f"parity {name}"):
            encoder, decoder = staging / spec.encoder, staging / spec.decoder
            step, rows = spec.path("step_decoder", staging), spec.path("rows_decoder", staging)
            if spec.exact:
                run.check_exact(name, encoder, decoder, step, rows)
            else:
                run.check_approximate(name, encoder, decoder, list(spec.providers), step, rows)
    run.raise_if_failed()
    return run.summary()


def _validated(name: str, parity: dict[str, Any]) -> dict[str, Any]:
    """The short parity verdict stored with each variant (the details are in manifest["parity"])."""
    if not parity["checked"]:
        return {"skipped": "parity check disabled (--no-validate)"}
    result = parity["variants"][name]
    keys = ("skipped", "checked_against", "provider", "greedy_identical", "bleu", "bleu_loss")
    verdict = {key: result[key] for key in keys if key in result}
    for role in ("step_decoder", "rows_decoder"):
        if role in result:
            verdict[role] = {key: result[role][key] for key in keys if key in result[role]}
    return verdict


def _manifest_fields(
    loaded: LoadedCheckpoint, checkpoint_dir: Path, options: ExportOptions, parity: dict[str, Any], staging: Path
) -> dict[str, Any]:
    cfg = loaded.model.cfg
    return {
        "model": cfg.to_dict(),
        "src_lang": loaded.config["src_lang"],
        "tgt_lang": loaded.config["tgt_lang"],
        "special_ids": loaded.config["special_ids"],
        "tokenizer": bundle.TOKENIZER,
        "inference": loaded.inference.to_dict(),
        "variants": {
            name: {**variants_.SPECS[name].manifest_entry(staging), "validated": _validated(name, parity)}
            for name in options.variants
        },
        "interface": bundle.graph_spec(cfg.n_decoder_layers),
        "attention": options.attention,
        "opset": fuse.opset_for(options.attention),
        "versions": {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__},
        "source_checkpoint": {
            "path": str(checkpoint_dir),
            "sha256": bundle.directory_digest(checkpoint_dir, [WEIGHTS, CONFIG, loaded.config["tokenizer"]]),
        },
        "parity": parity,
    }
