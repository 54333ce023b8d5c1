"""The annotated-transformer's fastest end-to-end check: learn to copy random sequences.

700 steps: about half a minute on one CPU core.
"""

from __future__ import annotations

import torch

from nmt.training.model import ModelConfig, Transformer
from nmt.training.optim import make_optimizer, noam_lr, smoothed_loss
from nmt.training.search import greedy_search, pad_batch
from nmt.training.tokenizer import BOS_ID, EOS_ID

VOCAB, FIRST_SYMBOL = 20, 4  # ids 0-3 are pad/unk/bos/eos


def random_sequences(generator: torch.Generator, n: int) -> list[list[int]]:
    lengths = torch.randint(3, 9, (n,), generator=generator).tolist()
    return [torch.randint(FIRST_SYMBOL, VOCAB, (k,), generator=generator).tolist() for k in lengths]


def test_tiny_model_learns_to_copy_within_a_minute():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=64, n_heads=4, d_ff=128, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0
    )
    model = Transformer(cfg)
    optimizer = make_optimizer(model)
    for step in range(1, 701):
        seqs = random_sequences(generator, 64)
        src, src_mask = pad_batch([s + [EOS_ID] for s in seqs])
        tgt_in, _ = pad_batch([[BOS_ID] + s for s in seqs])
        tgt_out, _ = pad_batch([s + [EOS_ID] for s in seqs])
        for group in optimizer.param_groups:
            group["lr"] = noam_lr(step, cfg.d_model, warmup=100, peak=1e-3)
        loss, _ = smoothed_loss(model(src, src_mask, tgt_in), tgt_out, smoothing=0.0)
        (loss / int((tgt_out != 0).sum())).backward()
        optimizer.step()
        optimizer.zero_grad()
    test = random_sequences(torch.Generator().manual_seed(123), 200)
    outputs = [h.tokens for h in greedy_search(model, test, max_len_extra=2)]
    correct = sum(o == s for o, s in zip(outputs, test))
    assert correct / len(test) > 0.99, f"copied {correct}/{len(test)} exactly"
