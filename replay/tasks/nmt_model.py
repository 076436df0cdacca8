"""A Transformer encoder–decoder in the shape of fairseq's ``transformer_iwslt_de_en``.

Parameter names follow fairseq, so the grouping presets find embeddings, layers and the
softmax matrix::

    encoder.embed_tokens.weight                 (V, C)
    encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    encoder.layers.{i}.{self_attn,final}_layer_norm.{weight,bias}
    encoder.layers.{i}.fc{1,2}.{weight,bias}
    encoder.layer_norm.{weight,bias}            (pre-norm only)
    decoder.embed_tokens.weight                 (V, C)
    decoder.layers.{i}.… as above, plus encoder_attn.* and encoder_attn_layer_norm.*
    decoder.layer_norm.{weight,bias}            (pre-norm only)
    decoder.output_projection.weight            (V, C)  the "softmax matrix"

fairseq's defaults for that architecture: C = 512, feed-forward 1024, 4 heads, 6 + 6 layers,
post-norm (``normalize_before=False``), dropout 0.1 after embeddings and every sub-layer, no
attention or activation dropout, embeddings scaled by √C, sinusoidal positions (computed on the
fly here: no parameters, no buffers). Source and target embeddings and the output projection
are separate tensors by default; ``share_decoder_embeddings`` makes the output projection the
decoder embedding and ``share_all_embeddings`` makes all three one tensor — the *same*
``nn.Parameter``, so a Recorder records it once and keeps the other names as aliases.

Dropout acts in train mode only; in eval mode (every replay) the model is one deterministic
function, identical in float32 and float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_positions(length: int, dim: int, dtype: torch.dtype, device) -> Tensor:
    """(length, dim) sine/cosine position codes (Vaswani et al.), in the activations' dtype."""
    pos = torch.arange(length, dtype=dtype, device=device)[:, None]  # (T, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=dtype, device=device)
                     * (-math.log(10000.0) / dim))  # (C/2,)
    out = torch.zeros(length, dim, dtype=dtype, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return out


class Attention(nn.Module):
    """Multi-head scaled dot-product attention; boolean masks, True = may not attend."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, T, C) attends to memory (B, S, C); mask broadcasts to (B, H, T, S)."""
        return self.attend(x, *self.keys_values(memory), mask)

    def keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory (B, S, C) -> keys and values, each (B, H, S, C/H)."""
        B, S, C = memory.shape
        H = self.heads
        k = self.k_proj(memory).view(B, S, H, C // H).transpose(1, 2)
        v = self.v_proj(memory).view(B, S, H, C // H).transpose(1, 2)
        return k, v

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, T, C) attends to keys/values (B, H, S, C/H) -> (B, T, C)."""
        B, T, C = x.shape
        H = self.heads
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, C/H)
        scores = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        out = scores.softmax(dim=-1) @ v  # (B, H, T, C/H)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


