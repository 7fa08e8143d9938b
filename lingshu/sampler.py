"""The reverse process: from MASK to counts-tokens, with guidance and prior injection.

Every position that is MASK in the initial tokens is generated; every other position
is held fixed and never re-masked (prior injection, or the kept genes of a
counterfactual start from a real cell). At each of ``N`` steps the cosine (or
linear) schedule fixes how many masked genes each cell reveals; they are chosen
uniformly at random (published) or by confidence; values are drawn from the
predicted categorical in float64 (inverse CDF, one uniform per gene). Steps that reveal nothing skip the denoiser.

Classifier-free guidance (Lingshu-Cell, section 4)::

    log p = log p(x | ref) + (w + 1) * (log p(x | cond) - log p(x | ref))

with ``ref`` the control condition (same context) or the null condition. ``w = 0``
skips the reference pass and is exactly conditional sampling.

Gated guidance (not in the paper, ``guidance_gate = tau > 0``): a position keeps the guided
distribution only where ``|E_cond[log1p x] - E_ref[log1p x]| > tau`` (token midpoints) and is
drawn from ``p(x | cond)`` otherwise, so genes the condition leaves alone are not pushed around
by the noise between the two conditionals (guidance raises rare genes' high-count tails there).

Composed guidance (not in the paper), for a context and perturbation never seen together::

    log p = log p(x | ctx, control) + (w + 1) * (log p(x | -, pert) - log p(x | -, control))

``-``: every context key null. The perturbation's effect is the one learned across all
contexts (condition dropout teaches the context-free conditionals), applied to this
context's own control distribution; the combination's own conditional is not used.
``w = 0`` is the product of experts ``p(x | ctx, control) p(x | pert) / p(x | control)``.

Neighbour composition (``neighbours = k``): the effect is instead the mean over the ``k`` seen
contexts ``c_j`` most like the target one (by the model's control expression profiles,
:func:`expected_values`) of ``log p(x | c_j, pert) - log p(x | c_j, control)``. The context-free
pair mixes every context's cells, so a context whose perturbed cells are missing (a held-out
cell type) pulls its own marker genes down through it; the neighbours' pairs do not.

Quantile coupling (:func:`transport_tokens`, not in the paper), for counterfactuals from real
cells: instead of drawing a re-generated gene afresh, its observed value is carried to the same
quantile of the target distribution. With ``F`` the source conditional (the source cell's own
condition) and ``G`` the target one (guided as above), each re-generated gene of value ``v``
gets ``G^-1(u)``, ``u ~ Uniform(F(v - 1), F(v))``: if ``F`` is the distribution the cell came
from, ``u`` is uniform and the new value follows ``G`` exactly, while a cell high in a gene
(or deep in library size) stays high, so the co-variation of the real cells is kept.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from .config import SampleConfig
from .progress import progress_bar
from .schedule import n_masked_after
from .tokenizer import MASK_ID, token_midpoints

COUPLINGS = ("independent", "quantile")  # how a counterfactual's re-generated genes relate to the observed ones

__all__ = ["COUPLINGS", "sample_tokens", "transport_tokens", "guided_log_probs", "composed_log_probs", "categorical_draw",
           "expected_values"]


def guided_log_probs(logits_cond: torch.Tensor, logits_ref: torch.Tensor | None, w: float,
                     gate: float = 0.0) -> torch.Tensor:
    """Guided log-probabilities in float64 (unnormalised when ``w != 0``).

    ``gate > 0`` guides only the positions whose conditional and reference means of
    ``log1p(count)`` (token midpoints) differ by more than ``gate``; the others are drawn from
    the plain conditional. Guidance then sharpens the genes the condition moves without also
    amplifying the small, noisy differences of the many genes it leaves alone.
    """
    lc = torch.log_softmax(logits_cond.double(), dim=-1)
    if logits_ref is None or w == 0:
        return lc
    lr = torch.log_softmax(logits_ref.double(), dim=-1)
    guided = lr + (w + 1.0) * (lc - lr)
    if gate > 0:
        v = _log1p_midpoints(lc.shape[-1], lc.device)
        shift = lc.exp() @ v - lr.exp() @ v  # (M,) predicted change of the mean log1p count
        guided = torch.where((shift.abs() > gate)[:, None], guided, lc)
    return guided


@functools.lru_cache(maxsize=8)
def _log1p_midpoints(n_values: int, device: torch.device) -> torch.Tensor:
    """``log1p`` of the count each of the first ``n_values`` value tokens stands for (float64).

    Cached per device: it is asked for once per chunk of drawn positions, and a fresh host-to-device
    copy there would sit on the sampler's hot path.
    """
    return torch.from_numpy(np.log1p(token_midpoints()[:n_values])).to(device)


def composed_log_probs(logits_ctrl: torch.Tensor, logits_pert, logits_base, w: float,
                       weights: Sequence[float] | None = None) -> torch.Tensor:
    """Composed guidance in float64 (unnormalised): ``ctrl + (w + 1) * mean_j(pert_j - base_j)`` of log-softmaxes.

    ``logits_ctrl``: same context, control; ``logits_pert`` / ``logits_base``: the perturbation /
    the control with context keys null (one tensor each), or one tensor per neighbour context
    (sequences of equal length; the effects are averaged, or weighted by ``weights``, one per
    pair, summing to 1).
    """
    def lsm(z):
        return torch.log_softmax(z.double(), dim=-1)

    if isinstance(logits_pert, torch.Tensor):
        logits_pert, logits_base = [logits_pert], [logits_base]
    if weights is None:
        effect = sum(lsm(p) - lsm(b) for p, b in zip(logits_pert, logits_base, strict=True)) / len(logits_pert)
    else:
        effect = sum(float(a) * (lsm(p) - lsm(b)) for a, p, b in zip(weights, logits_pert, logits_base, strict=True))
    return lsm(logits_ctrl) + (w + 1.0) * effect


def categorical_draw(logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One categorical draw per row of (unnormalised) log-probabilities, by inverse CDF in float64.

    One uniform number per row instead of one Gumbel variate per category (281x fewer
    random numbers than Gumbel-max, the same distribution); float64 keeps the tail mass.
    """
    return _inverse_cdf(torch.softmax(logp.double(), dim=-1), generator)


