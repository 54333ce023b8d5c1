"""Batched greedy and beam search over the bundle's ONNX graphs, with the KV cache (numpy + ORT).

The rules are training/search.py's, so results match the torch reference token for token:
- a source is its tokens followed by EOS; decoding starts from BOS;
- a hypothesis holds at most `len(source) + max_len_extra` tokens, EOS included; EOS is forced
  at that length;
- beam search keeps `beam_size` live hypotheses per sentence, takes the best 2·beam candidates
  per step, finalizes an EOS candidate only when it ranks among the best `beam_size`, and a
  sentence is done once it has `beam_size` finished hypotheses (fairseq's rule);
- finished hypotheses rank by score / ((5 + length) / 6) ** alpha, length counting EOS (GNMT);
- sentences that are done leave the batch (their rows leave every cached tensor).
One deliberate difference: a sentence whose limit is reached is done even with fewer than
`beam_size` finished hypotheses. That only happens when the limit is 1 (empty source,
max_len_extra 1), where the reference would loop for ever.

Sources are sorted by length (less padding) and split into sub-batches of at most
`max_batch_rows` decoder rows (sentences × beam); results come back in input order.

Where a step's time goes (models/default exported with the default options, variant fp32-cpu,
ORT 1.32 CPU, 1 intra-op thread, 64 Multi30k test_2016 sentences, on 2 cores shared with other
jobs; fastest of 3 runs; "other" is everything outside the decoder's run(): row selection, top-k,
Python loops):

    python -m nmt.bench.step_overhead --bundle BUNDLE --count 64 --threads 1

    | search | batch | step ms | run() ms | other ms | run() share |
    |--------|-------|---------|----------|----------|-------------|
    | greedy |     1 |    2.53 |     2.39 |    0.14  |       94.5% |
    | greedy |     8 |    4.20 |     3.82 |    0.38  |       90.9% |
    | greedy |    32 |    7.97 |     7.00 |    0.97  |       87.8% |
    | beam 4 |     1 |    4.41 |     3.72 |    0.69  |       84.3% |
    | beam 4 |     8 |    9.92 |     8.30 |    1.62  |       83.7% |
    | beam 4 |    32 |   24.14 |    19.71 |    4.43  |       81.7% |

What was tried on CPU:
- IO binding (bind_cpu_input + ORT-allocated outputs, rebound every step as the loop must, since
  shapes change) against plain run() on one decoder step, interleaved 200 times: median
  2.41 vs 2.22 ms (1 row), 5.39 vs 5.10 (8 rows), 10.47 vs 10.29 (32 rows), i.e. 2-9% slower.
  run_with_ort_values with outputs fed back as OrtValues was within noise of run(). run()
  already wraps numpy inputs without a copy and returns outputs without one (OrtValue.numpy()
  shares memory). Kept: plain run() on CPU; IO binding only on CUDA, where it saves transfers.
- Compacting the source side in place when sentences finish (`_compact`) instead of fancy
  indexing into fresh arrays (whose page faults dominated): "other" at beam 4 × 32 went from
  5.2 to 3.7 ms/step, greedy × 32 from 0.80 to 0.63 ms/step (same A/B run). Kept.
- Cross K/V are only re-selected when a sentence leaves (all beams of a sentence share them),
  not on every beam reordering. Kept.
- top-k: np.argpartition over (sentences, beam·vocab) is ~2 ms/step at beam 4 × 32; an exact
  pre-filter by a bound was slower. Kept argpartition.
ORT's com.microsoft.BeamSearch/GreedySearch would take the loop into C++, but they rank by
score / length ** alpha (not GNMT's penalty), stop at one max_length per batch (not per source)
and do not force EOS, so they cannot reproduce these rules; with run() at 82-95% of a step they
could save at most ~5-18% here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .bundle import cross_names, decoder_outputs, past_names
from .hypothesis import Hypothesis, length_penalty
from .runtime import Sessions
from .tokenizer import BOS_ID, EOS_ID, PAD_ID

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "DecodeOptions", "Decoder", "Hypothesis", "SearchResult", "length_penalty"]
DEFAULT_MAX_BATCH_ROWS = 256
# ((5 + len) / 6) ** alpha must stay finite for any length a model allows (1e4 overflowed a
# float); GNMT tuned alpha in 0..1 and values past ~2 only favour long outputs further.
MAX_LENGTH_PENALTY = 10.0


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 4  # 1 = greedy
    length_penalty: float = 0.6  # GNMT alpha; 0 = rank by log-probability alone
    max_len_extra: int = 50  # hypothesis length limit: source length + this, EOS included
    n_best: int = 1

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n_best must be between 1 and beam_size ({self.beam_size}), got {self.n_best}")
        if not 0 <= self.length_penalty <= MAX_LENGTH_PENALTY:  # NaN fails too
            raise ValueError(f"length_penalty must be a finite number between 0 and {MAX_LENGTH_PENALTY:g}, "
                             f"got {self.length_penalty}")
        if self.max_len_extra < 1:
            raise ValueError(f"max_len_extra must be at least 1, got {self.max_len_extra}")


@dataclass(frozen=True)
class SearchResult:
    hypotheses: list[list[Hypothesis]]  # per source, in input order, best first, n_best each
    encode_seconds: float
    decode_seconds: float
    steps: int  # decoder runs, all sub-batches together


def pad_sources(sources: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Sources + EOS, right-padded -> ids (B, S) int64, mask (B, S) bool (True = token)."""
    width = max(len(s) for s in sources) + 1
    ids = np.full((len(sources), width), PAD_ID, dtype=np.int64)
    for row, seq in enumerate(sources):
        ids[row, : len(seq)] = seq
        ids[row, len(seq)] = EOS_ID
    return ids, ids != PAD_ID  # a PAD inside a source is masked, as in training.search.pad_batch


