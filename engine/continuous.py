"""Iteration-level (continuous) batching: sentences join and leave a running decode between steps.

A RunningBatch holds the rows of every sentence being decoded (beam_size rows each; the decode
options may differ per sentence) in one KV cache:
- admit() runs the encoder for new sentences and appends their rows: cross K/V padded to the
  batch's src_len (masked by src_mask), the self-attention cache padded to its past_len with
  masked slots in front (past_mask, bundle format 3), so a row's positions and keys are only its own;
- step() runs the decoder once for every row and returns the sentences that finished;
- drop() frees the rows of sentences nobody waits for any more (cancelled, past their deadline).
Cache slots that no remaining row has (all rows that had them left) are cut from the front after
each change, and src_len shrinks when the longest sources leave, so the cache stays as wide as the
oldest row. The design is Orca's (OSDI '22) iteration-level scheduling; the budgets live in
the server's scheduler.

The rules and scores are engine/decoding.py's, built from its pieces (the graph's top-k head or
row_top_k, best_candidates, advance_beams, compact): without a vocabulary shortlist a sentence gets
the same hypotheses as from Decoder.search alone, scores within float rounding (the padded
attention sums its terms in another order). With one, the batch scores the union of its
sentences' shortlists, as a static batch does.
With a bundle whose CPU variant has the per-row step decoder (export/step_decoder.py), rows do not
share slots at all: each row's cache holds only its own positions (engine/row_cache.py), so a
newcomer's step costs what it costs alone and nothing is cut; the past_mask path above serves older
bundles and CUDA. Host memory only: on CUDA the cache goes through the host every step.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable

import numpy as np

from .bundle import (
    PAST_MASK,
    TOP_K,
    VOCAB_IDS,
    cross_names,
    decoder_outputs,
    head_outputs,
    past_names,
    present_names,
    takes_past_mask,
)
from .cache import compact, row_top_k
from .decoding import (
    BOS_ID,
    EOS_ID,
    Beams,
    DecodeOptions,
    Decoder,
    Hypothesis,
    advance_beams,
    best_candidates,
    only_eos,
    pad_sources,
)
from .hypothesis import MAX_REPEAT_NGRAM, blocked_tokens, mask_blocked
from .row_cache import RowBuffers
from .runtime import Sessions
from .shortlist import Shortlist

Finished = tuple[Hashable, list[Hypothesis]]  # a sentence's key and its n_best hypotheses, best first


class NoPastMask(ValueError):
    """The bundle's decoder has no past_mask input (format 1 or 2): only static batching works."""


class _Sentence:
    """One source being decoded: `rows` (its beam size) consecutive rows of the batch."""

    __slots__ = ("key", "options", "rows", "max_len", "src_width", "beams", "scores", "vocab", "step")

    def __init__(self, key: Hashable, options: DecodeOptions, source: list[int], vocab: np.ndarray | None):
        K = options.beam_size
        self.key, self.options, self.rows, self.vocab, self.step = key, options, K, vocab, 0
        self.max_len = len(source) + options.max_len_extra  # hypothesis length limit, EOS included
        self.src_width = len(source) + 1  # source tokens + EOS
        self.beams = Beams([[[] for _ in range(K)]], [[]])  # this sentence's prefixes and finished (index 0)
        # Greedy: the running score, float32 as the static search adds it. Beam: each beam's score, the
        # beams after the first at -inf (all beams start identical: expand only the first).
        self.scores: np.ndarray | list[float] = np.zeros(1, np.float32) if K == 1 else [0.0] + [-np.inf] * (K - 1)


class _Vocabulary:
    """The ids the decoder scores: the union of the running sentences' shortlists (engine/shortlist.py),
    or every id (None) without one. As in a static batch, a sentence may translate differently beside
    others than alone when the bundle has a shortlist."""

    def __init__(self, shortlist: Shortlist | None):
        self.shortlist = shortlist
        self.counts = None if shortlist is None else np.zeros(shortlist.vocab_size, np.int32)  # sentences per id
        self._ids: np.ndarray | None = None

    def add(self, source: list[int]) -> np.ndarray | None:
        if self.shortlist is None or self.counts is None:
            return None
        ids = self.shortlist.vocab_ids([source])
        self.counts[ids] += 1
        self._ids = None
        return ids

    def remove(self, ids: np.ndarray | None) -> None:
        if ids is not None and self.counts is not None:
            self.counts[ids] -= 1
            self._ids = None

    def ids(self) -> np.ndarray | None:
        if self.counts is not None and self._ids is None:
            self._ids = np.flatnonzero(self.counts).astype(np.int64)
        return self._ids