def _inverse_cdf(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of float64 probabilities ``(M, V)``."""
    cdf = p.cumsum(-1)  # (M, V)
    u = torch.rand((p.shape[0], 1), dtype=torch.float64, generator=generator, device=p.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=p.shape[-1] - 1)  # = #(cdf < u)


def _draw_at(log_probs, rows, cols, generator, chunk: int = 4096):
    """Draws at positions ``(rows, cols)``, in chunks to bound memory; returns (values, log-prob).

    ``log_probs(r, c)`` gives the (unnormalised) float64 log-probabilities of positions
    ``(r, c)``. One float64 softmax per position: the draw is a binary search in its CDF and
    the log-probability of the drawn value is read from it (no repeated normalisation).
    Chunks of 4,096 positions keep the float64 arrays in cache (5x faster than 65,536 on a CPU).
    """
    n = rows.numel()
    values = torch.empty(n, dtype=torch.long, device=rows.device)  # filled in place: no small
    logps = torch.empty(n, dtype=torch.float64, device=rows.device)  # allocations between chunks
    for s in range(0, n, chunk):
        r, c = rows[s:s + chunk], cols[s:s + chunk]
        p = torch.softmax(log_probs(r, c), dim=-1)  # (M, V) float64
        v = _inverse_cdf(p, generator)
        values[s:s + chunk] = v
        logps[s:s + chunk] = p.gather(1, v[:, None]).squeeze(1).log()
    return values, logps


def _log_prob_fn(denoiser, x, cond, ref, w, pooled, pooled_weights=None, gate: float = 0.0):
    """The per-position log-probability function of one step (one batched denoiser pass)."""
    b = x.shape[0]

    def head(h, r, c):
        return denoiser.head_logits(denoiser.features_at(h, r, c), c).float()

    if pooled is not None:  # composed: same context at control, then (perturbation, control) pairs
        h_ctrl, *hs = denoiser.packed(torch.cat([x] * (len(pooled) + 1)), torch.cat([ref, *pooled])).split(b)
        return lambda r, c: composed_log_probs(head(h_ctrl, r, c), [head(h, r, c) for h in hs[0::2]],
                                               [head(h, r, c) for h in hs[1::2]], w, pooled_weights)
    if ref is not None and w != 0:
        h_cond, h_ref = denoiser.packed(torch.cat([x, x]), torch.cat([cond, ref])).split(b)
        return lambda r, c: guided_log_probs(head(h_cond, r, c), head(h_ref, r, c), w, gate)
    h_cond = denoiser.packed(x, cond)  # (B, T*S, D): features are taken at the drawn positions only
    return lambda r, c: head(h_cond, r, c).double()


def _denoise_step(denoiser, x, cond, ref, w, order, n_reveal, generator, pooled=None,
                  pooled_weights=None, gate: float = 0.0) -> torch.Tensor:
    """Reveal ``n_reveal[i]`` masked genes of each cell ``i``; returns the new tokens."""
    b, g = x.shape
    masked = x == MASK_ID
    log_probs = _log_prob_fn(denoiser, x, cond, ref, w, pooled, pooled_weights, gate)
    k = int(n_reveal.max())
    arange_b = torch.arange(b, device=x.device)[:, None]
    keep = torch.arange(k, device=x.device)[None, :] < n_reveal[:, None]  # (B, k)
    if order == "random":
        score = torch.rand((b, g), generator=generator, device=x.device).masked_fill(~masked, -1.0)
        pos = score.topk(k, dim=1).indices  # (B, k)
        rows, cols = arange_b.expand(b, k)[keep], pos[keep]
        values, _ = _draw_at(log_probs, rows, cols, generator)
    else:  # confidence: draw every masked gene, reveal the most probable draws
        rows_m, cols_m = masked.nonzero(as_tuple=True)
        draw, logp = _draw_at(log_probs, rows_m, cols_m, generator)
        conf = torch.full((b, g), -math.inf, dtype=torch.float64, device=x.device)
        conf[rows_m, cols_m] = logp
        drawn = torch.full_like(x, MASK_ID)
        drawn[rows_m, cols_m] = draw
        pos = conf.topk(k, dim=1).indices
        rows, cols = arange_b.expand(b, k)[keep], pos[keep]
        values = drawn[rows, cols]
    x = x.clone()
    x[rows, cols] = values
    return x


def _batches(denoiser, cfg: SampleConfig, device, ref, pooled, *tensors):
    """Shared start of the samplers: checks, eval mode, the seeded generator, then row batches on ``device``.

    Yields ``(generator, batch)``; ``batch`` holds each of ``tensors``, ``ref`` and ``pooled`` (a tuple,
    or ``None``) cut to the same ``cfg.batch_size`` rows, in order.
    """
    if pooled is not None and ref is None:
        raise ValueError("composed guidance (pooled) needs ref: the same context at the control")
    device = torch.device(device)
    denoiser.eval()
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    for start in range(0, tensors[0].shape[0], cfg.batch_size):
        sl = slice(start, start + cfg.batch_size)
        yield generator, (*(t[sl].to(device) for t in tensors), None if ref is None else ref[sl].to(device),
                          None if pooled is None else tuple(t[sl].to(device) for t in pooled))


@torch.no_grad()
def sample_tokens(denoiser, cond: torch.Tensor, init: torch.Tensor, cfg: SampleConfig, *,
                  ref: torch.Tensor | None = None, pooled: tuple[torch.Tensor, ...] | None = None,
                  pooled_weights: Sequence[float] | None = None, device: torch.device | str = "cpu",
                  progress: bool = False, autocast: bool = False) -> torch.Tensor:
    """Generate value tokens for every MASK position of ``init``.

    Parameters
    ----------
    denoiser
        A trained :class:`lingshu.denoiser.Denoiser`.
    cond
        ``(N, K)`` condition ids (0 = null).
    init
        ``(N, G)`` starting tokens: MASK where genes are generated, a value token where
        they are fixed (prior injection / counterfactual start).
    cfg
        Steps, schedule, order, guidance scale, batch size and seed. Batches are drawn
        in order from one generator seeded with ``cfg.seed``: the same seed, batch size
        and device give the same cells.
    ref
        ``(N, K)`` reference condition ids for guidance, or ``None``.
    pooled
        Composed guidance: ``(N, K)`` ids of the perturbation and of the control with every
        context key null, or such pairs for several neighbour contexts, flattened
        ``(pert_1, control_1, ..., pert_k, control_k)`` (their effects are averaged); ``ref`` is
        then the same context at control and ``cond`` is unused (see the module docstring).
        ``None``: guidance relative to ``ref``.
    pooled_weights
        One weight per pair of ``pooled`` (summing to 1) for the effects' weighted mean instead
        of their plain mean (``None``).
    device
        Where to run.
    progress
        Show a rich progress bar.
    autocast
        Run the denoiser under bf16 autocast (CUDA).

    Returns
    -------
    torch.Tensor
        ``(N, G)`` int64 value tokens on the CPU, no MASK left.
    """
    out = []
    device_type = torch.device(device).type
    with progress_bar(progress, "sampling", total=math.ceil(cond.shape[0] / cfg.batch_size) * cfg.steps) as bar:
        for generator, (x, c, r, pl) in _batches(denoiser, cfg, device, ref, pooled, init, cond):
            n0 = (x == MASK_ID).sum(1)
            for step in range(1, cfg.steps + 1):
                n_reveal = (x == MASK_ID).sum(1) - n_masked_after(n0, step, cfg.steps, cfg.schedule)
                if int(n_reveal.max()) > 0:
                    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                        x = _denoise_step(denoiser, x, c, r, cfg.guidance_scale, cfg.order, n_reveal, generator, pl,
                                          pooled_weights, cfg.guidance_gate)
                bar.advance()
            out.append(x.cpu())
    return torch.cat(out) if out else init.clone()


def _transport_at(log_probs, src_log_probs, observed, rows, cols, generator, chunk: int = 4096):
    """Quantile-coupled values at ``(rows, cols)``: ``G^-1(u)``, ``u ~ U(F(v - 1), F(v))``, in chunks."""
    values = torch.empty(rows.numel(), dtype=torch.long, device=rows.device)
    for s in range(0, rows.numel(), chunk):
        r, c, v = rows[s:s + chunk], cols[s:s + chunk], observed[s:s + chunk, None]
        cdf_src = torch.softmax(src_log_probs(r, c), dim=-1).cumsum(-1)  # (M, V) float64
        hi = cdf_src.gather(1, v)
        lo = torch.where(v > 0, cdf_src.gather(1, (v - 1).clamp(min=0)), torch.zeros_like(hi))
        u = lo + torch.rand(hi.shape, dtype=torch.float64, generator=generator, device=hi.device) * (hi - lo)
        cdf = torch.softmax(log_probs(r, c), dim=-1).cumsum(-1)
        values[s:s + chunk] = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=cdf.shape[-1] - 1)
    return values


@torch.no_grad()
def transport_tokens(denoiser, cond: torch.Tensor, source: torch.Tensor, init: torch.Tensor, observed: torch.Tensor,
                     cfg: SampleConfig, *, ref: torch.Tensor | None = None,
                     pooled: tuple[torch.Tensor, ...] | None = None, pooled_weights: Sequence[float] | None = None,
                     device: torch.device | str = "cpu", progress: bool = False,
                     autocast: bool = False) -> torch.Tensor:
    """Counterfactual tokens by quantile coupling (see the module docstring), in one denoiser pass.

    Parameters
    ----------
    denoiser
        A trained :class:`lingshu.denoiser.Denoiser`.
    cond, ref, pooled, pooled_weights
        The target condition, as in :func:`sample_tokens` (guidance scale and reference from ``cfg``).
    source
        ``(N, K)`` condition ids the observed cells come from (their own labels; for a
        perturbation prediction the same context at the control).
    init
        ``(N, G)`` tokens the target is conditioned on, as in :func:`sample_tokens`: MASK at the
        genes to carry, the observed value at kept genes, the prior-injected value at fixed ones.
    observed
        ``(N, G)`` value tokens of the observed cells (no MASK); with the carried genes masked
        they condition the source distribution.
    cfg
        Guidance scale and reference, batch size and seed (``steps`` is not used: one pass).

    Returns
    -------
    torch.Tensor
        ``(N, G)`` int64 value tokens on the CPU: ``init`` with every MASK carried.
    """
    out = []
    device_type = torch.device(device).type
    with progress_bar(progress, "transport", total=math.ceil(cond.shape[0] / cfg.batch_size)) as bar:
        for generator, (x, obs, c, s, r, pl) in _batches(denoiser, cfg, device, ref, pooled, init, observed, cond,
                                                         source):
            carried = x == MASK_ID
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                target = _log_prob_fn(denoiser, x, c, r, cfg.guidance_scale, pl, pooled_weights, cfg.guidance_gate)
                src = _log_prob_fn(denoiser, obs.masked_fill(carried, MASK_ID), s, None, 0.0, None)
                rows, cols = carried.nonzero(as_tuple=True)
                values = _transport_at(target, src, obs[rows, cols], rows, cols, generator)
            x = x.clone()
            x[rows, cols] = values
            out.append(x.cpu())
            bar.advance()
    return torch.cat(out) if out else init.clone()


@torch.no_grad()
def expected_values(denoiser, cond: torch.Tensor, values: torch.Tensor, *, device: torch.device | str = "cpu",
                    batch_size: int = 16) -> torch.Tensor:
    """Each gene's expected ``values[token]`` under the denoiser with every gene masked.

    Parameters
    ----------
    denoiser
        A trained :class:`lingshu.denoiser.Denoiser`.
    cond
        ``(N, K)`` condition ids.
    values
        ``(V,)`` a number per value token (``V`` = 281, no MASK; e.g. ``log1p`` of the count it
        stands for).
    device, batch_size
        Where to run and how many conditions at once.

    Returns
    -------
    torch.Tensor
        ``(N, G)`` float64 on the CPU: the model's mean expression profile of each condition.
    """
    denoiser.eval()
    n_genes = denoiser.n_genes
    vals = values.to(device=device, dtype=torch.float64)
    out = torch.empty(cond.shape[0], n_genes, dtype=torch.float64)
    cols = torch.arange(n_genes, device=device)
    for start in range(0, cond.shape[0], batch_size):
        c = cond[start:start + batch_size].to(device)
        x = torch.full((c.shape[0], n_genes), MASK_ID, dtype=torch.long, device=device)
        log_probs = _log_prob_fn(denoiser, x, c, None, 0.0, None)
        for i in range(c.shape[0]):  # one condition at a time: (G, V) probabilities
            out[start + i] = (torch.softmax(log_probs(torch.full_like(cols, i), cols), dim=-1) @ vals).cpu()
    return out
