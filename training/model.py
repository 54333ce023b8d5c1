"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

Written so the exporter can trace it: `encode()` and `decode()` are separate (they become the
encoder and decoder ONNX graphs), cross-attention keys/values are computed once per sentence
(`cross_kv()`), and `decode()` takes and returns the self-attention KV cache, so full decoding
and incremental decoding run the same code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (B, n_heads, len, d_head)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8000
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1  # embeddings and residual branches (fairseq's --dropout)
    attention_dropout: float = 0.0  # on attention weights; fairseq's default is 0
    activation_dropout: float = 0.0  # inside the feed-forward block; fairseq's default is 0
    pre_norm: bool = False  # the paper is post-norm ("Add & Norm")
    max_positions: int = 1024
    pad_id: int = 0
    # What other checkpoints (Marian / OPUS-MT) differ in; the defaults are our recipe's.
    activation: str = "relu"  # the feed-forward block's: relu, gelu (exact) or swish (SiLU)
    scale_embedding: bool = True  # token embeddings times sqrt(d_model)
    position_layout: str = "interleaved"  # sinusoids: sin/cos interleaved (ours), or "halves" (Marian, fairseq)
    output_bias: bool = False  # a bias on the output layer (Marian's final_logits_bias)
    shared_embeddings: bool = True  # one matrix for source, target and output; False: the encoder has its own
    decoder_vocab_size: int | None = None  # the target vocabulary's size when it differs from the source's
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.position_layout not in POSITION_LAYOUTS:
            raise ValueError(
                f"position_layout must be one of {', '.join(POSITION_LAYOUTS)}, got {self.position_layout!r}"
            )
        if self.decoder_vocab_size is not None and (self.decoder_vocab_size <= 0 or self.shared_embeddings):
            raise ValueError(
                "decoder_vocab_size needs separate embeddings (shared_embeddings false) and must be "
                f"positive, got {self.decoder_vocab_size}"
            )
        if not 0 <= self.pad_id < min(self.vocab_size, self.target_vocab_size):
            raise ValueError(f"pad_id {self.pad_id} is not an id of the vocabulary ({self.vocab_size} pieces)")
        if not 0.0 < self.layer_norm_eps < 1.0:
            raise ValueError(f"layer_norm_eps must be in (0, 1), got {self.layer_norm_eps}")

    @property
    def target_vocab_size(self) -> int:
        return self.vocab_size if self.decoder_vocab_size is None else self.decoder_vocab_size

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**values)


PRESETS: dict[str, dict] = {
    # 4 layers, d_model 128: the strongest published Multi30k setup for small data.
    "tiny": dict(d_model=128, n_heads=4, d_ff=256, n_encoder_layers=4, n_decoder_layers=4, dropout=0.3),
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=4, n_decoder_layers=4, dropout=0.3),
    "base": dict(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1),
    "big": dict(d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}
POSITION_LAYOUTS = ("interleaved", "halves")


