"""Small Marian models made here with `transformers` (the reference an import is checked against).

Each is trained for a few hundred steps on generated pairs (the target is the source's words through
a fixed word map, reversed), so that its outputs depend on its input; SentencePiece models are
trained on the spot and vocab.json is built from their pieces as OPUS-MT's are: `</s>` 0, `<unk>` 1,
the pieces, the `>>xxx<<` language tokens of a multilingual model, `<pad>` last.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

WORDS = (
    "man woman dog cat child bike ball red blue green big small runs jumps sits rides plays near under "
    "over street park beach snow water tree house car"
).split()
TARGET_WORDS = {w: w[::-1] + "o" for w in WORDS}  # a word map the model can learn
LANGUAGES = ("deu", "fra")


@dataclass(frozen=True)
class MarianSpec:
    activation: str = "swish"
    shared: bool = True
    multilingual: bool = False
    weights: str = "safetensors"  # or "bin"
    encoder_layers: int = 2
    decoder_layers: int = 1
    steps: int = 300


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) for _ in range(n)]


def translate_words(text: str, language: str = "deu") -> str:
    words = [TARGET_WORDS[w] for w in text.split()][::-1]
    return " ".join(words if language == "deu" else [w.upper() for w in words])


def train_spm(lines: list[str], path: Path) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=80,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
    )
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


def build_vocab(processors: list[spm.SentencePieceProcessor], extra: tuple[str, ...] = ()) -> dict[str, int]:
    pieces = ["</s>", "<unk>"]
    for sp in processors:
        pieces += [
            sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i) and not sp.is_unknown(i)
        ]
    pieces += list(extra)
    ordered = list(dict.fromkeys(pieces)) + ["<pad>"]
    return {piece: i for i, piece in enumerate(ordered)}


def encode(sp: spm.SentencePieceProcessor, vocab: dict[str, int], text: str) -> list[int]:
    """As MarianTokenizer does: a leading >>xxx<< token, pieces through vocab.json, </s> appended."""
    prefix = []
    if text.startswith(">>"):
        code, text = text.split(" ", 1)
        prefix = [vocab[code]]
    return prefix + [vocab.get(p, vocab["<unk>"]) for p in sp.encode(text, out_type=str)] + [vocab["</s>"]]


def make_marian(root: Path, spec: MarianSpec, seed: int = 0) -> Path:
    from transformers import MarianConfig, MarianMTModel

    root.mkdir(parents=True)
    languages = LANGUAGES if spec.multilingual else LANGUAGES[:1]
    sources = sentences(400, seed)
    pairs = [
        ((f">>{lang}<< " if spec.multilingual else "") + s, translate_words(s, lang))
        for s in sources
        for lang in languages
    ]
    source_sp = train_spm(sources, root / "source.spm")
    target_sp = train_spm([t for _, t in pairs], root / "target.spm")
    codes = tuple(f">>{lang}<<" for lang in languages) if spec.multilingual else ()
    if spec.shared:
        vocab = target_vocab = build_vocab([source_sp, target_sp], codes)
    else:
        vocab, target_vocab = build_vocab([source_sp], codes), build_vocab([target_sp])
        (root / "target_vocab.json").write_text(json.dumps(target_vocab))
    (root / "vocab.json").write_text(json.dumps(vocab))
    pad = vocab["<pad>"]
    config = MarianConfig(
        vocab_size=len(vocab),
        decoder_vocab_size=len(target_vocab),
        d_model=32,
        encoder_layers=spec.encoder_layers,
        decoder_layers=spec.decoder_layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        activation_function=spec.activation,
        max_position_embeddings=128,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=target_vocab["<pad>"],
        scale_embedding=True,
        share_encoder_decoder_embeddings=spec.shared,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config)
    with torch.no_grad():  # a bias to carry over
        model.final_logits_bias.normal_(0.0, 0.1)
    train(model, [(encode(source_sp, vocab, s), encode(target_sp, target_vocab, t)) for s, t in pairs], pad, spec.steps)
    model.generation_config.num_beams = 4
    model.generation_config.bad_words_ids = [[target_vocab["<pad>"]]]
    model.generation_config.max_length = 64
    model.save_pretrained(root)
    if spec.weights == "bin":
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, root / "pytorch_model.bin")
        (root / "model.safetensors").unlink()
    return root


def make_and_import(root: Path, spec: MarianSpec) -> tuple[Path, Path]:
    """A Marian directory made here (root/hf) and its import by nmt-import (root/ours)."""
    from nmt.training.marian import main

    source = make_marian(root / "hf", spec)
    assert main([str(source), str(root / "ours")]) == 0
    return source, root / "ours"


def train(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], pad: int, steps: int) -> None:
    rng = random.Random(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(pairs, 32)
        src = pad_right([s for s, _ in batch], pad)
        labels = pad_right([t for _, t in batch], -100)
        loss = model(input_ids=src, attention_mask=src != pad, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])
