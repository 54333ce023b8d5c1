"""Batched greedy and beam search over the bundle's ONNX graphs, with the KV cache (numpy + ORT).

The rules are training/search.py's, so results match the torch reference token for token:
- a source is its tokens followed by EOS; decoding starts from BOS;
- a hypothesis holds at most `len(source) + max_len_extra` tokens, EOS included; EOS is forced
  at that length;
- beam search keeps `beam_size` live hypotheses per sentence, takes the best 2·beam candidates
  per step, finalizes an EOS candidate only when it ranks among the best `beam_size`, and a
  sentence is done once it has `beam_size` finished hypotheses (fairseq's rule);
- finished hypotheses rank by score / ((5 + length) / 6) ** alpha, length counting EOS (GNMT);
- the repetition guard: no n-gram of up to 6 tokens may occur 4 times in a row
  (engine/hypothesis.py; a row asks for as many more candidates as it has blocked tokens);
- sentences that are done leave the batch (their rows leave every cached tensor).
One deliberate difference: a sentence whose limit is reached is done even with fewer than
`beam_size` finished hypotheses. That only happens when the limit is 1 (empty source,
max_len_extra 1), where the reference would loop for ever.

Sources are sorted by length (less padding) and split into sub-batches of at most
`max_batch_rows` decoder rows (sentences × beam); results come back in input order.

Each step asks the graph's output head (export/decoder_head.py) for each row's best 2·beam
tokens (beam) or for log_probs (greedy: numpy's argmax beats ORT's TopK ~10x), over the
bundle's vocabulary shortlist of the sub-batch when there is one (engine/shortlist.py).

Where a step's time goes (models/default, fp32-cpu with its shortlist, ORT 1.32, 2 threads, 2
shared AMD EPYC cores; fastest of 3; "other": all outside the decoder's run()):

    python -m nmt.bench.step_overhead --bundle BUNDLE --count 64 --threads 2 --precision fp32

    | search | batch | step ms | run() ms | other ms | run() share |   before the head: step, other
    |--------|-------|---------|----------|----------|-------------|   (same machine, profile.md)
    | greedy |    32 |    0.58 |     0.47 |    0.11  |       81.0% |   0.84, 0.14
    | beam 4 |     8 |    0.72 |     0.62 |    0.10  |       85.9% |   1.67, 0.66
    | beam 4 |    32 |    2.45 |     2.03 |    0.42  |       82.8% |   4.84, 2.23

On the CPU the search runs the bundle's step decoder when it has one (engine/step_cache.py: KV
buffers written in place, beams reordered through cache_indirection, no cache copies per step;
docs/engine-speed.md); the traced decoder (HostCache) otherwise. Continuous batching runs the step
decoder's per-row form (engine/row_cache.py).

What was tried on CPU (kept unless said otherwise):
- top-k in the graph (TopK per row, k = 2·beam): the (sentences, beam·vocab) np.argpartition
  was 1.6 ms of a 4.8 ms step at beam 4 × 32; a row's TopK over 8000 is ~3x cheaper than
  argpartition, and with the shortlist's ~1,800 ids ~10x. Greedy keeps np.argmax.
- IO binding: 2-9% slower than run() on CPU (rebound every step); only on CUDA (CudaCache).
- Compacting the source side in place when sentences finish (`compact`: fresh arrays' page
  faults dominated); cross K/V re-selected only when a sentence leaves. Beam reordering of the
  past stays on the host (p[rows]: ~0.12 of 2.45 ms at beam 4 × 32; a Gather in the graph
  would copy as much).
- Spinning worker threads (allow_spinning, with force_spinning_stop at the end of a run):
  1.05-1.26x faster in one run, 0.5-1.1x in the next one under load from other jobs. Left
  off; steps of few rows run single-threaded instead (engine/runtime.py, SINGLE_THREAD_ROWS).
ORT's com.microsoft.BeamSearch/GreedySearch rank by score / length ** alpha, stop at one
max_length per batch and do not force EOS: they cannot reproduce these rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .cache import CudaCache, HostCache
from .hypothesis import Hypothesis, blocked_matrix, length_penalty, mask_blocked
from .runtime import Sessions
from .step_cache import StepCache
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
    # No n-gram 4 times in a row (engine/hypothesis.py). Off only to compare with engines that have
    # no such rule (nmt-bench decode against CTranslate2).
    repetition_guard: bool = True
    n_best: int = 1

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n_best must be between 1 and beam_size ({self.beam_size}), got {self.n_best}")
        if not 0 <= self.length_penalty <= MAX_LENGTH_PENALTY:  # NaN fails too
            raise ValueError(
                f"length_penalty must be a finite number between 0 and {MAX_LENGTH_PENALTY:g}, "
                f"got {self.length_penalty}"
            )
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


def _greedy(
    cache: HostCache, sources: list[list[int]], max_len_extra: int, guard: bool = True
) -> tuple[list[list[Hypothesis]], int]:
    """Most probable next token at each step; finished rows leave the batch."""
    n = len(sources)
    max_lens = np.array([len(s) + max_len_extra for s in sources])
    active = np.arange(n)  # the sub-batch index of each row
    last = np.full(n, BOS_ID, dtype=np.int64)
    scores = np.zeros(n, dtype=np.float32)
    outputs: list[list[int]] = [[] for _ in sources]
    history = np.zeros((n, int(max_lens.max())), dtype=np.int64)  # each sentence's tokens so far
    step = 0
    while active.size:
        blocked = blocked_matrix(history[active, :step]) if guard else None  # engine/hypothesis.py
        k = 1 if blocked is None else 1 + int((blocked >= 0).sum(axis=1).max())
        values, ids, eos = cache.step_top(last, k)  # (R, k), (R, k), (R,)
        if blocked is not None:
            mask_blocked(values, ids, blocked)
        last, best = ids[:, 0].copy(), values[:, 0].copy()
        at_limit = np.flatnonzero(step + 1 >= max_lens[active])
        last[at_limit], best[at_limit] = EOS_ID, eos[at_limit]  # only EOS may follow at the limit
        scores[active] += best
        history[active, step] = last
        for row, token in zip(active.tolist(), last.tolist()):
            if token != EOS_ID:
                outputs[row].append(token)
        keep = np.flatnonzero(last != EOS_ID)
        if keep.size < active.size and keep.size:
            cache.select(keep, keep)
        active, last = active[keep], last[keep]
        step += 1
    return [[Hypothesis(out, float(s), float(s))] for out, s in zip(outputs, scores)], step


def only_eos(values: np.ndarray, ids: np.ndarray, eos: np.ndarray, rows: np.ndarray) -> None:
    """At the length limit only EOS may follow: it becomes each of `rows`' one finite candidate (in place)."""
    values[rows] = -np.inf
    values[rows, 0], ids[rows, 0] = eos[rows], EOS_ID


