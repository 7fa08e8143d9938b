"""Cell-type fidelity: are simulated cells recognisable as the type they were conditioned on?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import LingshuError
from ..validation import require_obs_keys
from ._data import align_genes, joint_pca, log_cp10k, one_blas_thread

__all__ = ["CellTypeProportions", "MarkerRecovery", "celltype_proportions", "marker_recovery"]


@dataclass
class CellTypeProportions:
    """Result of :func:`celltype_proportions`.

    Attributes
    ----------
    table
        One row per cell type (real types first, then types only seen in ``sim``), columns
        ``real_fraction``, ``sim_conditioned_fraction`` (share of sim cells generated for the
        type), ``sim_assigned_fraction`` (share the classifier assigns to it) and
        ``assigned_accuracy`` (of the sim cells conditioned on the type, the share assigned to it).
    accuracy
        Share of all sim cells assigned to their conditioned type (chance level is about
        ``sum_t p_t^2`` for type proportions ``p_t``).
    tvd
        Total variation distance ``0.5 * sum_t |real_fraction - sim_assigned_fraction|``.
    """

    table: pd.DataFrame
    accuracy: float
    tvd: float


@dataclass
class MarkerRecovery:
    """Result of :func:`marker_recovery`.

    Attributes
    ----------
    table
        One row per cell type compared: ``n_real``, ``n_sim``, ``overlap`` (share of the real
        top-n markers also in the sim top-n), ``real_markers`` and ``sim_markers`` (lists).
    mean_overlap
        Mean of ``overlap`` over the compared types (NaN if none could be compared).
    """

    table: pd.DataFrame
    mean_overlap: float


def _labels(adata, label_key: str, what: str) -> np.ndarray:
    try:
        require_obs_keys(adata, [label_key])
    except LingshuError as err:
        raise LingshuError(f"{what}: {err}") from None
    return adata.obs[label_key].astype(str).to_numpy()


@one_blas_thread
def assign_from_pcs(real_pcs, real_labels, sim_pcs, sim_labels, *, seed: int = 0) -> CellTypeProportions:
    """:func:`celltype_proportions` on precomputed PCA coordinates (joint PCA of real and sim)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    real_labels, sim_labels = np.asarray(real_labels, dtype=str), np.asarray(sim_labels, dtype=str)
    types = list(dict.fromkeys(real_labels.tolist()))
    types += [t for t in dict.fromkeys(sim_labels.tolist()) if t not in set(types)]
    if len(set(real_labels.tolist())) < 2:
        assigned = np.full(len(sim_labels), real_labels[0])
    else:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
        assigned = clf.fit(real_pcs, real_labels).predict(sim_pcs).astype(str)
    hit = assigned == sim_labels

    def share(labels: np.ndarray) -> np.ndarray:
        return np.array([np.mean(labels == t) for t in types])

    per_type_acc = [hit[sim_labels == t].mean() if np.any(sim_labels == t) else np.nan for t in types]
    table = pd.DataFrame({"real_fraction": share(real_labels), "sim_conditioned_fraction": share(sim_labels),
                          "sim_assigned_fraction": share(assigned), "assigned_accuracy": per_type_acc},
                         index=pd.Index(types, name="cell_type"))
    tvd = 0.5 * float(np.abs(table["real_fraction"] - table["sim_assigned_fraction"]).sum())
    return CellTypeProportions(table=table, accuracy=float(hit.mean()), tvd=tvd)


@one_blas_thread
def celltype_proportions(real, sim, label_key: str, *, n_pcs: int = 50, seed: int = 0) -> CellTypeProportions:
    """Assign simulated cells to real cell types and compare proportions.

    A logistic regression (L2, ``C=1``, on standardised PCs) is trained on the real cells'
    ``obs[label_key]`` in the joint PCA of real and sim cells (log1p-CP10k over the shared
    genes, ``n_pcs`` components); each sim cell is assigned its most probable type.

    Parameters
    ----------
    real, sim
        AnnData with counts in ``X``; ``sim.obs[label_key]`` holds the label each sim cell
        was conditioned on.
    label_key
        obs column with the cell type.
    n_pcs
        PCA components (fewer if the data are small).
    seed
        Seed of the PCA solver and the classifier.

    Returns
    -------
    :class:`CellTypeProportions` (per-type fractions, assignment accuracy, total variation distance).
    """
    real_labels, sim_labels = _labels(real, label_key, "real"), _labels(sim, label_key, "sim")
    xr, xs, _ = align_genes(real, sim)
    lr, ls = log_cp10k(xr), log_cp10k(xs)
    pr, ps = joint_pca(lr, ls, n_pcs, seed)
    return assign_from_pcs(pr, real_labels, ps, sim_labels, seed=seed)