def sinusoidal_table(max_positions: int, d_model: int, layout: str = "interleaved") -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) ("interleaved", the
    paper's); "halves" puts every sine first and every cosine after them (Marian, fairseq)."""
    position = torch.arange(max_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    sines, cosines = torch.sin(position * inv_freq), torch.cos(position * inv_freq)  # (max_positions, ceil(d/2))
    if layout == "halves":
        return torch.cat([sines, cosines[:, : d_model // 2]], dim=1).float()  # (max_positions, d_model)
    table = torch.zeros(max_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = sines
    table[:, 1::2] = cosines[:, : d_model // 2]
    return table.float()  # (max_positions, d_model)


class Dropout(nn.Module):
    """Inverted dropout with a mask drawn by `torch.rand`.

    On CPU, `nn.Dropout` (a Bernoulli draw per element) was 26% of a training step; a uniform
    draw compared with `p` gives the same distribution at about half the cost, forward and
    backward (3,500 x 128 activations, 2 threads: 1.6 ms against 3.4 ms).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.attention_dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, d_head)

    def project_kv(self, x: torch.Tensor) -> KV:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def forward(self, x: torch.Tensor, kv: KV, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_model) queries; kv: keys/values (B, H, S, d_head); mask: bool, True = attend."""
        q = self.split_heads(self.q_proj(x))  # (B, H, T, d_head)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, dropout_p=dropout)
        B, H, T, Dh = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * Dh))  # (B, T, d_model)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.linear2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = Dropout(cfg.activation_dropout)
        self.activation = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class Residual(nn.Module):
    """Add & Norm around one sublayer: post-norm as in the paper, or pre-norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)
        self.pre_norm = cfg.pre_norm

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg)
        self.ffn = FeedForward(cfg)
        self.attn_block, self.ffn_block = Residual(cfg), Residual(cfg)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_block(x, lambda h: self.self_attn(h, self.self_attn.project_kv(h), src_mask))
        return self.ffn_block(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg)
        self.cross_attn = MultiHeadAttention(cfg)
        self.ffn = FeedForward(cfg)
        self.self_block, self.cross_block, self.ffn_block = Residual(cfg), Residual(cfg), Residual(cfg)

    def forward(
        self, x: torch.Tensor, past: KV | None, causal: torch.Tensor, cross: KV, src_mask: torch.Tensor
    ) -> tuple[torch.Tensor, KV]:
        present: list[KV] = []

        def self_attention(h: torch.Tensor) -> torch.Tensor:
            k, v = self.self_attn.project_kv(h)  # (B, H, T, d_head)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            present.append((k, v))
            return self.self_attn(h, (k, v), causal)

        x = self.self_block(x, self_attention)
        x = self.cross_block(x, lambda h: self.cross_attn(h, cross, src_mask))
        return self.ffn_block(x, self.ffn), present[0]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # The target embedding, tied with the output layer; with shared_embeddings (one joint
        # vocabulary, our recipe) the source's too, else the encoder has src_embedding.
        self.embedding = nn.Embedding(cfg.target_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.src_embedding = (
            None if cfg.shared_embeddings else nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        )
        self.output_bias = nn.Parameter(torch.zeros(cfg.target_vocab_size)) if cfg.output_bias else None
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.register_buffer(
            "positions", sinusoidal_table(cfg.max_positions, cfg.d_model, cfg.position_layout), persistent=False
        )
        self.embed_dropout = Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # Pre-norm stacks need a final norm; post-norm layers already end in one.
        self.encoder_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.pre_norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1:
                # q/k/v with gain 1/sqrt(2), as fairseq does and as torch's packed in_proj works
                # out to: it learned faster than plain Xavier against torch.nn.Transformer on the
                # same batches (scripts/reference_check.py).
                qkv = name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj")
                nn.init.xavier_uniform_(p, gain=2**-0.5 if qkv else 1.0)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        for embedding in (self.embedding, self.src_embedding):
            if embedding is not None:
                nn.init.normal_(embedding.weight, mean=0.0, std=self.cfg.d_model**-0.5)
                with torch.no_grad():
                    embedding.weight[self.cfg.pad_id].zero_()

    def embed(self, ids: torch.Tensor, offset: int | torch.Tensor = 0, source: bool = False) -> torch.Tensor:
        """Token embeddings plus positions: from `offset` on (int), or given per token ((B, T) long)."""
        T = ids.shape[1]
        positions = self.positions[offset] if isinstance(offset, torch.Tensor) else self.positions[offset : offset + T]
        table = self.src_embedding if source and self.src_embedding is not None else self.embedding
        x = table(ids) * self.embed_scale + positions  # (B, T, d_model)
        return self.embed_dropout(x)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """src: (B, S) ids; src_mask: (B, S) bool, True for real tokens -> memory (B, S, d_model)."""
        attn_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self.embed(src, source=True)
        for layer in self.encoder_layers:
            x = layer(x, attn_mask)
        return self.encoder_norm(x)

    def cross_kv(self, memory: torch.Tensor) -> list[KV]:
        """Cross-attention keys/values of every decoder layer, computed once per sentence."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder_layers]

    def decode(
        self,
        tgt: torch.Tensor,
        cross: list[KV],
        src_mask: torch.Tensor,
        past: list[KV] | None = None,
        past_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """tgt: (B, T) new target ids after `past` (P cached positions) -> logits (B, T, V), present KV.

        past_mask: (B, P+T) bool, True for the cache slots a row really has and for its new tokens
        (which must be True). Rows that joined a running batch later have masked (padding) slots
        in front; each token's position is the number of real keys before it. None: all real.
        """
        states, present = self.decoder_states(tgt, cross, src_mask, past, past_mask)
        return self.project(states), present

    def decoder_states(
        self,
        tgt: torch.Tensor,
        cross: list[KV],
        src_mask: torch.Tensor,
        past: list[KV] | None = None,
        past_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """The decoder stack's output (B, T, d_model) before the output projection, and present KV."""
        T = tgt.shape[1]
        P = 0 if past is None else past[0][0].shape[2]
        # Query i (absolute slot P+i) sees keys 0..P+i.
        self_mask = torch.ones(T, P + T, dtype=torch.bool, device=tgt.device).tril(diagonal=P)
        cross_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        if past_mask is None:
            x = self.embed(tgt, P)
        else:
            self_mask = past_mask[:, None, None, :] & self_mask  # (B, 1, T, P+T)
            real = past_mask.long()
            x = self.embed(tgt, (real.cumsum(dim=1) - real)[:, P:])  # positions (B, T): real keys before
        present: list[KV] = []
        for i, layer in enumerate(self.decoder_layers):
            x, kv = layer(x, None if past is None else past[i], self_mask, cross[i], cross_mask)
            present.append(kv)
        return self.decoder_norm(x), present

    def project(self, states: torch.Tensor) -> torch.Tensor:
        return F.linear(states, self.embedding.weight, self.output_bias)  # (..., V), tied weights

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor,
        tgt_in: torch.Tensor,
        keep: torch.Tensor | None = None,
        project: bool = True,
    ) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) for every target position, or (N, V) for the N
        positions where `keep` (B, T) is True. `project=False` returns the decoder states instead
        of logits (training fuses the projection into its loss: training/output_loss.py)."""
        memory = self.encode(src, src_mask)
        states, _ = self.decoder_states(tgt_in, self.cross_kv(memory), src_mask)
        states = states if keep is None else states[keep]
        return self.project(states) if project else states

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
