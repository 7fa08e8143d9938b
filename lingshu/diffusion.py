"""The masked-diffusion objective (MDLM / LLaDA) as small pure functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .schedule import loss_weight
from .tokenizer import MASK_ID

__all__ = ["sample_t", "mask_tokens", "drop_conditions", "subsample_mask", "subsample_mask_nonzero", "diffusion_loss",
           "Noise", "draw_noise"]


def sample_t(batch: int, generator: torch.Generator, device: torch.device, eps: float = 1e-3) -> torch.Tensor:
    """Low-discrepancy times in ``[eps, 1]``: one uniform offset, evenly spaced strata.

    ``t_i = eps + (1 - eps) * ((u + i / B) mod 1)`` covers ``[0, 1)`` evenly within
    a batch, which lowers the variance of the ``1/t``-weighted loss.
    """
    u = torch.rand((), generator=generator, device=device)
    t = (u + torch.arange(batch, device=device) / batch) % 1.0
    return eps + (1.0 - eps) * t


@dataclass
class Noise:
    """Every random draw of one training micro-batch, drawn for the whole global batch.

    Data-parallel ranks draw the same global noise from the same generator and each
    keeps its own rows (:meth:`rows`), so N processes see exactly the masks, times and
    condition dropout that one process would for the same global batch.
    """

    t: torch.Tensor  # (B,) times
    mask_u: torch.Tensor  # (B, G) uniforms: gene masked where u < t
    drop_u: torch.Tensor | None = None  # (B, K) uniforms for condition dropout
    keep_u: torch.Tensor | None = None  # (B, G) uniforms ranking masked genes for the loss subsample

    def rows(self, sl: slice) -> "Noise":
        """The draws of a subset of the batch's cells."""
        return Noise(self.t[sl], self.mask_u[sl], None if self.drop_u is None else self.drop_u[sl],
                     None if self.keep_u is None else self.keep_u[sl])


def draw_noise(batch: int, genes: int, keys: int, generator: torch.Generator, device: torch.device, *,
               cond_dropout: float = 0.0, loss_genes: int | None = None) -> Noise:
    """Draw a micro-batch's times, mask uniforms, dropout and loss-subsample uniforms."""
    t = sample_t(batch, generator, device)
    mask_u = torch.rand((batch, genes), generator=generator, device=device)
    drop_u = (torch.rand((batch, keys), generator=generator, device=device)
              if cond_dropout > 0 and keys > 0 else None)
    keep_u = (torch.rand((batch, genes), generator=generator, device=device)
              if loss_genes is not None and loss_genes < genes else None)
    return Noise(t, mask_u, drop_u, keep_u)


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each gene of cell ``i`` independently with probability ``t[i]`` (``u``: given uniforms).

    Returns
    -------
    xt
        ``(B, G)`` tokens with masked genes set to MASK.
    mask
        ``(B, G)`` bool, True where masked.
    """
    if u is None:
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
    mask = u < t[:, None]
    return torch.where(mask, torch.full_like(x0, MASK_ID), x0), mask


def drop_conditions(cond: torch.Tensor, p: float, generator: torch.Generator | None = None,
                    u: torch.Tensor | None = None) -> torch.Tensor:
    """Replace each condition id by the null id 0 with probability ``p`` (per cell and key)."""
    if p <= 0 or cond.numel() == 0:
        return cond
    if u is None:
        u = torch.rand(cond.shape, generator=generator, device=cond.device)
    drop = u < p
    return cond.masked_fill(drop, 0)


def subsample_mask(mask: torch.Tensor, budget: int, generator: torch.Generator | None = None,
                   u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``budget`` masked genes per cell, uniformly at random.

    Returns the kept positions ``(B, G)`` and per-cell weights ``n_masked / n_kept`` that make
    the subsampled loss an unbiased estimate of the loss over every masked gene.
    """
    n_masked = mask.sum(1)  # (B,)
    if int(n_masked.max()) <= budget:
        return mask, torch.ones(mask.shape[0], device=mask.device)
    if u is None:
        u = torch.rand(mask.shape, generator=generator, device=mask.device)
    score = u.masked_fill(~mask, -1.0)
    thresh = score.topk(budget, dim=1).values[:, -1:]  # (B, 1): budget-th largest score
    kept = mask & (score >= thresh)
    return kept, n_masked / kept.sum(1).clamp(min=1)