def _group_stats(x: sp.csr_matrix, labels: np.ndarray, types: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-type cell count, sum and sum of squares of every gene. Shapes (T,), (T, G), (T, G)."""
    onehot = sp.csr_matrix((labels[None, :] == np.asarray(types)[:, None]).astype(np.float64))  # (T, N)
    x = sp.csr_matrix(x, dtype=np.float64)
    n = np.asarray(onehot.sum(axis=1)).ravel()
    total = np.asarray((onehot @ x).todense())
    total_sq = np.asarray((onehot @ x.multiply(x)).todense())
    return n, total, total_sq


def top_markers(x_log, labels, genes, types: list[str], n: int = 20) -> dict[str, list[str]]:
    """Top ``n`` up-regulated genes of each type vs all other cells, by Welch t statistic.

    Computed on log1p-CP10k (``x_log``); a type needs at least 2 cells in and 2 out of it.
    Genes with zero variance in both groups get t = 0. Ties are broken by gene order.
    """
    labels = np.asarray(labels, dtype=str)
    types = [t for t in types if 2 <= np.sum(labels == t) <= len(labels) - 2]
    if not types:
        return {}
    n_in, s_in, q_in = _group_stats(x_log, labels, types)
    xall = sp.csr_matrix(x_log, dtype=np.float64)
    s_all = np.asarray(xall.sum(axis=0)).ravel()
    q_all = np.asarray(xall.multiply(xall).sum(axis=0)).ravel()
    n_out, s_out, q_out = len(labels) - n_in, s_all - s_in, q_all - q_in
    m_in, m_out = s_in / n_in[:, None], s_out / n_out[:, None]
    v_in = np.maximum(q_in - n_in[:, None] * m_in**2, 0) / (n_in[:, None] - 1)
    v_out = np.maximum(q_out - n_out[:, None] * m_out**2, 0) / (n_out[:, None] - 1)
    se = np.sqrt(v_in / n_in[:, None] + v_out / n_out[:, None])  # (T, G)
    t = np.divide(m_in - m_out, se, out=np.zeros_like(se), where=se > 0)
    genes = np.asarray(genes)
    order = np.argsort(-t, axis=1, kind="stable")[:, :n]  # (T, n)
    return {typ: genes[order[i]].tolist() for i, typ in enumerate(types)}


def markers_from_log(real_log, real_labels, sim_log, sim_labels, genes, n: int = 20) -> MarkerRecovery:
    """:func:`marker_recovery` on precomputed log1p-CP10k matrices over the same ``genes``."""
    real_labels, sim_labels = np.asarray(real_labels, dtype=str), np.asarray(sim_labels, dtype=str)
    types = [t for t in dict.fromkeys(real_labels.tolist()) if t in set(sim_labels.tolist())]
    real_top = top_markers(real_log, real_labels, genes, types, n)
    sim_top = top_markers(sim_log, sim_labels, genes, types, n)
    rows = {t: {"n_real": int(np.sum(real_labels == t)), "n_sim": int(np.sum(sim_labels == t)),
                "overlap": len(set(real_top[t]) & set(sim_top[t])) / len(real_top[t]),
                "real_markers": real_top[t], "sim_markers": sim_top[t]}
            for t in types if t in real_top and t in sim_top}
    table = pd.DataFrame.from_dict(rows, orient="index",
                                   columns=["n_real", "n_sim", "overlap", "real_markers", "sim_markers"])
    table.index.name = "cell_type"
    mean = float(table["overlap"].mean()) if len(table) else float("nan")
    return MarkerRecovery(table=table, mean_overlap=mean)


@one_blas_thread
def marker_recovery(real, sim, label_key: str, n: int = 20) -> MarkerRecovery:
    """Overlap of the top-``n`` marker genes of each cell type in real vs simulated cells.

    Markers of a type are the ``n`` genes with the largest Welch t statistic of that type vs
    all other cells (up-regulated only), on log1p-CP10k over the shared genes; sim cells are
    grouped by the label they were conditioned on. For each type present in both (with at
    least 2 cells in and out of it on each side) the overlap is
    ``|real top-n & sim top-n| / n``; the report is their mean (1 is perfect).

    Parameters
    ----------
    real, sim
        AnnData with counts in ``X`` and ``obs[label_key]``.
    label_key
        obs column with the cell type.
    n
        Markers per type.

    Returns
    -------
    :class:`MarkerRecovery` (per-type table and mean overlap).
    """
    if int(n) < 1:
        raise LingshuError(f"n (markers per type) must be >= 1, got {n}")
    real_labels, sim_labels = _labels(real, label_key, "real"), _labels(sim, label_key, "sim")
    xr, xs, genes = align_genes(real, sim)
    return markers_from_log(log_cp10k(xr), real_labels, log_cp10k(xs), sim_labels, genes, int(n))
