"""The denoiser: gene-group compressed, bidirectional LLaMA-style transformer.

Shapes: ``B`` cells, ``G`` genes, ``S`` genes per group, ``T = ceil(G / S)``
transformer tokens, ``K`` condition tokens, ``D`` per-gene width, ``C`` model width.

tokens (B, G) -> value + gene embeddings (B, G, D) -> fixed permutation ->
pad to T*S -> (B, T, S*D) -> linear -> (B, T, C) -> prepend K condition tokens ->
blocks (RMSNorm, RoPE attention, SwiGLU, no biases) -> drop condition tokens ->
linear -> (B, T, S*D) -> (B, G, D) un-permuted -> shared per-gene head -> (B, G, V).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .tokenizer import N_VALUE_TOKENS, VOCAB_SIZE

__all__ = ["Denoiser", "gene_permutation"]


def gene_permutation(n_genes: int, seed: int) -> torch.Tensor:
    """The fixed random order in which genes are grouped (stored in the checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_genes, generator=g)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for ``(B, H, L, hd)`` queries and keys."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))  # (L, hd/2)
        return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of ``x`` (B, H, L, hd) by position-dependent angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, L, hd/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Block(nn.Module):
    """Pre-norm bidirectional transformer block: RoPE attention + SwiGLU, no biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ffn_norm = nn.RMSNorm(cfg.d_model)
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, L, c = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, L, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, L, hd)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=False)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, L, c)), p, self.training)
        h = self.ffn_norm(x)
        return x + F.dropout(self.w_down(F.silu(self.w_gate(h)) * self.w_up(h)), p, self.training)


class Denoiser(nn.Module):
    """Predicts every masked gene's value token from the visible genes and the conditions.

    Parameters
    ----------
    cfg
        Model shape.
    n_genes
        Number of genes ``G`` modelled at once.
    cond_vocab_sizes
        For each condition key, the number of labels (id 0 is reserved for null).
    """

    def __init__(self, cfg: ModelConfig, n_genes: int, cond_vocab_sizes: list[int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_genes = n_genes
        self.n_groups = math.ceil(n_genes / cfg.group_size)
        self.n_pad = self.n_groups * cfg.group_size - n_genes
        perm = gene_permutation(n_genes, cfg.gene_seed)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))
        d, s, c = cfg.gene_dim, cfg.group_size, cfg.d_model
        self.value_emb = nn.Embedding(VOCAB_SIZE, d)
        self.gene_emb = nn.Parameter(torch.zeros(n_genes, d))
        self.group_in = nn.Linear(s * d, c, bias=False)
        self.cond_emb = nn.ModuleList([nn.Embedding(n + 1, c) for n in cond_vocab_sizes])
        self.rope = RotaryEmbedding(c // cfg.n_heads, cfg.rope_base)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.out_norm = nn.RMSNorm(c)
        self.group_out = nn.Linear(c, s * d, bias=False)
        self.gene_out = nn.Parameter(torch.zeros(n_genes, d))
        self.head_norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, N_VALUE_TOKENS)  # shared across genes; never predicts MASK
        self.gene_bias = nn.Parameter(torch.zeros(n_genes, N_VALUE_TOKENS)) if cfg.gene_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-style init: N(0, 0.02); residual projections scaled by depth."""
        for name, p in self.named_parameters():
            if p.dim() < 2 or name.endswith(("gene_emb", "gene_out", "gene_bias")):  # gene_bias stays 0
                continue
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("proj.weight", "w_down.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)
        nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def init_head_bias(self, frequencies) -> None:
        """Start the head at the data's marginal: bias = log of each token's frequency.

        Without this, the ~180 binned tokens that almost never occur share a few percent
        of probability mass early in training, and each decodes to hundreds or
        thousands of counts, which inflates simulated library sizes by orders of magnitude.
        """
        f = torch.as_tensor(frequencies, dtype=torch.float32)
        self.head.bias.copy_(torch.log(f + 1e-8))

    @property
    def n_cond(self) -> int:
        return len(self.cond_emb)

    def packed(self, xt: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per-gene features in the model's permuted, padded gene order (no per-gene offset yet).

        Training and sampling need features only at some (cell, gene) positions; they take
        them from this with :meth:`features_at`, so no ``(B, G, D)`` tensor is un-permuted
        (and, in training, scattered back in the backward pass) for every gene.

        Parameters
        ----------
        xt
            ``(B, G)`` tokens, MASK where unknown.
        cond
            ``(B, K)`` condition ids, 0 for null.

        Returns
        -------
        torch.Tensor
            ``(B, T * S, D)``: position ``inv_perm[g]`` holds gene ``g``.
        """
        b = xt.shape[0]
        d, s = self.cfg.gene_dim, self.cfg.group_size
        e = self.value_emb(xt[:, self.perm]) + self.gene_emb[self.perm]  # (B, G, D) permuted
        if self.n_pad:
            e = F.pad(e, (0, 0, 0, self.n_pad))  # (B, T*S, D)
        x = self.group_in(e.reshape(b, self.n_groups, s * d))  # (B, T, C)
        if self.n_cond:
            c_tok = torch.stack([emb(cond[:, k]) for k, emb in enumerate(self.cond_emb)], dim=1)  # (B, K, C)
            if self.cfg.cond_broadcast:
                x = x + c_tok.sum(1, keepdim=True).to(x.dtype)  # (B, T, C): every group sees the conditions
            x = torch.cat([c_tok.to(x.dtype), x], dim=1)  # (B, K+T, C)
        cos, sin = self.rope(x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.out_norm(x[:, self.n_cond:])  # (B, T, C)
        return self.group_out(x).reshape(b, self.n_groups * s, d)  # (B, T*S, D) permuted order

    def features_at(self, packed: torch.Tensor, cells: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """Features ``(M, D)`` of genes ``genes`` of cells ``cells`` (index vectors of length M).

        Each (cell, gene) pair at most once. The per-gene offset goes through ``F.embedding``,
        whose CPU backward sums repeated genes in a fixed order (bit-for-bit resumes).
        """
        return packed[cells, self.inv_perm[genes]] + F.embedding(genes, self.gene_out)

    def hidden(self, xt: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per-gene features before the head, every gene in gene order: ``(B, G, D)``.

        See :meth:`packed` for the arguments; training and sampling use :meth:`features_at`.
        """
        return self.packed(xt, cond)[:, self.inv_perm] + self.gene_out  # (B, G, D) gene order

    def head_logits(self, h: torch.Tensor, genes: torch.Tensor | None = None) -> torch.Tensor:
        """Value-token logits ``(..., 281)`` of per-gene features ``(..., D)``.

        ``genes``: the gene index of every feature row (shape ``h.shape[:-1]``), needed for
        the per-gene bias; ``None`` when ``h`` holds all genes in order on its second-to-last axis.
        """
        out = self.head(self.head_norm(h))
        if self.gene_bias is None:
            return out
        # F.embedding, not gene_bias[genes]: its CPU backward sums repeated genes in a fixed order
        # (indexing's does not with several threads, which broke bit-for-bit resumes)
        return out + (self.gene_bias if genes is None else F.embedding(genes, self.gene_bias)).to(out.dtype)

    def forward(self, xt: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, G, 281)`` for every gene (memory heavy; training uses masked positions only)."""
        return self.head_logits(self.hidden(xt, cond))
