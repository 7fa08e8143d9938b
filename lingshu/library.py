"""Library size as a condition: quantile bins of a cell's total counts, and their frequencies.

The total count of a cell (over the modelled genes) is mostly technical (capture and
sequencing depth) and moves every gene at once, a shared factor that a masked denoiser
revealing genes a few at a time tends to under-disperse. Lingshu gives it to the denoiser
as one more condition token: during training the bin of each cell's own total; when
generating, a bin drawn from the training cells of the same conditions (falling back to
fewer matching keys for a combination never seen, e.g. a held-out cell type x perturbation:
the cells of that cell type); when predicting from real cells, the source cell's own bin.
Id 0 is the null id (condition dropout), bins are ids ``1..n_bins``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import LingshuError

__all__ = ["LibrarySize"]


def unique_rows(cond: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows of ``(N, K)`` ids and each row's index among them (K may be 0)."""
    if cond.shape[1] == 0:
        return np.zeros((1, 0), dtype=np.int64), np.zeros(len(cond), dtype=np.int64)
    uniq, inverse = np.unique(cond, axis=0, return_inverse=True)
    return uniq, inverse.ravel()


def draw_from_table(combos: np.ndarray, counts: np.ndarray, cond: np.ndarray, rng: np.random.Generator, *,
                    fallback: bool) -> np.ndarray:
    """A 1-based category id per row of ``cond``, drawn in proportion to ``counts`` of the matching ``combos``.

    ``combos`` ``(M, K)`` are training condition combinations, ``counts`` ``(M, C)`` their cells
    per category; a null id (0) in ``cond`` matches any label. A row no combination matches
    gets, with ``fallback``, the counts of the combinations matching its first ``K - 1`` keys,
    then ``K - 2``, ..., then all (uniform if there are none); without, the null id 0.
    """
    out = np.zeros(len(cond), dtype=np.int64)
    if len(cond) == 0:
        return out
    uniq, inverse = unique_rows(cond)
    for u, row in enumerate(uniq):
        w = _weights(combos, counts, row, fallback)
        if w is not None:
            rows = np.flatnonzero(inverse == u)
            out[rows] = 1 + rng.choice(counts.shape[1], size=len(rows), p=w / w.sum())
    return out


def _weights(combos: np.ndarray, counts: np.ndarray, row: np.ndarray, fallback: bool) -> np.ndarray | None:
    """Summed ``counts`` of the combinations matching ``row`` (see :func:`draw_from_table`); ``None``: no match."""
    hits = (combos == row) | (row == 0)  # (M, K): the combination agrees with the row on key j
    for k in range(len(row), -1, -1) if fallback else [len(row)]:
        w = counts[hits[:, :k].all(axis=1)].sum(0).astype(np.float64)
        if w.sum() > 0:
            return w
    return np.ones(counts.shape[1]) if fallback else None


def _bin_index(edges: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """0-based bin of each ``log1p`` total."""
    return np.searchsorted(edges, totals, side="right")


def _totals(counts) -> np.ndarray:
    """``log1p`` of each row's total count, ``(N,)`` float64."""
    return np.log1p(np.asarray(counts.sum(axis=1), dtype=np.float64).ravel())


@dataclass
class LibrarySize:
    """Bins of ``log1p(total counts)`` and, per training condition combination, the bin counts.

    Attributes
    ----------
    edges
        Inner bin edges (ascending, on ``log1p`` totals); ``len(edges) + 1`` bins.
    combos
        ``(M, K)`` condition ids of the training combinations (K may be 0).
    counts
        ``(M, n_bins)`` number of training cells of each combination in each bin.
    """

    edges: np.ndarray
    combos: np.ndarray
    counts: np.ndarray

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 1

    @classmethod
    def fit(cls, counts, cond: np.ndarray, n_bins: int) -> "LibrarySize":
        """Quantile bins of the cells in ``counts`` and the bin counts per row of ``cond`` (same cells)."""
        tot = _totals(counts)
        if len(tot) != len(cond):
            raise LingshuError(f"library sizes of {len(tot)} cells but conditions of {len(cond)}")
        edges = np.unique(np.quantile(tot, np.linspace(0, 1, n_bins + 1)[1:-1])) if len(tot) else np.zeros(0)
        combos, inverse = unique_rows(cond)
        table = np.zeros((len(combos), len(edges) + 1), dtype=np.int64)
        np.add.at(table, (inverse, _bin_index(edges, tot)), 1)
        return cls(edges, combos.astype(np.int64), table)

    def ids(self, counts) -> np.ndarray:
        """Bin ids ``(N,)`` (1-based) of the cells in a count matrix (rows = cells)."""
        tot = _totals(counts if sp.issparse(counts) else np.asarray(counts))
        return (1 + _bin_index(self.edges, tot)).astype(np.int64)

    def draw(self, cond: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A bin id per row of ``cond``, drawn from the training cells of the same conditions.

        A combination never seen in training falls back to the cells matching its first
        ``K - 1`` keys (the context keys when the perturbation is last), then ``K - 2``, ...,
        then all cells; a null id (0) in ``cond`` matches any label.
        """
        return draw_from_table(self.combos, self.counts, cond, rng, fallback=True)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (stored in the checkpoint manifest)."""
        return {"edges": self.edges.tolist(), "combos": self.combos.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "LibrarySize":
        edges = np.asarray(state["edges"], dtype=np.float64)
        counts = np.asarray(state["counts"], dtype=np.int64).reshape(-1, len(edges) + 1)
        combos = np.asarray(state["combos"], dtype=np.int64).reshape(len(counts), -1)
        return cls(edges, combos, counts)
