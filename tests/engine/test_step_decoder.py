"""The step decoder (export/step_decoder.py) and its in-place cache (engine/step_cache.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from model_fixtures import ONE_THREAD

from nmt.engine import bundle, step_cache
from nmt.engine.cache import HostCache
from nmt.engine.decoding import DecodeOptions, Decoder
from nmt.engine.runtime import Sessions, load_sessions
from nmt.engine.step_cache import StepCache
from nmt.export import step_decoder
from nmt.training.model import ModelConfig, Transformer


@pytest.mark.parametrize("beam", [1, 4])
def test_the_step_decoder_decodes_like_the_traced_decoder(
    sessions: Sessions, sources: list[list[int]], beam: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same hypotheses as HostCache over the traced graph, the buffers growing twice on the way
    (capacity 4 -> 8 -> 16) and sentences leaving at different steps."""
    monkeypatch.setattr(step_cache, "INITIAL_CAPACITY", 4)
    assert sessions.step is not None
    stepped, traced = Decoder(sessions), Decoder(sessions)
    traced._cache = HostCache
    assert stepped._cache is StepCache
    options = DecodeOptions(beam_size=beam, n_best=beam, max_len_extra=12)
    got, expected = stepped.search(sources, options), traced.search(sources, options)
    assert got.steps == expected.steps > 8
    assert [[h.tokens for h in hs] for hs in got.hypotheses] == [[h.tokens for h in hs] for hs in expected.hypotheses]
    for hs_got, hs_expected in zip(got.hypotheses, expected.hypotheses):
        assert [h.score for h in hs_got] == pytest.approx([h.score for h in hs_expected], abs=1e-4)


def test_the_runtime_opens_the_step_decoder_only_when_asked(server_bundle: Path) -> None:
    manifest = bundle.read_manifest(server_bundle)
    assert manifest["variants"]["fp32-cpu"]["step_decoder"] == bundle.STEP_DECODER_CPU
    off = load_sessions(server_bundle, replace(ONE_THREAD, step_decoder=False))
    assert off.step is None and Decoder(off)._cache is HostCache
    assert load_sessions(server_bundle, replace(ONE_THREAD, precision="int8")).step is not None


def _session(model: Transformer, tmp_path: Path) -> ort.InferenceSession:
    path = tmp_path / "step.onnx"
    step_decoder.export_step_decoder(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("pre_norm", [False, True])
def test_the_step_graph_follows_torch_through_beam_reordering(pre_norm: bool, tmp_path: Path) -> None:
    """Log-probs of 6 steps against torch's incremental decode, the beams reordered at random after each
    step: torch gathers its cache rows, the graph only rewrites cache_indirection."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        d_model=16,
        n_heads=2,
        d_ff=32,
        n_encoder_layers=1,
        n_decoder_layers=2,
        dropout=0.0,
        pre_norm=pre_norm,
    )
    model = Transformer(cfg).eval()
    session = _session(model, tmp_path)
    rng = np.random.default_rng(0)
    sentences, beam, capacity, L = 3, 2, 8, cfg.n_decoder_layers
    rows = sentences * beam
    src = torch.tensor(rng.integers(4, 50, (sentences, 5)))
    src_mask = torch.ones(sentences, 5, dtype=torch.bool)
    src_mask[0, 3:] = False
    with torch.no_grad():
        cross = model.cross_kv(model.encode(src, src_mask))
    repeated = [(k.repeat_interleave(beam, 0), v.repeat_interleave(beam, 0)) for k, v in cross]
    buffers = [np.zeros((rows, cfg.n_heads, capacity, cfg.d_head), np.float32) for _ in range(2 * L)]
    values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
    indirection = np.zeros((sentences, beam, capacity), np.int32)
    past, tokens = None, rng.integers(4, 50, rows)
    for t in range(6):
        with torch.no_grad():
            logits, past = model.decode(
                torch.tensor(tokens)[:, None], repeated, src_mask.repeat_interleave(beam, 0), past
            )
        expected = torch.log_softmax(logits[:, -1], dim=-1).numpy()
        feeds = {
            "tokens": tokens,
            "past_sequence_length": np.array([t], np.int32),
            "beam_width": np.array([beam], np.int32),
            "cache_indirection": indirection,
            "src_mask": src_mask.numpy(),
            bundle.VOCAB_IDS: np.arange(cfg.vocab_size),
            bundle.TOP_K: np.array([0]),
            **{name: value.numpy() for name, value in zip(bundle.cross_names(L), [x for kv in cross for x in kv])},
        }
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, present, value in zip(bundle.past_names(L), bundle.present_names(L), values):
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(present, value)
        binding.bind_output("log_probs")
        session.run_with_iobinding(binding)
        got = binding.get_outputs()[-1].numpy()
        assert np.abs(got - expected).max() < 1e-4, t
        origin = rng.integers(0, beam, (sentences, beam))
        order = torch.tensor((np.arange(sentences)[:, None] * beam + origin).ravel())
        past = [(k[order], v[order]) for k, v in past]
        indirection = np.take_along_axis(indirection, origin[:, :, None], axis=1)
        indirection[:, :, t] = origin
        tokens = rng.integers(4, 50, rows)


def test_the_manifest_states_the_step_decoders_inputs(server_bundle: Path) -> None:
    manifest = bundle.read_manifest(server_bundle)
    for role in ("step_decoder", "rows_decoder"):
        graph = ort.InferenceSession(
            str(server_bundle / manifest["variants"]["fp32-cpu"][role]), providers=["CPUExecutionProvider"]
        )
        assert [i.name for i in graph.get_inputs()] == list(manifest["interface"][role]["inputs"]), role
