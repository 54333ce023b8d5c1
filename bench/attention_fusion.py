"""Fused vs unfused attention on ONNX Runtime CPU, side by side in one run.

    nice -n 19 .venv/bin/python -m nmt.bench.attention_fusion [--threads 1] [--runs 30]

Exports a randomly initialised model of preset "small" (d_model 256) with each attention form
(export/fuse.py), optimizes each graph offline (ORT_ENABLE_EXTENDED) and times the encoder
(batch 32, src_len 24) and one decoder step (tgt_len 1, past_len 12), the forms taking turns
run by run. Prints a table of medians (and minima) in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from nmt.engine import bundle
from nmt.engine.runtime import session_options
from nmt.export import fuse
from nmt.export.export import export_graphs
from nmt.training.model import ModelConfig, Transformer, preset


def _session(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def _interleaved_ms(runs: dict[Any, Callable[[], object]], rounds: int) -> dict[Any, tuple[float, float]]:
    """Median and min ms per case; cases alternate each round, so background load hits all alike."""
    times: dict[Any, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def _cases(directory: Path, cfg: ModelConfig, threads: int) -> dict[str, Callable[[], object]]:
    """The encoder run and one decoder step (batch 32, src_len 24, past_len 12) of one form."""
    rng = np.random.default_rng(0)
    B, S, P, L = 32, 24, 12, cfg.n_decoder_layers
    src = rng.integers(4, cfg.vocab_size, (B, S)).astype(np.int64)
    mask = np.ones((B, S), bool)
    mask[::2, S - 5 :] = False  # half the rows padded, as in a real batch
    encoder = _session(directory / bundle.ENCODER_CPU, threads)
    decoder = _session(directory / bundle.DECODER_CPU, threads)
    feeds = {"src_ids": src, "src_mask": mask}
    cross = encoder.run(None, feeds)
    past = [rng.standard_normal((B, cfg.n_heads, P, cfg.d_head)).astype(np.float32) for _ in range(2 * L)]
    step = {
        "tgt_ids": rng.integers(4, cfg.vocab_size, (B, 1)).astype(np.int64),
        "src_mask": mask,
        **dict(zip(bundle.past_names(L), past)),
        **dict(zip(bundle.cross_names(L), cross)),
    }
    return {"encoder": lambda: encoder.run(None, feeds), "decoder": lambda: decoder.run(None, step)}


class _Attention(torch.nn.Module):
    """Just the attention call of model.py, to time the attention kernels alone."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _attention_cases(directory: Path, form: str, threads: int) -> dict[str, Callable[[], object]]:
    """Encoder self-attention (padding mask), decoder self-attention step (causal, past 12),
    cross-attention step: batch 32, 4 heads of 64, src_len 24."""
    rng = np.random.default_rng(0)
    x = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    padding = np.ones((32, 1, 1, 24), bool)
    padding[::2, ..., 19:] = False
    shapes = {
        "enc-self": (x(32, 4, 24, 64), x(32, 4, 24, 64), padding),
        "dec-self": (x(32, 4, 1, 64), x(32, 4, 13, 64), np.ones((1, 13), bool)),
        "cross": (x(32, 4, 1, 64), x(32, 4, 24, 64), padding),
    }
    cases = {}
    for name, (q, kv, mask) in shapes.items():
        path = directory / f"attention-{name}.onnx"
        args = tuple(torch.from_numpy(a) for a in (q, kv, kv, mask))
        with torch.no_grad():
            program = torch.onnx.export(
                _Attention(),
                args,
                dynamo=True,
                opset_version=fuse.opset_for(form),
                custom_translation_table=fuse.translation_table(form),
                verbose=False,
            )
        program.save(str(path))
        fuse.optimize_for_cpu(path, path)
        session = _session(path, threads)
        feeds = {i.name: a for i, a in zip(session.get_inputs(), (q, kv, kv, mask))}
        cases[name] = lambda session=session, feeds=feeds: session.run(None, feeds)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nmt.bench.attention_fusion", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--forms", default=",".join(fuse.ATTENTION_FORMS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(preset("small", vocab_size=8000, dropout=0.0)).eval()
    forms = args.forms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        cases: dict[Any, Callable[[], object]] = {}
        for form in forms:
            directory = Path(tmp) / form
            directory.mkdir()
            export_graphs(model, directory, form)
            for source, dest in ((bundle.ENCODER, bundle.ENCODER_CPU), (bundle.DECODER, bundle.DECODER_CPU)):
                fuse.optimize_for_cpu(directory / source, directory / dest)
            cases.update({(form, part): run for part, run in _cases(directory, model.cfg, args.threads).items()})
            cases.update({(form, part): run for part, run in _attention_cases(directory, form, args.threads).items()})
        result = _interleaved_ms(cases, args.runs)
    print(f"threads={args.threads}, {args.runs} rounds; median ms (min ms)")
    parts = ["encoder", "decoder", "enc-self", "dec-self", "cross"]
    print("| attention | encoder graph | decoder step | enc self-attn | dec self-attn | cross-attn |")
    print("|---|---|---|---|---|---|")
    for form in forms:
        cells = [f"{result[(form, part)][0]:.3f} ({result[(form, part)][1]:.3f})" for part in parts]
        print(f"| {form} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
