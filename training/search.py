"""Batched greedy and beam search in torch, with the KV cache.

This is the reference the exported ONNX graphs and the server's numpy search are checked
against, so its rules are spelled out:
- a source is its tokens followed by EOS; decoding starts from BOS;
- a hypothesis may hold at most `len(source tokens) + max_len_extra` tokens, EOS included;
  at that length EOS is forced;
- beam search keeps `beam_size` live hypotheses per sentence, takes the best 2·beam candidates
  per step, finalizes an EOS candidate only when it ranks among the best `beam_size`, and a
  sentence is done once it has `beam_size` finished hypotheses (fairseq's rule);
- finished hypotheses are ranked by log-probability / lp, with the GNMT length penalty
  lp = ((5 + length) / 6) ** alpha, length counting EOS (alpha 0.6 in the paper);
- no n-gram of up to 6 tokens may occur 4 times in a row (the repetition guard,
  nmt.engine.hypothesis.blocked_tokens): its completing token gets -inf;
- sentences that are done leave the batch (their rows are dropped from every cached tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nmt.engine.hypothesis import Hypothesis, blocked_tokens, length_penalty

from .model import Transformer
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class SpecialIds:
    """The ids the search treats apart: ours (training/tokenizer.py), or a checkpoint's (Marian: EOS 0,
    the decoder starts from <pad>, which is never generated)."""

    start: int = BOS_ID
    eos: int = EOS_ID
    pad: int = PAD_ID
    never: tuple[int, ...] = ()  # ids no hypothesis may hold


OURS = SpecialIds()


RANKINGS = ("gnmt", "transformers")


def _cannot_improve(finished: list[Hypothesis], best_running: float, length: int, alpha: float, K: int) -> bool:
    """transformers' early-stop heuristic: K finished, and the best running beam's score at its length so far
    is no better than the worst of them."""
    return len(finished) >= K and best_running / length**alpha <= finished[-1].normalized_score


def pad_batch(
    seqs: list[list[int]], device: torch.device | str = "cpu", pad: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists -> (ids (B, S) long, mask (B, S) bool with True for real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    ids = ids.to(device)
    return ids, ids != pad


class _Batch:
    """Decoder state for the rows still being decoded; `select` keeps only the given rows."""

    def __init__(self, model: Transformer, sources: list[list[int]], device, repeat: int, special: SpecialIds = OURS):
        src, src_mask = pad_batch([s + [special.eos] for s in sources], device, special.pad)
        memory = model.encode(src, src_mask)
        self.cross = [
            (k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for k, v in model.cross_kv(memory)
        ]
        self.src_mask = src_mask.repeat_interleave(repeat, 0)
        self.past: list | None = None

    def step(self, model: Transformer, last_tokens: torch.Tensor, never: tuple[int, ...] = ()) -> torch.Tensor:
        """last_tokens (R,) -> log-probabilities (R, V) of the next token (-inf for `never`)."""
        logits, self.past = model.decode(last_tokens[:, None], self.cross, self.src_mask, self.past)
        log_probs = F.log_softmax(logits[:, -1].float(), dim=-1)
        if never:
            log_probs[:, list(never)] = float("-inf")
        return log_probs

    def select(self, rows: torch.Tensor) -> None:
        pick = lambda t: t.index_select(0, rows)  # noqa: E731
        self.cross = [(pick(k), pick(v)) for k, v in self.cross]
        self.past = [(pick(k), pick(v)) for k, v in self.past]
        self.src_mask = pick(self.src_mask)


@torch.no_grad()
def greedy_search(
    model: Transformer,
    sources: list[list[int]],
    max_len_extra: int = 50,
    device: str | torch.device = "cpu",
    repetition_guard: bool = True,
    special: SpecialIds = OURS,
) -> list[Hypothesis]:
    """Most probable next token at each step, for a batch of sources (token ids without EOS)."""
    if not sources:
        return []
    model.eval()
    eos = special.eos
    batch = _Batch(model, sources, device, repeat=1, special=special)
    max_lens = torch.tensor([len(s) + max_len_extra for s in sources], device=device)
    active = torch.arange(len(sources), device=device)  # original index of each row
    last = torch.full((len(sources),), special.start, dtype=torch.long, device=device)
    scores = torch.zeros(len(sources), device=device)
    outputs: list[list[int]] = [[] for _ in sources]
    results: list[Hypothesis | None] = [None] * len(sources)
    step = 0
    while active.numel():
        log_probs = batch.step(model, last, special.never)  # (R, V)
        at_limit = step + 1 >= max_lens[active]
        log_probs[at_limit] = torch.where(
            torch.arange(log_probs.shape[1], device=device) == eos, log_probs[at_limit], float("-inf")
        )
        for i, row in enumerate(active.tolist() if repetition_guard else []):  # nmt.engine.hypothesis
            if blocked := blocked_tokens(outputs[row]):
                log_probs[i, blocked] = float("-inf")
        best, last = log_probs.max(dim=-1)
        scores[active] += best
        finished = last == eos
        for row, token in zip(active.tolist(), last.tolist()):
            if token != eos:
                outputs[row].append(token)
        for row in active[finished].tolist():
            results[row] = Hypothesis(outputs[row], scores[row].item(), scores[row].item())
        keep = (~finished).nonzero().squeeze(1)
        if keep.numel() < active.numel() and keep.numel():
            batch.select(keep)
            last = last[keep]
        active = active[keep]
        step += 1
    return results  # type: ignore[return-value]


@torch.no_grad()
def beam_search(
    model: Transformer,
    sources: list[list[int]],
    beam_size: int = 4,
    alpha: float = 0.6,
    n_best: int = 1,
    max_len_extra: int = 50,
    device: str | torch.device = "cpu",
    repetition_guard: bool = True,
    special: SpecialIds = OURS,
    ranking: str = "gnmt",
) -> list[list[Hypothesis]]:
    """The `n_best` best hypotheses per source, best first.

    ranking "gnmt" (ours, the rules above); "transformers" (what MarianMTModel.generate() does with
    early_stopping off, an imported model's default): a finished hypothesis scores log-probability /
    length ** alpha (length counting EOS), the beam_size best finished are kept, and a sentence is done
    once its best running beam, scored at its length so far, cannot beat the worst of them."""
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size ({beam_size}), got {n_best}")
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    if not sources:
        return []
    model.eval()
    K, B = beam_size, len(sources)
    eos = special.eos
    batch = _Batch(model, sources, device, repeat=K, special=special)
    max_lens = [len(s) + max_len_extra for s in sources]
    active = list(range(B))  # original sentence index of each live group of K rows
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    prefixes: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    last = torch.full((B * K,), special.start, dtype=torch.long, device=device)
    step = 0
    while active:
        log_probs = batch.step(model, last, special.never)  # (A*K, V)
        V = log_probs.shape[1]
        log_probs = log_probs.view(len(active), K, V)
        for a, sentence in enumerate(active):
            if step + 1 >= max_lens[sentence]:
                eos_scores = log_probs[a, :, eos].clone()
                log_probs[a] = float("-inf")
                log_probs[a, :, eos] = eos_scores
        for a, sentence in enumerate(
            active if repetition_guard else []
        ):  # the repetition guard (nmt.engine.hypothesis)
            for beam, prefix in enumerate(prefixes[sentence]):
                if blocked := blocked_tokens(prefix):
                    log_probs[a, beam, blocked] = float("-inf")
        candidates = (scores[:, :, None] + log_probs).view(len(active), K * V)
        top_scores, top_index = candidates.topk(2 * K, dim=1)  # (A, 2K)
        origin, token = (top_index // V).tolist(), (top_index % V).tolist()
        top_list = top_scores.tolist()
        next_rows, next_tokens, next_scores, still_active = [], [], [], []
        for a, sentence in enumerate(active):
            alive: list[tuple[int, int, float]] = []
            for rank in range(2 * K):
                beam, tok, score = origin[a][rank], token[a][rank], top_list[a][rank]
                if tok == eos:
                    if rank < K and score > float("-inf"):
                        length = len(prefixes[sentence][beam]) + 1
                        norm = score / (length**alpha if ranking == "transformers" else length_penalty(length, alpha))
                        finished[sentence].append(Hypothesis(prefixes[sentence][beam], score, norm))
                elif len(alive) < K:
                    alive.append((beam, tok, score))
            if ranking == "transformers":
                finished[sentence] = sorted(finished[sentence], key=lambda h: -h.normalized_score)[:K]
                if not alive or _cannot_improve(finished[sentence], alive[0][2], step + 1, alpha, K):
                    continue
            elif len(finished[sentence]) >= K:
                continue
            still_active.append(sentence)
            prefixes[sentence] = [prefixes[sentence][beam] + [tok] for beam, tok, _ in alive]
            next_rows += [a * K + beam for beam, _, _ in alive]
            next_tokens += [tok for _, tok, _ in alive]
            next_scores.append([score for _, _, score in alive])
        if still_active:
            rows = torch.tensor(next_rows, device=device)
            batch.select(rows)
            last = torch.tensor(next_tokens, dtype=torch.long, device=device)
            scores = torch.tensor(next_scores, device=device)
        active = still_active
        step += 1
    return [sorted(f, key=lambda h: -h.normalized_score)[:n_best] for f in finished]