def best_candidates(
    scores: np.ndarray, values: np.ndarray, ids: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `count` best extensions per sentence from each beam's own best k (exact: module docstring
    of export/decoder_head.py): scores (A, K), values and ids (A, K, k) -> scores, beams, tokens (A, count).

    A beam-search step's ranking, shared by the static search (_beam) and RunningBatch
    (engine/continuous.py). Ties keep the lower beam, then the better of its own k (stable sort)."""
    A, K, k = values.shape
    candidates = (scores[:, :, None] + values).reshape(A, K * k)
    order = np.argsort(-candidates, axis=1, kind="stable")[:, :count]  # K*k is small (2 * K * K)
    tokens = np.take_along_axis(ids.reshape(A, K * k), order, axis=1)
    return np.take_along_axis(candidates, order, axis=1), order // k, tokens


@dataclass
class Beams:
    """Beam search bookkeeping of some sentences, indexed by sentence (the static search: its sub-batch
    index; RunningBatch: 0, one Beams per sentence). advance_beams() updates it."""

    prefixes: list[list[list[int]]]  # per sentence, per beam: the tokens so far (without BOS)
    finished: list[list[Hypothesis]]  # per sentence: its finished hypotheses, in the order found


def _beam(cache: HostCache, sources: list[list[int]], options: DecodeOptions) -> tuple[list[list[Hypothesis]], int]:
    """fairseq-style beam search, training/search.py's rules (see the module docstring)."""
    K, alpha = options.beam_size, options.length_penalty
    max_lens = [len(s) + options.max_len_extra for s in sources]
    active = list(range(len(sources)))  # sub-batch index of each live group of K rows
    scores = np.zeros((len(sources), K), dtype=np.float32)
    scores[:, 1:] = -np.inf  # all beams start identical: expand only the first
    beams = Beams([[[] for _ in range(K)] for _ in sources], [[] for _ in sources])
    last = np.full(len(sources) * K, BOS_ID, dtype=np.int64)
    history = np.zeros((len(last), 0), dtype=np.int64)  # each row's tokens so far
    step = 0
    while active:
        # the repetition guard: a few more candidates, then masked
        blocked = blocked_matrix(history) if options.repetition_guard else None
        extra = 0 if blocked is None else int((blocked >= 0).sum(axis=1).max())
        values, ids, eos = cache.step_top(last, 2 * K + extra)
        if blocked is not None:
            mask_blocked(values, ids, blocked)
        at_limit = np.array([step + 1 >= max_lens[s] for s in active])
        if at_limit.any():
            only_eos(values, ids, eos, (np.flatnonzero(at_limit)[:, None] * K + np.arange(K)).ravel())
        values, ids = values.reshape(len(active), K, -1), ids.reshape(len(active), K, -1)
        top_scores, top_beams, top_tokens = best_candidates(scores, values, ids, 2 * K)
        origin, token, top_list = top_beams.tolist(), top_tokens.tolist(), top_scores.tolist()
        next_rows, next_tokens, next_scores, kept = [], [], [], []
        for a, sentence in enumerate(active):
            alive = advance_beams(beams, sentence, origin[a], token[a], top_list[a], K, alpha)
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
            history = np.concatenate([history[next_rows], last[:, None]], axis=1)
            scores = np.array(next_scores, dtype=np.float32)
        active = [active[a] for a in kept]
    ranked = [sorted(f, key=lambda h: -h.normalized_score)[: options.n_best] for f in beams.finished]
    return ranked, step