class _SourceSide:
    """Cross K/V and src_mask of the rows, in buffers with spare rows: newcomers are written in place,
    leavers compacted in place; only a longer source (or a full buffer) reallocates."""

    MIN_CAPACITY = 16  # rows

    def __init__(self, n_tensors: int):
        self.n_tensors, self.rows = n_tensors, 0
        self.cross: list[np.ndarray] = []  # (capacity, H, width, d_head) each
        self.mask = np.zeros((0, 0), bool)  # (capacity, width)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def views(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The rows in use: contiguous prefixes, fed to the decoder as they are."""
        return [c[: self.rows] for c in self.cross], self.mask[: self.rows]

    def append(self, cross: list[np.ndarray], mask: np.ndarray) -> None:
        n, width = mask.shape
        if not self.cross or width > self.width or self.rows + n > len(self.mask):
            fits = self.rows + n <= len(self.mask)
            capacity = len(self.mask) if fits else max(2 * len(self.mask), self.rows + n, self.MIN_CAPACITY)
            self._reallocate(capacity, max(width, self.width), cross)
        end = self.rows + n
        for buffer, new in zip(self.cross, cross):
            buffer[self.rows : end, :, :width] = new
            buffer[self.rows : end, :, width:] = 0  # masked, but it must not be NaN
        self.mask[self.rows : end, :width], self.mask[self.rows : end, width:] = mask, False
        self.rows = end

    def keep(self, rows: np.ndarray) -> None:
        """Keep `rows` (ascending), in place."""
        for buffer in self.cross:
            compact(buffer[: self.rows], rows)
        compact(self.mask[: self.rows], rows)
        self.rows = len(rows)

    def narrow(self, width: int) -> None:
        """Drop the columns past `width` (the longest sources left)."""
        if width < self.width:
            self._reallocate(len(self.mask), width, self.cross)

    def _reallocate(self, capacity: int, width: int, like: list[np.ndarray]) -> None:
        shape = (capacity, like[0].shape[1], width, like[0].shape[3])
        cross = [np.zeros(shape, like[0].dtype) for _ in range(self.n_tensors)]
        mask = np.zeros((capacity, width), bool)
        keep = min(width, self.width)
        for new, old in zip(cross, self.cross):
            new[: self.rows, :, :keep] = old[: self.rows, :, :keep]
        mask[: self.rows, :keep] = self.mask[: self.rows, :keep]
        self.cross, self.mask = cross, mask


