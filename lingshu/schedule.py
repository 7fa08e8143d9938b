"""Noise schedules.

Training uses the linear masking schedule of MDLM/LLaDA: a gene is still clean at
time ``t`` with probability ``alpha(t) = 1 - t``; the ELBO weight of a masked
position is ``-alpha'(t) / (1 - alpha(t)) = 1 / t``.

Sampling reveals genes on a cosine (or linear) schedule over ``N`` steps:
after step ``k`` a fraction ``s(k / N)`` of the initially masked genes is still masked.
"""

from __future__ import annotations

import math

import torch

__all__ = ["alpha", "dalpha", "loss_weight", "masked_fraction", "n_masked_after"]


def alpha(t: torch.Tensor) -> torch.Tensor:
    """Probability that a gene is unmasked at time ``t``."""
    return 1.0 - t


def dalpha(t: torch.Tensor) -> torch.Tensor:
    """Derivative of :func:`alpha`."""
    return -torch.ones_like(t)


def loss_weight(t: torch.Tensor) -> torch.Tensor:
    """ELBO weight ``-alpha'(t) / (1 - alpha(t))`` of a masked position (``1/t``)."""
    return -dalpha(t) / (1.0 - alpha(t))


def masked_fraction(u: float, kind: str = "cosine") -> float:
    """Fraction of genes still masked at sampling progress ``u`` in [0, 1]."""
    if kind == "cosine":
        return math.cos(0.5 * math.pi * u)
    if kind == "linear":
        return 1.0 - u
    raise ValueError(f"unknown schedule {kind!r}")


def n_masked_after(n_initial: torch.Tensor, step: int, n_steps: int, kind: str = "cosine") -> torch.Tensor:
    """Number of genes (per cell) that stay masked after ``step`` of ``n_steps`` (1-based)."""
    if step >= n_steps:
        return torch.zeros_like(n_initial)
    frac = masked_fraction(step / n_steps, kind)
    return torch.floor(n_initial.double() * frac).long()