def advance_beams(
    beams: Beams, sentence: int, origin: list[int], token: list[int], score: list[float], K: int, alpha: float
) -> list[tuple[int, int, float]]:
    """One beam-search step of sentence `sentence` of `beams`, from its candidates best first (the
    (beam, token, score) triples of best_candidates, as lists): an EOS candidate ranked among the best
    K (and finite) becomes a finished Hypothesis, normalized by length_penalty(length + EOS, alpha);
    returns the K best non-EOS candidates (beam, token, score). The caller extends the prefixes."""
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
        self._cache = CudaCache if sessions.on_cuda else StepCache if sessions.step is not None else HostCache
        special = (sessions.manifest or {}).get("special_ids")
        expected = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID}
        if special is not None and any(special.get(k) != v for k, v in expected.items()):
            raise ValueError(f"the bundle's special ids {special} differ from the ones this server uses {expected}")

    def search(self, sources: list[list[int]], options: DecodeOptions) -> SearchResult:
        """Decode token-id sources (without EOS; may be empty); results in input order."""
        self.check(sources, options)
        results: list[list[Hypothesis]] = [[] for _ in sources]
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        per_batch = max(1, self.max_batch_rows // options.beam_size)
        encode = decode = 0.0
        steps = 0
        with self.sessions.turns.hold():  # the turn stays between steps (engine/turns.py)
            for start in range(0, len(order), per_batch):
                chunk = order[start : start + per_batch]
                batch = [sources[i] for i in chunk]
                t0 = time.perf_counter()
                shortlist = self.sessions.shortlist
                vocab_ids = None if shortlist is None else shortlist.vocab_ids(batch)
                cache = self._cache(self.sessions, *pad_sources(batch), options.beam_size, vocab_ids)
                t1 = time.perf_counter()
                if options.beam_size == 1:
                    found, n = _greedy(cache, batch, options.max_len_extra, options.repetition_guard)
                else:
                    found, n = _beam(cache, batch, options)
                decode += time.perf_counter() - t1
                encode += t1 - t0
                steps += n
                for i, hyps in zip(chunk, found):
                    results[i] = hyps
        return SearchResult(results, encode, decode, steps)

    def check(self, sources: list[list[int]], options: DecodeOptions) -> None:
        """ValueError, naming the source by its index in `sources`, for a token id outside the vocabulary
        or a source too long for the model's positions; search() and RunningBatch run it first."""
        vocab, limit = self.sessions.vocab_size, self.sessions.max_positions
        for i, source in enumerate(sources):
            if any(not 0 <= t < vocab for t in source):
                raise ValueError(f"source {i} has a token id outside the vocabulary (0..{vocab - 1})")
            if limit is not None and len(source) + options.max_len_extra > limit:
                raise ValueError(
                    f"source {i} is too long: {len(source)} tokens + max_len_extra "
                    f"{options.max_len_extra} exceeds the model's {limit} positions"
                )