def _compact(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows] for ascending `rows`, written in place (runs of rows move down) -> a prefix view."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, end in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)]):
        gap = int(rows[start]) - start  # >= 0: rows only move down
        if not gap:
            continue
        # Chunks of `gap` rows never overlap their destination, so numpy needs no temporary copy.
        for dest in range(start, end, gap):
            chunk = min(gap, end - dest)
            array[dest : dest + chunk] = array[dest + gap : dest + gap + chunk]
    return array[: len(rows)]


class _HostCache:
    """Source side and KV cache of the rows still being decoded, in host memory (numpy)."""

    def __init__(self, sessions: Sessions, src_ids: np.ndarray, src_mask: np.ndarray, repeat: int):
        self.sessions, L = sessions, sessions.n_layers
        self.cross_names, self.past_names, self.outputs = cross_names(L), past_names(L), decoder_outputs(L)
        cross = sessions.encoder.run(self.cross_names, {"src_ids": src_ids, "src_mask": src_mask})
        self.cross = [np.repeat(c, repeat, axis=0) for c in cross] if repeat > 1 else cross
        self.src_mask = np.repeat(src_mask, repeat, axis=0) if repeat > 1 else src_mask
        rows = len(self.src_mask)
        empty = np.zeros((rows, sessions.n_heads, 0, sessions.d_head), sessions.kv_dtype)
        self.past = [empty] * (2 * L)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (R,) -> log-probabilities (R, V) of the next token; the cache grows by one."""
        feeds = {"tgt_ids": tokens[:, None], "src_mask": self.src_mask,
                 **dict(zip(self.past_names, self.past)), **dict(zip(self.cross_names, self.cross))}
        log_probs, *self.past = self.sessions.decoder.run(self.outputs, feeds)
        return log_probs

    def select(self, rows: np.ndarray, source_rows: np.ndarray | None) -> None:
        """Keep cache rows `rows`, in that order; the source side keeps `source_rows` (None: unchanged).

        `source_rows` (and `rows`, when it is the same array) are ascending: those tensors are
        compacted in place, which spares a fresh allocation (and its page faults) per finished sentence.
        """
        if rows is source_rows:
            self.past = [_compact(p, rows) for p in self.past]
        else:
            self.past = [p[rows] for p in self.past]
        if source_rows is not None:
            self.cross = [_compact(c, source_rows) for c in self.cross]
            self.src_mask = self.src_mask[source_rows]


class _CudaCache(_HostCache):
    """The same state kept on the GPU between steps (IO binding).

    Present K/V stay where ORT wrote them (ort-owned CUDA outputs) and are bound back as the next
    past; cross K/V and the mask are uploaded once per row set. numpy cannot index device memory,
    so a row change (beam reordering, finished sentences) copies the past through the host.
    Only log-probabilities come to the host every step.
    """

    DEVICE = "cuda"  # ORT device name of the KV tensors (tests run this class with "cpu")

    def __init__(self, sessions: Sessions, src_ids: np.ndarray, src_mask: np.ndarray, repeat: int):
        super().__init__(sessions, src_ids, src_mask, repeat)  # encoder outputs once through host: small
        self._upload_source()

    def _upload_source(self) -> None:
        upload = lambda a: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.DEVICE, 0)  # noqa: E731
        self.cross_ov, self.src_mask_ov = [upload(c) for c in self.cross], upload(self.src_mask)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        binding = self.sessions.decoder.io_binding()
        binding.bind_cpu_input("tgt_ids", np.ascontiguousarray(tokens[:, None]))
        binding.bind_ortvalue_input("src_mask", self.src_mask_ov)
        for name, value in zip(self.cross_names, self.cross_ov):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.past_names, self.past):
            if isinstance(value, np.ndarray):  # first step, or rows just changed: copied to the GPU here
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("log_probs", "cpu")
        for name in self.outputs[1:]:
            binding.bind_output(name, self.DEVICE, 0)
        self.sessions.decoder.run_with_iobinding(binding)
        log_probs, *self.past = binding.get_outputs()
        return log_probs.numpy()

    def select(self, rows: np.ndarray, source_rows: np.ndarray | None) -> None:
        self.past = [p if isinstance(p, np.ndarray) else p.numpy() for p in self.past]  # device -> host
        super().select(rows, source_rows)
        if source_rows is not None:
            self._upload_source()


def _force_eos(log_probs: np.ndarray, rows: np.ndarray) -> None:
    """At the length limit only EOS may follow: every other token gets -inf (in place)."""
    eos = log_probs[rows, ..., EOS_ID].copy()
    log_probs[rows] = -np.inf
    log_probs[rows, ..., EOS_ID] = eos


def _greedy(cache: _HostCache, sources: list[list[int]], max_len_extra: int) -> tuple[list[list[Hypothesis]], int]:
    """Most probable next token at each step; finished rows leave the batch."""
    n = len(sources)
    max_lens = np.array([len(s) + max_len_extra for s in sources])
    active = np.arange(n)  # the sub-batch index of each row
    last = np.full(n, BOS_ID, dtype=np.int64)
    scores = np.zeros(n, dtype=np.float32)
    outputs: list[list[int]] = [[] for _ in sources]
    step = 0
    while active.size:
        log_probs = cache.step(last)  # (R, V)
        at_limit = np.flatnonzero(step + 1 >= max_lens[active])
        if at_limit.size:
            _force_eos(log_probs, at_limit)
        last = log_probs.argmax(axis=1)
        scores[active] += log_probs[np.arange(len(last)), last]
        for row, token in zip(active.tolist(), last.tolist()):
            if token != EOS_ID:
                outputs[row].append(token)
        keep = np.flatnonzero(last != EOS_ID)
        if keep.size < active.size and keep.size:
            cache.select(keep, keep)
        active, last = active[keep], last[keep]
        step += 1
    return [[Hypothesis(out, float(s), float(s))] for out, s in zip(outputs, scores)], step


def _top_candidates(scores: np.ndarray, log_probs: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` best (beam, token) extensions per sentence, best first -> (scores, flat index) (A, count)."""
    A = scores.shape[0]
    candidates = (scores[:, :, None] + log_probs).reshape(A, -1)  # (A, K*V)
    index = np.argpartition(candidates, -count, axis=1)[:, -count:]
    top = np.take_along_axis(candidates, index, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(index, order, axis=1)


@dataclass
class _Beams:
    """Per-sentence beam search bookkeeping (sub-batch indices)."""

    prefixes: list[list[list[int]]]
    finished: list[list[Hypothesis]]


def _beam(cache: _HostCache, sources: list[list[int]], options: DecodeOptions) -> tuple[list[list[Hypothesis]], int]:
    """fairseq-style beam search, training/search.py's rules (see the module docstring)."""
    K, alpha = options.beam_size, options.length_penalty
    max_lens = [len(s) + options.max_len_extra for s in sources]
    active = list(range(len(sources)))  # sub-batch index of each live group of K rows
    scores = np.zeros((len(sources), K), dtype=np.float32)
    scores[:, 1:] = -np.inf  # all beams start identical: expand only the first
    beams = _Beams([[[] for _ in range(K)] for _ in sources], [[] for _ in sources])
    last = np.full(len(sources) * K, BOS_ID, dtype=np.int64)
    step = 0
    while active:
        log_probs = cache.step(last)
        V = log_probs.shape[1]
        log_probs = log_probs.reshape(len(active), K, V)
        at_limit = np.array([step + 1 >= max_lens[s] for s in active])
        if at_limit.any():
            _force_eos(log_probs, np.flatnonzero(at_limit))
        top_scores, top_index = _top_candidates(scores, log_probs, 2 * K)
        origin, token, top_list = (top_index // V).tolist(), (top_index % V).tolist(), top_scores.tolist()
        next_rows, next_tokens, next_scores, kept = [], [], [], []
        for a, sentence in enumerate(active):
            alive = _advance(beams, sentence, origin[a], token[a], top_list[a], K, alpha)
            if len(beams.finished[sentence]) >= K or at_limit[a]:
                continue
            kept.append(a)
            prefixes = beams.prefixes[sentence]
            beams.prefixes[sentence] = [prefixes[beam] + [tok] for beam, tok, _ in alive]
            next_rows += [a * K + beam for beam, _, _ in alive]
            next_tokens += [tok for _, tok, _ in alive]
            next_scores.append([score for _, _, score in alive])
        step += 1
        if kept:
            source_rows = None if len(kept) == len(active) else (np.array(kept)[:, None] * K + np.arange(K)).ravel()
            cache.select(np.array(next_rows), source_rows)
            last = np.array(next_tokens, dtype=np.int64)
            scores = np.array(next_scores, dtype=np.float32)
        active = [active[a] for a in kept]
    ranked = [sorted(f, key=lambda h: -h.normalized_score)[: options.n_best] for f in beams.finished]
    return ranked, step


def _advance(beams: _Beams, sentence: int, origin: list[int], token: list[int], score: list[float], K: int,
             alpha: float) -> list[tuple[int, int, float]]:
    """Finalize EOS candidates ranked among the best K; return the K best non-EOS (beam, token, score)."""
    alive: list[tuple[int, int, float]] = []
    for rank, (beam, tok, value) in enumerate(zip(origin, token, score)):
        if tok == EOS_ID:
            if rank < K and value > -np.inf:
                prefix = beams.prefixes[sentence][beam]
                norm = value / length_penalty(len(prefix) + 1, alpha)
                beams.finished[sentence].append(Hypothesis(prefix, value, norm))
        elif len(alive) < K:
            alive.append((beam, tok, value))
    return alive


class Decoder:
    """Batched search over one encoder/decoder session pair."""

    def __init__(self, sessions: Sessions, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS):
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be at least 1, got {max_batch_rows}")
        self.sessions, self.max_batch_rows = sessions, max_batch_rows
        self._cache = _CudaCache if sessions.on_cuda else _HostCache
        special = (sessions.manifest or {}).get("special_ids")
        expected = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID}
        if special is not None and any(special.get(k) != v for k, v in expected.items()):
            raise ValueError(f"the bundle's special ids {special} differ from the ones this server uses {expected}")

    def search(self, sources: list[list[int]], options: DecodeOptions) -> SearchResult:
        """Decode token-id sources (without EOS; may be empty); results in input order."""
        self._check(sources, options)
        results: list[list[Hypothesis]] = [[] for _ in sources]
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        per_batch = max(1, self.max_batch_rows // options.beam_size)
        encode = decode = 0.0
        steps = 0
        for start in range(0, len(order), per_batch):
            chunk = order[start : start + per_batch]
            batch = [sources[i] for i in chunk]
            t0 = time.perf_counter()
            cache = self._cache(self.sessions, *pad_sources(batch), options.beam_size)
            t1 = time.perf_counter()
            if options.beam_size == 1:
                found, n = _greedy(cache, batch, options.max_len_extra)
            else:
                found, n = _beam(cache, batch, options)
            decode += time.perf_counter() - t1
            encode += t1 - t0
            steps += n
            for i, hyps in zip(chunk, found):
                results[i] = hyps
        return SearchResult(results, encode, decode, steps)

    def _check(self, sources: list[list[int]], options: DecodeOptions) -> None:
        vocab, limit = self.sessions.vocab_size, self.sessions.max_positions
        for i, source in enumerate(sources):
            if any(not 0 <= t < vocab for t in source):
                raise ValueError(f"source {i} has a token id outside the vocabulary (0..{vocab - 1})")
            if limit is not None and len(source) + options.max_len_extra > limit:
                raise ValueError(f"source {i} is too long: {len(source)} tokens + max_len_extra "
                                 f"{options.max_len_extra} exceeds the model's {limit} positions")
