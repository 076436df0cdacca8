"""The demo task: a small Transformer encoder–decoder on a synthetic parallel corpus.

Reference: ``replay.tasks.toy_nmt:ToyNMT``. The model is written out in plain torch (pre-norm,
fairseq-style parameter names, no dropout) so that it behaves identically in float32 and
float64, in train and eval mode, with and without autograd — the replay needs
``L(θ; D)`` to be one well-defined function:

    encoder.embed_tokens.weight               (V_src, C)
    encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    encoder.layers.{i}.{self_attn,final}_layer_norm.{weight,bias}
    encoder.layers.{i}.fc{1,2}.{weight,bias}
    encoder.layer_norm.{weight,bias}
    decoder.embed_tokens.weight               (V_tgt, C)
    decoder.layers.{i}.… as above, plus encoder_attn.* and encoder_attn_layer_norm.*
    decoder.layer_norm.{weight,bias}
    decoder.output_projection.weight          (V_tgt, C)  the "softmax matrix", not tied

Positions are sinusoidal and computed on the fly (no parameters, no buffers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from replay.errors import TaskError
from replay.tasks.toy_corpus import BOS, EOS, PAD, SPLITS, Pair, make_corpus


def sinusoidal_positions(length: int, dim: int, dtype: torch.dtype, device) -> Tensor:
    """(length, dim) sine/cosine position codes (Vaswani et al.), in the activations' dtype."""
    pos = torch.arange(length, dtype=dtype, device=device)[:, None]  # (T, 1)
    freq = torch.exp(
        torch.arange(0, dim, 2, dtype=dtype, device=device) * (-math.log(10000.0) / dim)
    )  # (C/2,)
    out = torch.zeros(length, dim, dtype=dtype, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return out


class Attention(nn.Module):
    """Multi-head scaled dot-product attention with boolean masks (True = may not attend)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, T, C) attends to memory (B, S, C); mask broadcasts to (B, H, T, S)."""
        B, T, C = x.shape
        S, H = memory.shape[1], self.heads
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, C/H)
        k = self.k_proj(memory).view(B, S, H, C // H).transpose(1, 2)  # (B, H, S, C/H)
        v = self.v_proj(memory).view(B, S, H, C // H).transpose(1, 2)  # (B, H, S, C/H)
        scores = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        out = scores.softmax(dim=-1) @ v  # (B, H, T, C/H)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """x (B, S, C); pad_mask (B, 1, 1, S) bool."""
        h = self.self_attn_layer_norm(x)
        x = x + self.self_attn(h, h, pad_mask)
        return x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = Attention(dim, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, y: Tensor, causal: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """y (B, T, C); causal (T, T) bool; memory (B, S, C); src_mask (B, 1, 1, S) bool."""
        h = self.self_attn_layer_norm(y)
        y = y + self.self_attn(h, h, causal)
        y = y + self.encoder_attn(self.encoder_attn_layer_norm(y), memory, src_mask)
        return y + self.fc2(F.relu(self.fc1(self.final_layer_norm(y))))


class Encoder(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, ffn_dim: int, layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) int64 -> (memory (B, S, C), pad mask (B, 1, 1, S) bool)."""
        x = self.embed_tokens(src) * math.sqrt(self.embed_tokens.embedding_dim)  # (B, S, C)
        x = x + sinusoidal_positions(src.shape[1], x.shape[-1], x.dtype, x.device)
        pad_mask = (src == PAD)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, pad_mask)
        return self.layer_norm(x), pad_mask


class Decoder(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, ffn_dim: int, layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn_dim) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.output_projection = nn.Linear(dim, vocab, bias=False)

    def forward(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """tgt_in (B, T) int64 -> logits (B, T, V_tgt)."""
        T = tgt_in.shape[1]
        y = self.embed_tokens(tgt_in) * math.sqrt(self.embed_tokens.embedding_dim)  # (B, T, C)
        y = y + sinusoidal_positions(T, y.shape[-1], y.dtype, y.device)
        # Boolean, so it is valid in any floating dtype; padded targets need no mask because
        # they sit at the end (causality hides them) and are ignored by the loss.
        causal = torch.ones(T, T, dtype=torch.bool, device=y.device).triu(1)
        for layer in self.layers:
            y = layer(y, causal, memory, src_mask)
        return self.output_projection(self.layer_norm(y))


class ToyTransformer(nn.Module):
    """Encoder–decoder Transformer: (src (B, S), tgt_in (B, T)) -> logits (B, T, V_tgt)."""

    def __init__(self, vocab_size: int, d_model: int, heads: int, ffn_dim: int,
                 encoder_layers: int, decoder_layers: int):
        super().__init__()
        self.encoder = Encoder(vocab_size, d_model, heads, ffn_dim, encoder_layers)
        self.decoder = Decoder(vocab_size, d_model, heads, ffn_dim, decoder_layers)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, src_mask = self.encoder(src)
        return self.decoder(tgt_in, memory, src_mask)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Xavier-uniform linears, N(0, 1/C) embeddings (pad row 0), unit layer norms."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):
                    dim = module.embedding_dim
                    nn.init.normal_(module.weight, std=dim**-0.5, generator=generator)
                    module.weight[PAD].zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.reset_parameters()


class ToyNMT:
    """Task: translate the synthetic corpus of :mod:`replay.tasks.toy_corpus`.

    Items are ``(source ids, target ids)`` pairs; a batch is a dict of int64 tensors
    ``src`` (B, S) = source + EOS, ``tgt_in`` (B, T) = BOS + target, ``tgt_out`` (B, T) =
    target + EOS, right-padded with PAD. The loss is the summed token cross-entropy (nats)
    over non-pad ``tgt_out`` tokens. Source and target vocabularies have the same size and
    the same specials (PAD=0, BOS=1, EOS=2) but separate embeddings.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        vocab_size: int = 80,
        train_size: int = 1280,
        valid_size: int = 256,
        test_size: int = 256,
        min_len: int = 4,
        max_len: int = 10,
        zipf_exponent: float = 1.0,
        modifier_fraction: float = 0.25,
        d_model: int = 48,
        heads: int = 4,
        ffn_dim: int = 96,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        eval_batch_size: int = 512,
    ):
        checks = [
            (vocab_size >= 5, f"vocab_size={vocab_size} must be >= 5 (3 specials + 2 words)"),
            (train_size >= 1, f"train_size={train_size} must be >= 1"),
            (min(valid_size, test_size) >= 0, "valid_size and test_size must be >= 0"),
            (1 <= min_len <= max_len, f"need 1 <= min_len <= max_len, got {min_len}, {max_len}"),
            (0.0 <= modifier_fraction <= 1.0, "modifier_fraction must be in [0, 1]"),
            (d_model % 2 == 0, f"d_model={d_model} must be even (sine/cosine position pairs)"),
            (heads >= 1 and d_model % heads == 0,
             f"d_model={d_model} must be divisible by heads={heads}"),
            (min(ffn_dim, encoder_layers, decoder_layers, eval_batch_size) >= 1,
             "ffn_dim, encoder_layers, decoder_layers and eval_batch_size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise TaskError(f"ToyNMT: {message}")
        self.seed = seed
        self.vocab_size = vocab_size
        self.eval_batch_size = eval_batch_size
        self.model_args = {"vocab_size": vocab_size, "d_model": d_model, "heads": heads,
                           "ffn_dim": ffn_dim, "encoder_layers": encoder_layers,
                           "decoder_layers": decoder_layers}
        sizes = {"train": train_size, "valid": valid_size, "test": test_size}
        self.grammar, self._splits = make_corpus(seed, vocab_size, sizes, min_len, max_len,
                                                 zipf_exponent, modifier_fraction)

    # --- the Task protocol -------------------------------------------------------------------

    def build_model(self) -> ToyTransformer:
        """A fresh model, initialised from ``seed`` (the global torch RNG is left untouched)."""
        with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
            model = ToyTransformer(**self.model_args)
        model.reset_parameters(torch.Generator().manual_seed(self.seed))
        return model

    def datasets(self) -> dict[str, list[Pair]]:
        return {name: self._splits[name] for name in SPLITS if self._splits[name]}

    def collate(self, items: Sequence[Pair]) -> dict[str, Tensor]:
        B = len(items)
        S = max(len(src) for src, _ in items) + 1
        T = max(len(tgt) for _, tgt in items) + 1
        src = np.full((B, S), PAD, dtype=np.int64)
        tgt_in = np.full((B, T), PAD, dtype=np.int64)
        tgt_out = np.full((B, T), PAD, dtype=np.int64)
        for b, (s, t) in enumerate(items):
            src[b, : len(s)], src[b, len(s)] = s, EOS
            tgt_in[b, 0], tgt_in[b, 1 : len(t) + 1] = BOS, t
            tgt_out[b, : len(t)], tgt_out[b, len(t)] = t, EOS
        return {"src": torch.from_numpy(src), "tgt_in": torch.from_numpy(tgt_in),
                "tgt_out": torch.from_numpy(tgt_out)}

    def item_size(self, item: Pair) -> int:
        """Source plus target words: the replay batches pairs of similar length together."""
        return len(item[0]) + len(item[1])

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """(Σ token cross-entropy in nats over non-pad targets, 0-d tensor; number of tokens)."""
        logits = model(batch["src"], batch["tgt_in"])  # (B, T, V)
        target = batch["tgt_out"]  # (B, T)
        total = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD,
                                reduction="sum")
        return total, int((target != PAD).sum())

    def token_counts(self) -> dict[str, Tensor]:
        """Per-row token frequencies in the train split, for the embedding and softmax rows."""
        src, tgt_in, tgt_out = self._counts("train")
        return {
            "encoder.embed_tokens.weight": torch.from_numpy(src),
            "decoder.embed_tokens.weight": torch.from_numpy(tgt_in),
            "decoder.output_projection.weight": torch.from_numpy(tgt_out),
        }

    # --- helpers for training and reports ----------------------------------------------------

    def training_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
        """Endless batches of the train split, reshuffled every epoch from ``(seed, epoch)``."""
        train = self._splits["train"]
        epoch = 0
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(len(train))
            for start in range(0, len(train), batch_size):
                yield self.collate([train[i] for i in order[start : start + batch_size]])
            epoch += 1

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy (nats) of the target-token distribution (words + EOS) of ``split``: the
        loss of the best model that ignores the source — what training must beat."""
        counts = self._counts(split)[2].astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def _counts(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(V,) int64 counts of the tokens in ``src``, ``tgt_in`` and ``tgt_out`` of a split."""
        pairs = self._splits[split]
        V = self.vocab_size
        src = np.bincount([w for s, _ in pairs for w in (*s, EOS)], minlength=V)
        tgt_in = np.bincount([w for _, t in pairs for w in (BOS, *t)], minlength=V)
        tgt_out = np.bincount([w for _, t in pairs for w in (*t, EOS)], minlength=V)
        return src.astype(np.int64), tgt_in.astype(np.int64), tgt_out.astype(np.int64)
