"""Cell state as a condition: k-means clusters of the training cells' expression, and their frequencies.

A denoiser that reveals a cell's genes a few hundred at a time, given only its labels, learns
each label's average profile long before it learns how genes vary *together* within a label:
at CPU training lengths the generated cells of a type sit too close to the type's mean
(measured: about half the real within-type variance on the top principal components, and
almost no within-type gene-gene correlation). Lingshu can give the denoiser the cell's coarse
state as one more condition token, the way it gives library size (:mod:`lingshu.library`):

- fitting: log CP10k of (up to ``max_cells``) training cells on their ``n_genes`` most
  variable genes, a PCA with ``n_pcs`` components and k-means with ``n_states`` centres,
  all in NumPy and seeded;
- training: each cell's own state (nearest centre), computed from the counts it is read with;
- generation: a state drawn from the training cells of exactly the same condition labels
  (a mixture over the states those cells occupy); a combination never seen in training, a
  guided or a counterfactual draw gets the null id (0), which condition dropout trains.

Id 0 is the null id, states are ids ``1..n_states``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import LingshuError
from .library import draw_from_table, unique_rows
from .normalize import log_cp10k

__all__ = ["CellState"]

_CHUNK = 4096


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 100) -> np.ndarray:
    """Centres of Lloyd's k-means on the rows of ``x`` from a k-means++ start (an empty cluster restarts at a random row)."""
    n = len(x)
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for j in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centres[j] = x[rng.choice(n, p=p)]
        d2 = np.minimum(d2, ((x - centres[j]) ** 2).sum(1))
    labels = None
    for _ in range(iters):
        new = _nearest(x, centres)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            centres[j] = members.mean(0) if len(members) else x[rng.integers(n)]
    return centres


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T`` without BLAS: these products are small, and a multithreaded BLAS called once per
    training batch keeps its threads spinning beside torch's (measured: 30% slower training on 2 cores)."""
    return np.einsum("ij,kj->ik", a, b)


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2 * _dot(x, centres) + (centres * centres).sum(1)[None, :]
    return np.argmin(d, axis=1)


@dataclass
class CellState:
    """A projection of log-normalised counts, k-means centres, and the state counts per condition.

    Attributes
    ----------
    genes
        Column indices (into the modelled genes) of the genes the states are computed on.
    mean, components
        PCA centre ``(n_genes,)`` and loadings ``(n_pcs, n_genes)``.
    centres
        ``(n_states, n_pcs)`` k-means centres.
    combos, counts
        ``(M, K)`` condition ids of the training combinations and ``(M, n_states)`` the
        number of training cells of each in each state.
    """

    genes: np.ndarray
    mean: np.ndarray
    components: np.ndarray
    centres: np.ndarray
    combos: np.ndarray
    counts: np.ndarray

    @property
    def n_states(self) -> int:
        return len(self.centres)

    @classmethod
    def fit(cls, counts, cond: np.ndarray, n_states: int, seed: int, **kwargs: int) -> "CellState":
        """Fit the states on the cells of ``counts`` (rows = cells) with condition ids ``cond`` (same rows)."""
        return cls.fit_ids(counts, cond, n_states, seed, **kwargs)[0]

    @classmethod
    def fit_ids(cls, counts, cond: np.ndarray, n_states: int, seed: int, *, n_genes: int = 512, n_pcs: int = 16,
                max_cells: int = 20000) -> tuple["CellState", np.ndarray]:
        """:meth:`fit`, and the state id of each of those cells (what :meth:`ids` gives for ``counts``)."""
        counts = sp.csr_matrix(counts)
        if counts.shape[0] != len(cond):
            raise LingshuError(f"cell states: counts of {counts.shape[0]} cells but conditions of {len(cond)}")
        if counts.shape[0] < 2:
            raise LingshuError("cell states need at least 2 training cells")
        rng = np.random.default_rng([seed, 11])
        rows = (np.sort(rng.choice(counts.shape[0], max_cells, replace=False)) if counts.shape[0] > max_cells
                else np.arange(counts.shape[0]))
        x = log_cp10k(counts[rows], dtype=np.float64)
        mean = np.asarray(x.mean(axis=0)).ravel()
        var = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean ** 2
        genes = np.sort(np.argsort(-var, kind="stable")[:min(n_genes, x.shape[1])])
        dense = x[:, genes].toarray()
        centre = dense.mean(0)
        _, _, vt = np.linalg.svd(dense - centre, full_matrices=False)
        components = vt[:min(n_pcs, len(vt))]
        pcs = _dot(dense - centre, components)
        k = max(1, min(int(n_states), len(np.unique(pcs.round(8), axis=0))))
        centres = _kmeans(pcs, k, rng)
        self = cls(genes.astype(np.int64), centre, components, centres, np.zeros((0, cond.shape[1]), np.int64),
                   np.zeros((0, k), np.int64))
        ids = self.ids(counts)
        combos, inverse = unique_rows(cond)
        table = np.zeros((len(combos), k), dtype=np.int64)
        np.add.at(table, (inverse, ids - 1), 1)
        self.combos, self.counts = combos.astype(np.int64), table
        return self, ids

    def ids(self, counts) -> np.ndarray:
        """State ids ``(N,)`` (1-based) of the cells in a count matrix (rows = cells, all modelled genes)."""
        counts = counts if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts))
        out = np.empty(counts.shape[0], dtype=np.int64)
        for s in range(0, counts.shape[0], _CHUNK):
            x = log_cp10k(counts[s:s + _CHUNK], dtype=np.float64)[:, self.genes].toarray()
            out[s:s + _CHUNK] = 1 + _nearest(_dot(x - self.mean, self.components), self.centres)
        return out

    def draw(self, cond: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A state id per row of ``cond``, drawn from the training cells with the same labels.

        A null label (0) in ``cond`` matches any label; a combination no training cell has
        gets the null state (0): states are not carried over from other conditions.
        """
        return draw_from_table(self.combos, self.counts, cond, rng, fallback=False)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (stored in the checkpoint manifest)."""
        return {"genes": self.genes.tolist(), "mean": self.mean.tolist(), "components": self.components.tolist(),
                "centres": self.centres.tolist(), "combos": self.combos.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CellState":
        genes = np.asarray(state["genes"], dtype=np.int64)
        components = np.asarray(state["components"], dtype=np.float64).reshape(-1, len(genes))
        centres = np.asarray(state["centres"], dtype=np.float64).reshape(-1, len(components))
        counts = np.asarray(state["counts"], dtype=np.int64).reshape(-1, len(centres))
        combos = np.asarray(state["combos"], dtype=np.int64).reshape(len(counts), -1)
        return cls(genes, np.asarray(state["mean"], dtype=np.float64), components, centres, combos, counts)
