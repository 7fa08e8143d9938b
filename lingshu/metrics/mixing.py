"""How well real and simulated cells mix: a two-sample classifier and iLISI."""

from __future__ import annotations

import numpy as np

from ..errors import LingshuError
from ._data import one_blas_thread
from .distribution import MAX_CELLS, _pair

__all__ = ["classifier_auc", "ilisi"]


@one_blas_thread
def classifier_auc(x, y, *, n_folds: int = 5, max_cells: int | None = MAX_CELLS, seed: int = 0) -> float:
    r"""Cross-validated AUC of a classifier telling ``x`` cells from ``y`` cells.

    The classifier is a logistic regression (L2, ``C=1``) on the standardised features
    *and their squares*, i.e. a diagonal quadratic discriminant: it detects a shift in the
    mean or in the spread along any feature (PC), which a linear model on the PCs misses.
    Stratified ``n_folds``-fold cross-validation (shuffled with ``seed``); the standardiser is
    fitted inside each fold. Returned is the mean over folds of the held-out ROC AUC.
    0.5 means indistinguishable; 1 means perfectly separable. Values a little under 0.5
    are noise; values well under 0.5 (e.g. 0.2) arise when ``y`` holds exact copies of
    ``x`` cells (a held-out cell's twin, with the other label, sits in the training folds):
    a sign of memorised training cells when ``x`` is the training data.

    Parameters
    ----------
    x, y
        Cells x features (e.g. PCA coordinates of real and simulated cells).
    n_folds
        Number of folds; lowered to the size of the smaller side when that is smaller.
    max_cells
        Each side is subsampled without replacement to at most this many cells (``None``: all).
    seed
        Seed of the subsampling and of the fold assignment.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _pair(x, y, max_cells, seed)
    folds = min(int(n_folds), len(x), len(y))
    if folds < 2:
        raise LingshuError(f"classifier_auc needs at least 2 cells per side, got {len(x)} and {len(y)}")
    feats = np.vstack([x, y])  # (N, F)
    feats = np.hstack([feats, feats * feats])  # (N, 2F)
    target = np.r_[np.zeros(len(x)), np.ones(len(y))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, feats, target, cv=cv, scoring="roc_auc")))


@one_blas_thread
def ilisi(x, y, *, k: int = 30, max_cells: int | None = MAX_CELLS, seed: int = 0) -> float:
    r"""Scaled integration LISI of ``x`` and ``y`` on their joint kNN graph; 1 is perfect mixing.

    Both sides are first subsampled to the same size, ``min(len(x), len(y), max_cells)``, so
    that perfect mixing means half of every neighbourhood from each side. For each cell the
    ``k`` nearest other cells (Euclidean, ``k = min(30, N - 1)``) give the fraction
    :math:`p_b` from each side and the inverse Simpson index
    :math:`\mathrm{LISI} = 1 / \sum_b p_b^2` (uniform neighbour weights, between 1 and 2).
    Returned is :math:`(\overline{\mathrm{LISI}} - 1) / (B - 1)` with :math:`B = 2` sides,
    the scaling of scib's ``ilisi_graph(scale=True)`` and of the Lingshu-Cell table ("iLISI
    of 1"): 0 = the two never neighbour each other, 1 = perfectly mixed. The mean over cells
    is taken rather than scib's median, because with uniform weights a median can only take
    a few discrete values (k = 30: 1, 0.991, 0.965, 0.923, ...). Two samples of one
    distribution score about 0.94 (binomial noise of 30 neighbours), not 1.

    Parameters
    ----------
    x, y
        Cells x features (e.g. PCA coordinates).
    k
        Neighbours per cell (at most, see above).
    max_cells
        Upper bound of the per-side size (``None``: the smaller side).
    seed
        Seed of the subsampling.
    """
    from sklearn.neighbors import NearestNeighbors

    size = min(len(x), len(y)) if max_cells is None else min(len(x), len(y), int(max_cells))
    x, y = _pair(x, y, size, seed)
    feats = np.vstack([x, y])  # (N, F)
    side = np.r_[np.zeros(len(x), dtype=np.int64), np.ones(len(y), dtype=np.int64)]
    k = min(int(k), len(feats) - 1)
    if k < 1:
        raise LingshuError(f"ilisi needs at least 1 cell per side, got {len(x)} and {len(y)}")
    idx = NearestNeighbors(n_neighbors=k).fit(feats).kneighbors(return_distance=False)  # (N, k), self excluded
    p_other = side[idx].mean(axis=1)  # (N,) fraction of neighbours from y
    lisi = 1.0 / (p_other**2 + (1.0 - p_other) ** 2)
    return float(np.mean(lisi) - 1.0)