def subsample_mask_nonzero(mask: torch.Tensor, x0: torch.Tensor, budget: int, share: float,
                           u: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep about ``budget`` masked genes per cell, favouring genes whose true count is not 0.

    Each masked gene is kept independently (Poisson sampling): genes with a nonzero count at
    rate ``r1 = min(1, share * budget / n1)``, zero-count genes at ``r0 = (budget - r1 * n1) / n0``
    (``n1`` / ``n0``: the cell's masked nonzero / zero genes). A kept gene's loss is weighted
    ``1 / rate`` (Horvitz-Thompson), so the loss stays an unbiased estimate of the loss over
    every masked gene, while the few informative genes of a sparse whole-transcriptome cell
    are scored every time instead of ``budget / n_masked`` of the time. The rates depend on
    the data only, never on the model.

    Returns the kept positions ``(B, G)`` and per-position weights ``(B, G)`` (0 where not kept).
    """
    n_masked = mask.sum(1)
    if int(n_masked.max()) <= budget:
        return mask, mask.float()
    if u is None:
        u = torch.rand(mask.shape, generator=generator, device=mask.device)
    nonzero = mask & (x0 != 0)  # token 0 is a count of 0
    n1 = nonzero.sum(1).float()
    n0 = n_masked.float() - n1
    r1 = (share * budget / n1.clamp(min=1)).clamp(max=1.0)
    r0 = ((budget - r1 * n1) / n0.clamp(min=1)).clamp(min=0.0, max=1.0)
    rate = torch.where(nonzero, r1[:, None], r0[:, None])  # (B, G)
    kept = mask & (u < rate)
    return kept, torch.where(kept, 1.0 / rate.clamp(min=1e-12), torch.zeros_like(rate))


_HEAD_CHUNK = 1 << 13  # head rows per chunk: (8192, 281) float32 logits = 9 MB


def _masked_ce(denoiser, feats: torch.Tensor, targets: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head on feature rows ``(M, D)`` (gene ``genes[i]``, true token ``targets[i]``).

    In chunks of rows: chunks bound validation memory on whole transcriptomes, and keep each
    ``(rows, 281)`` logits buffer under glibc's 32 MB mmap ceiling, so it is reused from the heap
    rather than mapped and page-faulted anew on every step (measured on 2 CPU cores: a fresh
    36 MB buffer costs ~33 ms to touch, a 9 MB one from the heap ~1 ms).
    """
    out = []
    for s in range(0, len(genes), _HEAD_CHUNK):
        sl = slice(s, s + _HEAD_CHUNK)
        out.append(F.cross_entropy(denoiser.head_logits(feats[sl], genes[sl]).float(), targets[sl], reduction="none"))
    return torch.cat(out) if len(out) != 1 else out[0]


def diffusion_loss(denoiser, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
                   t: torch.Tensor | None = None, loss_genes: int | None = None, noise: Noise | None = None,
                   denom: float | None = None,
                   nonzero_share: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``1/t``-weighted cross-entropy on masked genes, averaged per gene and cell.

    The output head runs only on masked positions, so memory is
    ``O(masked genes x vocabulary)`` rather than ``O(all genes x vocabulary)``.

    Parameters
    ----------
    denoiser
        A :class:`lingshu.denoiser.Denoiser`.
    x0
        ``(B, G)`` clean tokens.
    cond
        ``(B, K)`` condition ids (0 = null).
    generator
        Source of the times and masks (unless ``noise`` is given).
    t
        Optional fixed times ``(B,)`` (validation uses a fixed grid).
    noise
        Pre-drawn times, mask and subsample uniforms (see :func:`draw_noise`); condition
        dropout is applied by the caller.
    denom
        Number of cells the loss is normalised by (default ``B``); a data-parallel rank
        holding ``B / world`` cells of a global batch passes ``B_global / world``.
    loss_genes
        If set, at most this many masked genes per cell enter the head and the loss,
        reweighted so the estimate stays unbiased (see :func:`subsample_mask`). The
        denoiser still sees every gene; this only bounds the ``genes x 281`` head cost.
    nonzero_share
        With ``loss_genes``: reserve up to this share of the budget for masked genes with a
        nonzero count (:func:`subsample_mask_nonzero`); ``None``: uniform (:func:`subsample_mask`).

    Returns
    -------
    loss
        Scalar: ``sum_masked w(t_i) * CE / (B * G)``, the negative ELBO per gene.
    stats
        Detached scalar tensors: ``masked_ce`` (unweighted mean CE on masked genes) and
        ``mask_rate`` (fraction of genes masked).
    """
    b, g = x0.shape
    if noise is not None:
        t = noise.t
    elif t is None:
        t = sample_t(b, generator, x0.device)
    xt, mask = mask_tokens(x0, t, generator, u=None if noise is None else noise.mask_u)
    packed = denoiser.packed(xt, cond)  # (B, T*S, D), permuted gene order
    keep_u = None if noise is None else noise.keep_u
    scale = None  # reweighting of a subsample, broadcastable to (B, G)
    if loss_genes is None:
        scored = mask
    elif nonzero_share is None:
        scored, ratio = subsample_mask(mask, loss_genes, generator, u=keep_u)
        scale = ratio[:, None]
    else:
        scored, scale = subsample_mask_nonzero(mask, x0, loss_genes, nonzero_share, u=keep_u, generator=generator)
    rows = scored.nonzero(as_tuple=True)
    # one gather of the scored rows (its backward is one scatter), not one per head chunk
    ce = _masked_ce(denoiser, denoiser.features_at(packed, *rows), x0[rows], rows[1])  # (M,)
    w = loss_weight(t)[rows[0]]
    if scale is not None:
        w = w * scale.expand_as(mask)[rows]
    loss = (ce * w).sum() / ((b if denom is None else denom) * g)
    stats = {"masked_ce": ce.detach().sum() / scored.sum().clamp(min=1), "mask_rate": mask.detach().float().mean()}
    return loss, stats