def _host_top_k(
    log_probs: np.ndarray, k: int, vocab_ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """row_top_k of log_probs (R, V'), ids mapped back through vocab_ids (None: every id)."""
    values, ids, eos = row_top_k(log_probs, k)
    return values, (ids if vocab_ids is None else vocab_ids[ids]), eos


class RunningBatch:
    """The sentences being decoded together; not thread-safe (one caller at a time)."""

    def __init__(self, sessions: Sessions):
        # The per-row step decoder when the bundle has one (each row at its own length, engine/row_cache.py);
        # else the traced decoder, every row's cache as wide as the oldest's (past_mask).
        if sessions.rows is None and not takes_past_mask([i.name for i in sessions.decoder.get_inputs()]):
            raise NoPastMask(
                "the bundle's decoder has no past_mask input (bundle format before 3): re-export it "
                "for continuous batching"
            )
        self.sessions, L = sessions, sessions.n_layers
        self._checker = Decoder(sessions)  # the same source checks and special ids as the static search
        self._cross_names, self._past_names, self._outputs = cross_names(L), past_names(L), decoder_outputs(L)
        self._top_outputs = [*head_outputs(), *present_names(L)]
        self._every_id = np.arange(sessions.vocab_size, dtype=np.int64)  # the per-row graph's vocab_ids, no shortlist
        self._reset()

    def _reset(self) -> None:
        s = self.sessions
        self.sentences: list[_Sentence] = []
        self._vocab = _Vocabulary(s.shortlist if s.has_head else None)
        self.past = [np.zeros((0, s.n_heads, 0, s.d_head), s.kv_dtype) for _ in range(2 * s.n_layers)]
        self.past_mask = np.zeros((0, 0), bool)  # (rows, past_len): which cached slots are a row's own
        self.cache = None if s.rows is None else RowBuffers(s)  # the per-row graph's cache, instead of the two above
        self.source = _SourceSide(2 * s.n_layers)  # cross K/V and src_mask
        self.tokens = np.zeros(0, np.int64)  # each row's next input token
        # Row changes not yet applied to `past` (applied right before the next run, merged with
        # admissions, so the cache is copied once per step): logical row i is past row _pending[i],
        # and the first _cut slots go.
        self._pending: np.ndarray | None = None
        self._cut = 0

    @property
    def rows(self) -> int:
        return len(self.tokens)

    @property
    def past_len(self) -> int:
        """Cached positions of the oldest row (with the per-row graph, each row has only its own)."""
        if self.cache is not None:
            lengths = self.cache.lengths if self._pending is None else self.cache.lengths[self._pending]
            return int(lengths.max(initial=0))
        return self.past_mask.shape[1]

    @property
    def src_len(self) -> int:
        return self.source.width

    def __len__(self) -> int:
        return len(self.sentences)

    def keys(self) -> list[Hashable]:
        return [s.key for s in self.sentences]

    def check(self, sources: list[list[int]], options: DecodeOptions) -> None:
        """ValueError (naming the source by its index in `sources`) for what admit() must not get."""
        self._checker.check(sources, options)

    def admit(self, entries: list[tuple[Hashable, list[int], DecodeOptions]]) -> None:
        """Encode the new sentences (key, source token ids without EOS, options) and append their rows."""
        if not entries:
            return
        sources = [source for _, source, _ in entries]
        for source, (_, _, options) in zip(sources, entries):
            self.check([source], options)
        src_ids, src_mask = pad_sources(sources)
        cross = self.sessions.run_encoder(self._cross_names, {"src_ids": src_ids, "src_mask": src_mask}, len(src_ids))
        repeats = np.array([options.beam_size for _, _, options in entries])
        cross = [np.repeat(c, repeats, axis=0) for c in cross]
        src_mask = np.repeat(src_mask, repeats, axis=0)
        added = int(repeats.sum())
        self._materialize(added)
        self.source.append(cross, src_mask)
        if self.cache is None:
            self.past_mask = np.concatenate([self.past_mask, np.zeros((added, self.past_len), bool)])
        self.tokens = np.concatenate([self.tokens, np.full(added, BOS_ID, np.int64)])
        self.sentences += [_Sentence(key, options, source, self._vocab.add(source)) for key, source, options in entries]

    def drop(self, keys: set[Hashable]) -> list[Hashable]:
        """Free the rows of the sentences with these keys; returns the keys that were running."""
        survivors = [i for i, s in enumerate(self.sentences) if s.key not in keys]
        if len(survivors) == len(self.sentences):
            return []
        dropped = [s.key for s in self.sentences if s.key in keys]
        rows = self._sentence_rows(survivors)
        cache_rows = rows if self._pending is None else self._pending[rows]
        self._retain(survivors, cache_rows, self.tokens[rows])
        return dropped

    def step(self) -> list[Finished]:
        """One decoder run for every row; the sentences that finished leave and are returned."""
        if not self.sentences:
            return []
        blocked = self._blocked()
        values, ids, eos = self._run(0 if blocked is None else int((blocked >= 0).sum(axis=1).max()))
        if blocked is not None:
            mask_blocked(values, ids, blocked)
        finished, survivors, rows, tokens = self._advance(values, ids, eos)
        self._retain(survivors, np.array(rows, np.int64), np.array(tokens, np.int64))
        return finished

    def _blocked(self) -> np.ndarray | None:
        """The repetition guard's tokens per row (R, MAX_REPEAT_NGRAM), -1 for none; None: none at all."""
        per_row = [
            blocked_tokens(prefix) if s.options.repetition_guard else []
            for s in self.sentences
            for prefix in s.beams.prefixes[0][: s.rows]
        ]
        if not any(per_row):
            return None
        blocked = np.full((len(per_row), MAX_REPEAT_NGRAM), -1, dtype=np.int64)
        for row, tokens in enumerate(per_row):
            blocked[row, : len(tokens)] = tokens
        return blocked

    def _run(self, extra: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's k best log-probs and ids (R, k), best first, and its EOS log-prob (R,), k the
        largest any sentence needs (greedy 1, beam 2·beam); from the graph's head when it has one."""
        self._materialize(0)
        if self.cache is not None:
            return self._run_per_row(extra)
        mask = np.concatenate([self.past_mask, np.ones((self.rows, 1), bool)], axis=1)  # the new token is real
        cross, src_mask = self.source.views()
        feeds = {
            "tgt_ids": self.tokens[:, None],
            "src_mask": src_mask,
            PAST_MASK: mask,
            **dict(zip(self._past_names, self.past)),
            **dict(zip(self._cross_names, cross)),
        }
        self.past_mask = mask
        k = self._candidates(extra)
        vocab_ids = self._vocab.ids()
        top = self.sessions.has_head and k > 1
        if self.sessions.has_head:
            scored = self.sessions.vocab_size if vocab_ids is None else len(vocab_ids)
            feeds[TOP_K] = np.array([min(k, scored) if k > 1 else 0], np.int64)  # greedy: argmax below
            if vocab_ids is not None:
                feeds[VOCAB_IDS] = vocab_ids
        found = self.sessions.run_decoder(self._top_outputs if top else self._outputs, feeds, self.rows)
        if top:
            values, ids, eos, *self.past = found
            return values, ids, eos
        log_probs, *self.past = found  # (R, V'), V' = len(vocab_ids)
        return _host_top_k(log_probs, k, vocab_ids)

    def _candidates(self, extra: int) -> int:
        """k: the most candidates any sentence needs per row (greedy 1, beam 2·beam), plus `extra`
        (the repetition guard's blocked tokens)."""
        return max(1 if s.rows == 1 else 2 * s.rows for s in self.sentences) + extra

    def _run_per_row(self, extra: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """_run on the per-row step decoder (it always has the head, and takes vocab_ids and top_k)."""
        assert self.cache is not None
        cross, src_mask = self.source.views()
        k = self._candidates(extra)
        vocab_ids = self._vocab.ids()
        scored = self._every_id if vocab_ids is None else vocab_ids
        feeds = {
            "src_mask": src_mask,
            VOCAB_IDS: scored,
            TOP_K: np.array([min(k, len(scored)) if k > 1 else 0]),
            **dict(zip(self._cross_names, cross)),
        }
        if k > 1:
            return tuple(self.cache.run(self.tokens, feeds, head_outputs()))  # type: ignore[return-value]
        (log_probs,) = self.cache.run(self.tokens, feeds, ["log_probs"])  # greedy only: argmax below
        return _host_top_k(log_probs, k, vocab_ids)

    def _advance(
        self, values: np.ndarray, ids: np.ndarray, eos: np.ndarray
    ) -> tuple[list[Finished], list[int], list[int], list[int]]:
        """Each sentence's search rule on its rows -> (finished, surviving sentences, next rows, next tokens)."""
        sentences = self.sentences
        starts = [0, *itertools.accumulate(s.rows for s in sentences)][:-1]
        limited = [i for i, s in enumerate(sentences) if s.step + 1 >= s.max_len]
        if limited:
            only_eos(
                values, ids, eos, np.concatenate([np.arange(starts[i], starts[i] + sentences[i].rows) for i in limited])
            )
        candidates = self._beam_candidates(values, ids, starts)
        greedy = [i for i, s in enumerate(sentences) if s.rows == 1]
        greedy_rows = np.array([starts[i] for i in greedy], np.int64)
        best = dict(zip(greedy, zip(ids[greedy_rows, 0].tolist(), values[greedy_rows, 0])))
        finished: list[Finished] = []
        survivors: list[int] = []
        next_rows: list[int] = []
        tokens: list[int] = []
        for i, sentence in enumerate(sentences):
            if sentence.rows == 1:  # decoding._greedy's rule: the best token; EOS ends the sentence
                token, value = best[i]
                sentence.scores = sentence.scores + value  # float32, as the static search adds
                alive = [(0, token, 0.0)] if token != EOS_ID else []
                if token != EOS_ID:
                    sentence.beams.prefixes[0][0].append(token)
                else:
                    score = float(sentence.scores[0])
                    finished.append((sentence.key, [Hypothesis(sentence.beams.prefixes[0][0], score, score)]))
            else:
                alive = self._beam_step(sentence, *candidates[i])
                if alive is None:
                    finished.append((sentence.key, self._ranked(sentence)))
            sentence.step += 1
            if alive:
                survivors.append(i)
                next_rows += [starts[i] + beam for beam, _, _ in alive]
                tokens += [token for _, token, _ in alive]
        return finished, survivors, next_rows, tokens

    def _beam_candidates(
        self, values: np.ndarray, ids: np.ndarray, starts: list[int]
    ) -> dict[int, tuple[list[int], list[int], list[float]]]:
        """decoding._beam's best 2·beam candidates (beam, token, score) of each beam sentence, for the
        sentences of each beam size together."""
        by_size: dict[int, list[int]] = {}
        for i, sentence in enumerate(self.sentences):
            if sentence.rows > 1:
                by_size.setdefault(sentence.rows, []).append(i)
        found: dict[int, tuple[list[int], list[int], list[float]]] = {}
        for K, members in by_size.items():
            if len(members) == len(self.sentences):  # every row, in order (the common case): no gather
                rows: slice | np.ndarray = slice(None)
            else:
                rows = np.concatenate([np.arange(starts[i], starts[i] + K) for i in members])
            group = lambda a: a[rows, : 2 * K].reshape(len(members), K, 2 * K)  # noqa: E731 - each row's best 2K
            scores = np.array([self.sentences[i].scores for i in members], dtype=np.float32)
            top_scores, top_beams, top_tokens = best_candidates(scores, group(values), group(ids), 2 * K)
            found.update(zip(members, zip(top_beams.tolist(), top_tokens.tolist(), top_scores.tolist())))
        return found

    @staticmethod
    def _beam_step(
        sentence: _Sentence, origin: list[int], token: list[int], values: list[float]
    ) -> list[tuple[int, int, float]] | None:
        """decoding._beam's rule for one sentence: its next (beam, token, score), or None when it is done."""
        K = sentence.rows
        alive = advance_beams(sentence.beams, 0, origin, token, values, K, sentence.options.length_penalty)
        if len(sentence.beams.finished[0]) >= K or sentence.step + 1 >= sentence.max_len:
            return None
        prefixes = sentence.beams.prefixes[0]
        sentence.beams.prefixes[0] = [prefixes[beam] + [tok] for beam, tok, _ in alive]
        sentence.scores = [value for _, _, value in alive]
        return alive

    @staticmethod
    def _ranked(sentence: _Sentence) -> list[Hypothesis]:
        finished = sentence.beams.finished[0]
        return sorted(finished, key=lambda h: -h.normalized_score)[: sentence.options.n_best]

    def _sentence_rows(self, indices: list[int]) -> np.ndarray:
        starts = [0, *itertools.accumulate(s.rows for s in self.sentences)]
        if not indices:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in indices])

    def _retain(self, survivors: list[int], cache_rows: np.ndarray, tokens: np.ndarray) -> None:
        """Keep sentences `survivors` (ascending indices); logical rows become `cache_rows` of the cache."""
        if not survivors:
            self._reset()
            return
        if len(survivors) < len(self.sentences):
            for i in sorted(set(range(len(self.sentences))) - set(survivors)):
                self._vocab.remove(self.sentences[i].vocab)
            rows = self._sentence_rows(survivors)  # ascending: the source side compacts in place
            self.source.keep(rows)
            if self.cache is None:
                self.past_mask = self.past_mask[rows]
            self.sentences = [self.sentences[i] for i in survivors]
            self.source.narrow(max(s.src_width for s in self.sentences))
        self._pending, self.tokens = cache_rows, tokens
        if self.cache is not None:
            return  # each row keeps only its own positions: nothing to cut
        real = self.past_mask.any(axis=0)
        cut = int(real.argmax()) if real.any() else self.past_len  # slots no row has any more
        if cut:
            self.past_mask = self.past_mask[:, cut:]
            self._cut += cut

    def _materialize(self, added: int) -> None:
        """Apply the pending row selection and cut to the cache, with `added` zero rows at the end (masked)."""
        rows, cut = self._pending, self._cut
        self._pending, self._cut = None, 0
        if self.cache is not None:
            if rows is not None:
                self.cache.keep(rows)
            self.cache.add(added)
            return
        if rows is None and not cut and not added:
            return
        if rows is not None and not cut and not added:  # a step's row changes only: as the static search
            ascending = bool((rows[1:] > rows[:-1]).all())
            if ascending and len(rows) == len(self.past[0]):
                return  # every row stays where it is
            self.past = [compact(p, rows) if ascending else p[rows] for p in self.past]
            return
        out = []
        for past in self.past:
            source = past[:, :, cut:] if cut else past
            n = len(past) if rows is None else len(rows)
            new = np.empty((n + added, *source.shape[1:]), past.dtype)
            if rows is None:
                new[:n] = source
            else:
                np.take(source, rows, axis=0, out=new[:n], mode="clip")  # clip: no buffering; rows are valid
            new[n:] = 0  # masked slots still enter the products: no NaN garbage
            out.append(new)
        self.past = out
