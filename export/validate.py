"""Parity of the exported variants against the torch model, on a parity set of real sentences.

The parity set is Multi30k test_2016_flickr (source side, with its references) when Multi30k
is at hand (--data-dir or $NMT_DATA_DIR), else a few built-in sentences (no references).

Exact variants (fp32, fp32-cpu; run on the CPU provider):
- log-probabilities and cross-attention K/V within TOLERANCE (max absolute difference) on the
  first TOLERANCE_SENTENCES sentences: encoder outputs; the decoder fed one token at a time
  through the KV cache from an empty past; the whole prefix at once (past_len 0, tgt_len > 1);
  decoders with past_mask (format 3): one token at a time behind masked cache slots of garbage,
  as rows that joined a running batch late (continuous batching);
- greedy search over the graphs (the server's engine, engine/decoding.py) gives exactly torch's
  greedy_search tokens on at least MIN_IDENTICAL of the parity set. Every differing sentence is
  recorded, failing or not.
Approximate variants (int8-cpu, fp16-cuda; run on their own providers, skipped without them):
- greedy output compared with the fp32 graphs' greedy output: the identical fraction is
  recorded, and with references, cased sacreBLEU of both; more than MAX_BLEU_LOSS lost fails.
Greedy runs in batches of BATCH_SIZE sentences of similar length, torch and ONNX alike. Every
problem of every variant is collected, and one ParityError lists them all.

The summary also stores a reference for the server's start-up check (engine/selfcheck.py) of a
variant skipped here, e.g. fp16-cuda without a GPU: REFERENCE_SENTENCES of the first
REFERENCE_CANDIDATES sentences with torch's greedy token ids, those whose smallest gap between the
best and the second-best log-probability along the output is widest (fp16 rounding cannot flip them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import sacrebleu
import torch
import torch.nn.functional as F

from nmt.engine import bundle
from nmt.engine.decoding import DecodeOptions, Decoder
from nmt.engine.hypothesis import blocked_tokens
from nmt.engine.runtime import CPU, RuntimeConfig, Sessions, open_sessions, session_options
from nmt.training.data import MULTI30K_SPLITS, multi30k
from nmt.training.model import Transformer
from nmt.training.search import greedy_search, pad_batch
from nmt.training.tokenizer import BOS_ID, EOS_ID, Tokenizer

TOLERANCE = 1e-4  # fp32, max absolute difference of log-probs and cross K/V
TOLERANCE_SENTENCES = 5
MIN_IDENTICAL = 0.99  # fraction of greedy outputs equal to torch's (exact variants)
MAX_BLEU_LOSS = 0.3  # BLEU an approximate variant may lose against the fp32 graphs
BATCH_SIZE = 64
PARITY_SPLIT = "test_2016_flickr"
REFERENCE_CANDIDATES = 64  # parity sentences considered for the start-up reference
REFERENCE_SENTENCES = 4

DEFAULT_SENTENCES: dict[str, list[str]] = {
    "en": [
        "A man in an orange hat starring at something.",
        "Two young, White males are outside near many bushes.",
        "A little girl climbing into a wooden playhouse.",
        "Several men in hard hats are operating a giant pulley system.",
        "A dog runs through the grass.",
    ],
    "de": [
        "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
        "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
        "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
        "Mehrere Männer mit Schutzhelmen bedienen ein Antriebsradsystem.",
        "Ein Hund rennt durch das Gras.",
    ],
}


class ParityError(RuntimeError):
    """The exported graphs disagree with the torch model; the message lists every mismatch."""


@dataclass(frozen=True)
class ParitySet:
    name: str
    sources: tuple[str, ...]
    references: tuple[str, ...] | None = None  # target side, for BLEU


def parity_set(
    src_lang: str,
    tgt_lang: str,
    sentences: tuple[str, ...] | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
) -> ParitySet:
    """Given sentences, else Multi30k test_2016_flickr when a data directory is known, else built-in."""
    data_dir = data_dir or os.environ.get("NMT_DATA_DIR")
    langs = MULTI30K_SPLITS[PARITY_SPLIT]
    if sentences:
        found = ParitySet("given sentences", tuple(sentences))
    elif data_dir and src_lang in langs and tgt_lang in langs:
        corpus = multi30k(PARITY_SPLIT, src_lang, tgt_lang, data_dir)
        found = ParitySet(f"multi30k {PARITY_SPLIT}", tuple(corpus.src), tuple(corpus.tgt))
    else:
        found = ParitySet("built-in sentences", tuple(DEFAULT_SENTENCES.get(src_lang, DEFAULT_SENTENCES["en"])))
    if limit is None:
        return found
    refs = found.references[:limit] if found.references is not None else None
    return ParitySet(found.name, found.sources[:limit], refs)


def cpu_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=[CPU])


class OnnxGraphs:
    """The encoder and decoder sessions, fed by name (bundle.py declares the names): the
    step-by-step access the log-prob checks need (the greedy search is the server's)."""

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, n_layers: int):
        self.encoder, self.decoder, self.n_layers = encoder, decoder, n_layers
        past_key = {i.name: i for i in decoder.get_inputs()}[bundle.past_names(n_layers)[0]]
        _, n_heads, _, d_head = past_key.shape  # (batch, n_heads, past_len, d_head)
        self.n_heads, self.d_head = int(n_heads), int(d_head)
        self.kv_dtype = np.float16 if past_key.type == "tensor(float16)" else np.float32
        self.takes_past_mask = bundle.takes_past_mask([i.name for i in decoder.get_inputs()])

    @classmethod
    def of(cls, sessions: Sessions) -> OnnxGraphs:
        return cls(sessions.encoder, sessions.decoder, sessions.n_layers)

    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> list[np.ndarray]:
        return self.encoder.run(bundle.cross_names(self.n_layers), {"src_ids": src_ids, "src_mask": src_mask})

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_heads, 0, self.d_head), self.kv_dtype) for _ in range(2 * self.n_layers)]

    def step(
        self,
        tgt_ids: np.ndarray,
        src_mask: np.ndarray,
        past: list[np.ndarray],
        cross: list[np.ndarray],
        past_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """-> log-probs (B, V) at the last position, present K/V. past_mask None: every slot is real."""
        L = self.n_layers
        feeds = {
            "tgt_ids": tgt_ids,
            "src_mask": src_mask,
            **dict(zip(bundle.past_names(L), past)),
            **dict(zip(bundle.cross_names(L), cross)),
        }
        if self.takes_past_mask:
            width = past[0].shape[2] + tgt_ids.shape[1]
            feeds[bundle.PAST_MASK] = np.ones((len(tgt_ids), width), bool) if past_mask is None else past_mask
        log_probs, *present = self.decoder.run(bundle.decoder_outputs(L), feeds)
        return log_probs, present


def open_graphs(
    encoder: Path, decoder: Path, provider: str = CPU, step: Path | None = None, rows: Path | None = None
) -> Sessions:
    """The server's sessions for one graph pair (one intra-op thread: the checks share the cores);
    with `step`, its search runs the step decoder (export/step_decoder.py) instead of `decoder`, with
    `rows`, its continuous batching the per-row one."""
    return open_sessions(
        encoder,
        decoder,
        provider,
        RuntimeConfig(intra_op_threads=1, per_row_decoder=True),
        step_path=step,
        rows_path=rows,
    )


LABELS = {"step_decoder": "step decoder", "rows_decoder": "per-row decoder"}  # in problem lines


def _in_place_decoders(
    encoder: Path, decoder: Path, step: Path | None, rows: Path | None
) -> Iterator[tuple[str, Path, Callable, Sessions]]:
    """(manifest role, graph, greedy search that runs it, sessions) of each step decoder given: the step
    decoder through the static search, the per-row one through continuous batching."""
    if step is not None:
        yield "step_decoder", step, graph_greedy, open_graphs(encoder, decoder, step=step)
    if rows is not None:
        yield "rows_decoder", rows, running_greedy, open_graphs(encoder, decoder, rows=rows)


LATE_JOIN_STEPS = 3  # running_greedy: the second half of a batch joins after this many steps


def running_greedy(sessions: Sessions, sources: list[list[int]], max_len_extra: int) -> list[list[int]]:
    """Greedy through continuous batching (engine/continuous.py), in in_batches' batches: half of each
    batch joins LATE_JOIN_STEPS steps after the other, so rows decode at different lengths."""
    from nmt.engine.continuous import RunningBatch

    options = DecodeOptions(1, max_len_extra=max_len_extra)

    def search(batch: list[list[int]]) -> list[list[int]]:
        running, found = RunningBatch(sessions), {}
        jobs = [(i, source, options) for i, source in enumerate(batch)]
        early, late = jobs[: (len(jobs) + 1) // 2], jobs[(len(jobs) + 1) // 2 :]
        running.admit(early)
        steps = 0
        while len(running) or late:
            if late and (steps == LATE_JOIN_STEPS or not len(running)):
                running.admit(late)
                late = []
            found.update((key, hyps[0].tokens) for key, hyps in running.step())
            steps += 1
        return [found[i] for i in range(len(batch))]

    return in_batches(search, sources)


def graph_greedy(sessions: Sessions, sources: list[list[int]], max_len_extra: int) -> list[list[int]]:
    """The server's greedy search over the graphs, in the same batches as in_batches makes for torch."""
    result = Decoder(sessions, max_batch_rows=BATCH_SIZE).search(sources, DecodeOptions(1, max_len_extra=max_len_extra))
    return [hyps[0].tokens for hyps in result.hypotheses]


def in_batches(
    search: Callable[[list[list[int]]], list[list[int]]], sources: list[list[int]], batch_size: int = BATCH_SIZE
) -> list[list[int]]:
    """Run `search` on batches of similar length; outputs in input order."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    outputs: list[list[int]] = [[] for _ in sources]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, tokens in zip(chunk, search([sources[i] for i in chunk])):
            outputs[i] = tokens
    return outputs


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a - b.numpy()).max()) if a.size else 0.0


@torch.no_grad()
def log_prob_diffs(
    model: Transformer, graphs: OnnxGraphs, sources: list[list[int]], targets: list[list[int]]
) -> dict[str, float]:
    """Max abs differences: cross K/V, incremental log-probs, whole-prefix log-probs, and (past_mask)
    incremental log-probs of rows that joined late."""
    src, src_mask = pad_batch([s + [EOS_ID] for s in sources])
    tgt, _ = pad_batch([[BOS_ID] + t for t in targets])  # pads decode harmlessly: both sides see them
    cross_ref = model.cross_kv(model.encode(src, src_mask))
    logits, _ = model.decode(tgt, cross_ref, src_mask)
    ref = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    cross = graphs.encode(src.numpy(), src_mask.numpy())
    diffs = {"cross_kv": max(_max_diff(c, r) for c, r in zip(cross, (t for kv in cross_ref for t in kv)))}
    past, step_diff = graphs.empty_past(len(sources)), 0.0
    for t in range(tgt.shape[1]):
        log_probs, past = graphs.step(tgt[:, t : t + 1].numpy(), src_mask.numpy(), past, cross)
        step_diff = max(step_diff, _max_diff(log_probs, ref[:, t]))
    diffs["log_probs_incremental"] = step_diff
    whole, _ = graphs.step(tgt.numpy(), src_mask.numpy(), graphs.empty_past(len(sources)), cross)
    diffs["log_probs_whole_prefix"] = _max_diff(whole, ref[:, -1])
    if graphs.takes_past_mask:
        diffs["log_probs_joined_late"] = _joined_late_diff(graphs, tgt.numpy(), src_mask.numpy(), cross, ref)
    return diffs


JOINED_LATE_SLOTS = 3  # masked cache slots in front of the rows, as when they join a running batch


def _joined_late_diff(
    graphs: OnnxGraphs, tgt: np.ndarray, src_mask: np.ndarray, cross: list[np.ndarray], ref: torch.Tensor
) -> float:
    """Incremental decoding behind masked slots of garbage (continuous batching) against torch."""
    shape = (len(tgt), graphs.n_heads, JOINED_LATE_SLOTS, graphs.d_head)
    past = [np.ones(shape, graphs.kv_dtype) for _ in range(2 * graphs.n_layers)]  # garbage under the mask
    mask, diff = np.zeros((len(tgt), JOINED_LATE_SLOTS), bool), 0.0
    for t in range(tgt.shape[1]):
        mask = np.concatenate([mask, np.ones((len(tgt), 1), bool)], axis=1)
        log_probs, past = graphs.step(tgt[:, t : t + 1], src_mask, past, cross, mask)
        diff = max(diff, _max_diff(log_probs, ref[:, t]))
    return diff


@torch.no_grad()
def greedy_margins(
    model: Transformer, sources: list[list[int]], outputs: list[list[int]], max_len_extra: int
) -> list[float]:
    """Per greedy output: the smallest gap between torch's best and second-best log-prob over the steps
    the search chose (EOS too, unless forced at the length limit); -inf where a choice was not the best."""
    src, src_mask = pad_batch([s + [EOS_ID] for s in sources])
    tgt, _ = pad_batch([[BOS_ID] + t for t in outputs])  # pads decode harmlessly: causal attention
    logits, _ = model.decode(tgt, model.cross_kv(model.encode(src, src_mask)), src_mask)
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    for i, tokens in enumerate(outputs):  # the search's repetition guard: blocked tokens are no choice
        for t in range(len(tokens) + 1):
            if blocked := blocked_tokens(tokens[:t]):
                log_probs[i, t, blocked] = float("-inf")
    top2 = log_probs.topk(2, dim=-1)  # (B, T, 2)
    margins = []
    for i, (source, tokens) in enumerate(zip(sources, outputs)):
        chosen = tokens if len(tokens) + 1 >= len(source) + max_len_extra else [*tokens, EOS_ID]
        values, best = top2.values[i, : len(chosen)], top2.indices[i, : len(chosen), 0]
        agrees = best.tolist() == chosen
        margins.append(float((values[:, 0] - values[:, 1]).min()) if agrees else float("-inf"))
    return margins


def greedy_verdict(
    expected: list[list[int]],
    got: list[list[int]],
    sources: tuple[str, ...],
    detokenize: Callable[[list[list[int]]], list[str]],
    min_identical: float = MIN_IDENTICAL,
) -> tuple[dict[str, Any], list[str]]:
    """-> (summary with every differing sentence, problems: empty unless below min_identical)."""
    differ = [i for i, (e, g) in enumerate(zip(expected, got, strict=True)) if e != g]
    texts_e, texts_g = detokenize([expected[i] for i in differ]), detokenize([got[i] for i in differ])
    mismatches = [
        {"index": i, "source": sources[i], "torch": e, "onnx": g} for i, e, g in zip(differ, texts_e, texts_g)
    ]
    fraction = 1 - len(differ) / len(expected)
    summary = {"greedy_identical": round(fraction, 4), "mismatches": mismatches}
    if fraction >= min_identical:
        return summary, []
    header = (
        f"greedy: {len(expected) - len(differ)} of {len(expected)} outputs identical to torch "
        f"({100 * fraction:.1f}%, below {100 * min_identical:g}%)"
    )
    lines = [
        f"greedy output differs for sentence {m['index']} ({m['source']!r}): torch {expected[m['index']]} "
        f"{m['torch']!r}, onnx {got[m['index']]} {m['onnx']!r}"
        for m in mismatches
    ]
    return summary, [header, *lines]


def _provider_label(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


class ParityRun:
    """Checks variants one by one against torch (exact) or the fp32 graphs (approximate),
    collecting every problem; `raise_if_failed` raises one ParityError listing them all."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, parity: ParitySet, max_len_extra: int):
        if not parity.sources:
            raise ValueError("validate needs at least one sentence")
        self.model, self.tokenizer, self.parity = model.eval(), tokenizer, parity
        self.max_len_extra = max_len_extra
        self.sources = tokenizer.encode(list(parity.sources))
        self.n_layers = model.cfg.n_decoder_layers
        self._torch: list[list[int]] | None = None
        self._baseline: tuple[str, list[list[int]], float | None] | None = None  # first exact variant
        self.problems: list[str] = []
        self.results: dict[str, dict[str, Any]] = {}
        self._scorer = sacrebleu.metrics.BLEU()  # cased, 13a: sacreBLEU's default, as nmt-eval

    def torch_outputs(self) -> list[list[int]]:
        if self._torch is None:
            search = lambda batch: [h.tokens for h in greedy_search(self.model, batch, self.max_len_extra)]  # noqa: E731
            self._torch = in_batches(search, self.sources)
        return self._torch

    def _bleu_of(self, outputs: list[list[int]]) -> float | None:
        refs = self.parity.references
        if refs is None:
            return None
        return self._scorer.corpus_score(self.tokenizer.decode(outputs), [list(refs)]).score

    def check_exact(
        self, name: str, encoder: Path, decoder: Path, step: Path | None = None, rows: Path | None = None
    ) -> dict[str, Any]:
        """Tolerance on log-probs and cross K/V, and greedy tokens against torch (CPU provider); with a
        step decoder, its greedy tokens against torch too (summary["step_decoder"]), with a per-row
        one, its greedy through continuous batching, rows joining late (summary["rows_decoder"])."""
        sessions = open_graphs(encoder, decoder)
        expected, got = self.torch_outputs(), graph_greedy(sessions, self.sources, self.max_len_extra)
        summary, problems = greedy_verdict(expected, got, self.parity.sources, self.tokenizer.decode)
        for role, path, search, sessions_in_place in _in_place_decoders(encoder, decoder, step, rows):
            found = search(sessions_in_place, self.sources, self.max_len_extra)
            summary[role], found_problems = greedy_verdict(expected, found, self.parity.sources, self.tokenizer.decode)
            problems += [f"{LABELS[role]} {path.name}: {problem}" for problem in found_problems]
        n = TOLERANCE_SENTENCES
        graphs = OnnxGraphs.of(sessions)
        diffs = log_prob_diffs(self.model, graphs, self.sources[:n], expected[:n])
        problems += [
            f"{check}: max abs diff {value:.3g} > {TOLERANCE:g}" for check, value in diffs.items() if value > TOLERANCE
        ]
        bleu = self._bleu_of(got)
        if self._baseline is None:
            self._baseline = (name, got, bleu)
        summary = {
            "checked_against": "torch",
            "provider": "CPUExecutionProvider",
            "max_abs_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()},
            **({} if bleu is None else {"bleu": round(bleu, 2)}),
            **summary,
        }
        return self._record(name, summary, problems)

    def check_approximate(
        self,
        name: str,
        encoder: Path,
        decoder: Path,
        providers: list[str],
        step: Path | None = None,
        rows: Path | None = None,
    ) -> dict[str, Any]:
        """Greedy output and BLEU against the first exact variant's; skipped without the provider.
        With a step decoder, the same for its greedy output (summary["step_decoder"])."""
        assert self._baseline is not None, "check an exact variant (fp32) first"
        available = [p for p in providers if p in ort.get_available_providers()]
        if not available:
            # nmt-serve checks summary()["reference"] when it starts on that provider (engine/selfcheck.py).
            return self._record(name, {"skipped": f"no {_provider_label(providers[0])} execution provider"}, [])
        summary, problems = self._against_baseline(open_graphs(encoder, decoder, available[0]))
        summary = {"provider": available[0], **summary}
        for role, path, search, sessions_in_place in _in_place_decoders(encoder, decoder, step, rows):
            summary[role], found_problems = self._against_baseline(sessions_in_place, search)
            problems += [f"{LABELS[role]} {path.name}: {problem}" for problem in found_problems]
        return self._record(name, summary, problems)

    def _against_baseline(
        self, sessions: Sessions, search: Callable = graph_greedy
    ) -> tuple[dict[str, Any], list[str]]:
        """Greedy output of `sessions` (by `search`: graph_greedy or running_greedy): identical fraction
        and BLEU against the first exact variant's."""
        assert self._baseline is not None
        base_name, base, base_bleu = self._baseline
        got = search(sessions, self.sources, self.max_len_extra)
        same = sum(a == b for a, b in zip(got, base)) / len(got)
        summary: dict[str, Any] = {"checked_against": base_name, "greedy_identical": round(same, 4)}
        problems = []
        bleu = self._bleu_of(got)
        if bleu is not None and base_bleu is not None:
            loss = base_bleu - bleu
            summary.update(bleu=round(bleu, 2), reference_bleu=round(base_bleu, 2), bleu_loss=round(loss, 2))
            if loss > MAX_BLEU_LOSS:
                problems.append(
                    f"BLEU {bleu:.2f} is {loss:.2f} below {base_name}'s {base_bleu:.2f} "
                    f"(at most {MAX_BLEU_LOSS:g} may be lost)"
                )
        return summary, problems

    def _record(self, name: str, summary: dict[str, Any], problems: list[str]) -> dict[str, Any]:
        self.results[name] = summary
        self.problems += [f"{name}: {problem}" for problem in problems]
        return summary

    def summary(self) -> dict[str, Any]:
        refs = self.parity.references
        return {
            "checked": True,
            "set": self.parity.name,
            "sentences": len(self.sources),
            "references": refs is not None,
            "max_len_extra": self.max_len_extra,
            "tolerance": TOLERANCE,
            "tolerance_sentences": min(TOLERANCE_SENTENCES, len(self.sources)),
            "min_identical": MIN_IDENTICAL,
            "max_bleu_loss": MAX_BLEU_LOSS,
            **(self._torch_bleu() if refs else {}),
            "variants": self.results,
            "reference": self.reference(),
        }

    def reference(self) -> dict[str, Any] | None:
        """The start-up self-check's sentences: the widest-margin ones among the first candidates."""
        candidates = [i for i in range(min(REFERENCE_CANDIDATES, len(self.sources))) if self.sources[i]]
        if not candidates:
            return None
        outputs = self.torch_outputs()
        margins = greedy_margins(
            self.model, [self.sources[i] for i in candidates], [outputs[i] for i in candidates], self.max_len_extra
        )
        ranked = sorted((m, i) for m, i in zip(margins, candidates) if m > float("-inf"))[::-1]
        chosen = sorted(ranked[:REFERENCE_SENTENCES], key=lambda pair: pair[1])
        if not chosen:
            return None
        return {
            "sources": [self.parity.sources[i] for _, i in chosen],
            "tokens": [outputs[i] for _, i in chosen],
            "max_len_extra": self.max_len_extra,
            "min_margin": round(min(m for m, _ in chosen), 4),
        }

    def _torch_bleu(self) -> dict[str, Any]:
        bleu = self._bleu_of(self.torch_outputs())
        assert bleu is not None
        return {"torch_bleu": round(bleu, 2), "bleu_signature": str(self._scorer.get_signature())}

    def raise_if_failed(self, label: str = "") -> None:
        if self.problems:
            prefix = f"{label}: " if label else ""
            raise ParityError(f"{prefix}parity failed:\n  " + "\n  ".join(self.problems))


def validate(
    model: Transformer,
    tokenizer: Tokenizer,
    encoder_path: Path,
    decoder_path: Path,
    sentences: list[str],
    max_len_extra: int = 20,
) -> dict[str, Any]:
    """Check one fp32 graph pair against `model`; raise ParityError listing every mismatch."""
    run = ParityRun(model, tokenizer, ParitySet("given sentences", tuple(sentences)), max_len_extra)
    summary = run.check_exact("fp32", encoder_path, decoder_path)
    if run.problems:
        lines = [p.removeprefix("fp32: ") for p in run.problems]
        raise ParityError(f"{encoder_path.name} + {decoder_path.name}: parity failed:\n  " + "\n  ".join(lines))
    return summary