def residual(x: Tensor, norm: nn.LayerNorm, f, pre: bool, p: float, training: bool) -> Tensor:
    """One residual sub-layer ``x + dropout(f(x))``, normalised before f (pre-norm) or after
    the sum (post-norm, fairseq's default)."""
    y = f(norm(x) if pre else x)
    x = x + F.dropout(y, p, training)
    return x if pre else norm(x)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, pre: bool, dropout: float):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.pre, self.p = pre, dropout

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """x (B, S, C); pad_mask (B, 1, 1, S) bool."""
        on = (self.pre, self.p, self.training)
        x = residual(x, self.self_attn_layer_norm, lambda h: self.self_attn(h, h, pad_mask), *on)
        return residual(x, self.final_layer_norm, lambda h: self.fc2(F.relu(self.fc1(h))), *on)


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, pre: bool, dropout: float):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = Attention(dim, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.pre, self.p = pre, dropout

    def forward(self, y: Tensor, causal: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """y (B, T, C); causal (T, T) bool; memory (B, S, C); src_mask (B, 1, 1, S) bool."""
        on = (self.pre, self.p, self.training)
        y = residual(y, self.self_attn_layer_norm, lambda h: self.self_attn(h, h, causal), *on)
        y = residual(y, self.encoder_attn_layer_norm,
                     lambda h: self.encoder_attn(h, memory, src_mask), *on)
        return residual(y, self.final_layer_norm, lambda h: self.fc2(F.relu(self.fc1(h))), *on)

    def step(self, y: Tensor, cache: dict, cross: tuple[Tensor, Tensor],
             src_mask: Tensor) -> Tensor:
        """The newest position only: y (B, 1, C); ``cache`` holds this layer's self-attention
        keys/values of the earlier positions (extended here); ``cross``: the encoder memory's
        keys/values. Equal to the last position of :meth:`forward` on the whole prefix."""
        on = (self.pre, self.p, self.training)

        def self_attention(h: Tensor) -> Tensor:
            k, v = self.self_attn.keys_values(h)
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            return self.self_attn.attend(h, k, v, None)  # the newest position sees them all

        y = residual(y, self.self_attn_layer_norm, self_attention, *on)
        y = residual(y, self.encoder_attn_layer_norm,
                     lambda h: self.encoder_attn.attend(h, *cross, src_mask), *on)
        return residual(y, self.final_layer_norm, lambda h: self.fc2(F.relu(self.fc1(h))), *on)


def _embed(table: nn.Embedding, ids: Tensor, dropout: float, training: bool) -> Tensor:
    """(B, T) ids -> (B, T, C): √C-scaled embeddings plus sinusoidal positions, dropout."""
    x = table(ids) * math.sqrt(table.embedding_dim)
    x = x + sinusoidal_positions(ids.shape[1], x.shape[-1], x.dtype, x.device)
    return F.dropout(x, dropout, training)


class Encoder(nn.Module):
    def __init__(self, embed: nn.Embedding, heads: int, ffn_dim: int, layers: int, pre: bool,
                 dropout: float, pad: int):
        super().__init__()
        dim = embed.embedding_dim
        self.embed_tokens = embed
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim, pre, dropout)
                                    for _ in range(layers))
        self.layer_norm = nn.LayerNorm(dim) if pre else None
        self.dropout, self.pad = dropout, pad

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) int64 -> (memory (B, S, C), pad mask (B, 1, 1, S) bool)."""
        x = _embed(self.embed_tokens, src, self.dropout, self.training)
        pad_mask = (src == self.pad)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, pad_mask)
        return (self.layer_norm(x) if self.layer_norm is not None else x), pad_mask


class Decoder(nn.Module):
    def __init__(self, embed: nn.Embedding, heads: int, ffn_dim: int, layers: int, pre: bool,
                 dropout: float, share_output: bool):
        super().__init__()
        dim, vocab = embed.embedding_dim, embed.num_embeddings
        self.embed_tokens = embed
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn_dim, pre, dropout)
                                    for _ in range(layers))
        self.layer_norm = nn.LayerNorm(dim) if pre else None
        self.output_projection = nn.Linear(dim, vocab, bias=False)
        if share_output:
            self.output_projection.weight = embed.weight  # one nn.Parameter, two names
        self.dropout = dropout

    def forward(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """tgt_in (B, T) int64 -> logits (B, T, V)."""
        T = tgt_in.shape[1]
        y = _embed(self.embed_tokens, tgt_in, self.dropout, self.training)
        # Padded targets need no mask: they sit at the end (causality hides them) and the loss
        # ignores them.
        causal = torch.ones(T, T, dtype=torch.bool, device=y.device).triu(1)
        for layer in self.layers:
            y = layer(y, causal, memory, src_mask)
        return self.logits(y)

    def logits(self, y: Tensor) -> Tensor:
        """Top-layer states (B, T, C) -> logits (B, T, V)."""
        if self.layer_norm is not None:
            y = self.layer_norm(y)
        return self.output_projection(y)

    def step(self, token: Tensor, t: int, caches: list[dict], cross: list, src_mask: Tensor) -> Tensor:
        """Incremental decoding: token (B,) at position t -> logits (B, V) for position t + 1."""
        table = self.embed_tokens
        y = table(token[:, None]) * math.sqrt(table.embedding_dim)  # (B, 1, C)
        y = y + sinusoidal_positions(t + 1, y.shape[-1], y.dtype, y.device)[t]
        for layer, cache, kv in zip(self.layers, caches, cross):
            y = layer.step(y, cache, kv, src_mask)
        return self.logits(y)[:, 0]


class TransformerNMT(nn.Module):
    """(src (B, S), tgt_in (B, T)) int64 -> logits (B, T, V); one vocabulary of size V."""

    def __init__(self, vocab_size: int, d_model: int = 512, heads: int = 4, ffn_dim: int = 1024,
                 encoder_layers: int = 6, decoder_layers: int = 6, normalize_before: bool = False,
                 dropout: float = 0.1, share_decoder_embeddings: bool = False,
                 share_all_embeddings: bool = False, pad: int = 0):
        super().__init__()
        src_embed = nn.Embedding(vocab_size, d_model, padding_idx=pad)
        tgt_embed = src_embed if share_all_embeddings else nn.Embedding(vocab_size, d_model,
                                                                        padding_idx=pad)
        self.encoder = Encoder(src_embed, heads, ffn_dim, encoder_layers, normalize_before,
                               dropout, pad)
        self.decoder = Decoder(tgt_embed, heads, ffn_dim, decoder_layers, normalize_before,
                               dropout, share_decoder_embeddings or share_all_embeddings)
        self.pad = pad

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, src_mask = self.encoder(src)
        return self.decoder(tgt_in, memory, src_mask)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """fairseq's initialisation: Xavier-uniform linears with zero biases, N(0, 1/C)
        embeddings and output projection (pad row zero), unit layer norms."""
        with torch.no_grad():
            done: set[int] = set()
            for module in self.modules():
                if isinstance(module, nn.Embedding) and id(module.weight) not in done:
                    nn.init.normal_(module.weight, std=module.embedding_dim**-0.5,
                                    generator=generator)
                    module.weight[self.pad].zero_()
                    done.add(id(module.weight))
                elif isinstance(module, nn.LayerNorm):
                    module.reset_parameters()
            out = self.decoder.output_projection
            for module in self.modules():
                if isinstance(module, nn.Linear) and id(module.weight) not in done:
                    if module is out:
                        nn.init.normal_(module.weight, std=module.in_features**-0.5,
                                        generator=generator)
                    else:
                        nn.init.xavier_uniform_(module.weight, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
                    done.add(id(module.weight))

    @torch.no_grad()
    def greedy(self, src: Tensor, bos: int, eos: int, max_len: Tensor) -> list[list[int]]:
        """Greedy decoding of src (B, S): per sentence the ids after BOS up to (not incl.) EOS,
        at most ``max_len[b]`` (B,) tokens. Incremental: each layer caches its keys/values."""
        memory, src_mask = self.encoder(src)
        B = src.shape[0]
        cross = [layer.encoder_attn.keys_values(memory) for layer in self.decoder.layers]
        caches: list[dict] = [{} for _ in self.decoder.layers]
        token = torch.full((B,), bos, dtype=torch.long, device=src.device)
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)
        out = []
        for t in range(int(max_len.max())):
            logits = self.decoder.step(token, t, caches, cross, src_mask)  # (B, V)
            logits[:, self.pad] = float("-inf")
            logits[:, bos] = float("-inf")
            token = logits.argmax(-1)
            out.append(torch.where(finished, torch.full_like(token, self.pad), token))
            finished |= (token == eos) | (t + 1 >= max_len)
            if bool(finished.all()):
                break
        result = []
        for row in torch.stack(out, dim=1).tolist():
            ids = []
            for i in row:
                if i in (eos, self.pad):
                    break
                ids.append(i)
            result.append(ids)
        return result
