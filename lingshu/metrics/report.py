"""One table comparing simulated with real cells, beside the half-split ceiling of the real data."""

from __future__ import annotations

import pandas as pd

from ._data import align_genes, half_split, joint_pca, log_cp10k, one_blas_thread
from .celltype import _labels, assign_from_pcs, markers_from_log
from .distribution import (MAX_CELLS, energy_distance, gene_moment_correlations, library_size_agreement,
                           mean_wasserstein, mmd, zero_fraction_agreement)
from .mixing import classifier_auc, ilisi

__all__ = ["distribution_report", "compare", "METRICS"]

# metric name -> which direction is better
METRICS: dict[str, str] = {
    "mmd": "lower",
    "energy_distance": "lower",
    "mean_wasserstein": "lower",
    "pearson_mean": "higher",
    "spearman_mean": "higher",
    "pearson_var": "higher",
    "spearman_var": "higher",
    "zero_fraction_pearson": "higher",
    "zero_fraction_mae": "lower",
    "library_size_ks": "lower",
    "library_size_median_ratio": "closer to 1",
    "classifier_auc": "lower",
    "ilisi": "higher",
    "celltype_accuracy": "higher",
    "celltype_tvd": "lower",
    "marker_overlap": "higher",
}


@one_blas_thread
def compare(xr, xs, genes, *, real_labels=None, sim_labels=None, n_pcs: int = 50, seed: int = 0,
            max_cells: int | None = MAX_CELLS) -> dict[str, float]:
    """Every metric of one comparison (one column of :func:`distribution_report`).

    Parameters
    ----------
    xr, xs
        Counts (cells x genes, dense or sparse) of the real and the simulated cells over the
        same ``genes`` in the same order (see :func:`~lingshu.metrics.align_genes`).
    genes
        Gene names of the columns (for the marker lists).
    real_labels, sim_labels
        Cell types per cell; the cell-type metrics are added when both are given.
    n_pcs, seed, max_cells
        As in :func:`distribution_report`; one joint PCA of ``xr`` and ``xs``.

    Returns
    -------
    ``{metric: value}`` in the order of :data:`METRICS`.
    """
    lr, ls = log_cp10k(xr), log_cp10k(xs)
    pr, ps = joint_pca(lr, ls, n_pcs, seed)  # (Nr, P), (Ns, P)
    out = {
        "mmd": mmd(pr, ps, max_cells=max_cells, seed=seed),
        "energy_distance": energy_distance(pr, ps, max_cells=max_cells, seed=seed),
        "mean_wasserstein": mean_wasserstein(lr, ls),
        **gene_moment_correlations(lr, ls),
        **zero_fraction_agreement(xr, xs),
        **library_size_agreement(xr, xs),
        "classifier_auc": classifier_auc(pr, ps, max_cells=max_cells, seed=seed),
        "ilisi": ilisi(pr, ps, max_cells=max_cells, seed=seed),
    }
    if real_labels is not None and sim_labels is not None:
        props = assign_from_pcs(pr, real_labels, ps, sim_labels, seed=seed)
        out["celltype_accuracy"] = props.accuracy
        out["celltype_tvd"] = props.tvd
        out["marker_overlap"] = markers_from_log(lr, real_labels, ls, sim_labels, genes).mean_overlap
    return out


@one_blas_thread
def distribution_report(real, sim, *, label_key: str | None = None, seed: int = 0, n_pcs: int = 50,
                        max_cells: int | None = MAX_CELLS) -> pd.DataFrame:
    """Compare simulated with real cells on every distribution metric, beside a half-split ceiling.

    Both sides are restricted to their shared genes, normalised to log1p(CP10k), and
    embedded by one PCA (``n_pcs`` components, fewer if small) fitted on the pooled cells of
    both sides (why not on the real cells alone: see :func:`~lingshu.metrics.joint_pca`).
    The ``model`` column compares ``sim`` with all of ``real`` (pass a held-out set as
    ``real`` for an honest score). The ``half_split`` column applies the very same procedure
    to a random half of ``real`` (as the reference) vs the other half (as the
    "simulation"), stratified by ``label_key`` when given: what a perfect generator would
    score, i.e. the ceiling. Sample-size-dependent metrics (the V-statistic MMD and energy
    distance, iLISI and AUC noise) are somewhat worse at half size, so for a strict floor
    compare equal-sized samples (as ``bench/pbmc3k_generation.py`` does).

    Metrics (see each function for its exact definition): ``mmd``
    (:func:`~lingshu.metrics.mmd`, 5-scale Gaussian kernel on PCs), ``energy_distance`` (on
    PCs), ``mean_wasserstein`` (per gene on log1p-CP10k), ``pearson_mean``,
    ``spearman_mean``, ``pearson_var``, ``spearman_var`` (per-gene means / variances),
    ``zero_fraction_pearson``, ``zero_fraction_mae``, ``library_size_ks``,
    ``library_size_median_ratio`` (sim / real), ``classifier_auc`` (0.5 is ideal), ``ilisi``
    (scaled, 1 is ideal) and, with ``label_key``, ``celltype_accuracy`` (sim cells assigned
    to their conditioned type by a classifier trained on real), ``celltype_tvd`` and
    ``marker_overlap`` (top-20 Welch-t markers per type).

    Parameters
    ----------
    real, sim
        AnnData with counts in ``X`` (sim from e.g. ``LingshuModel.simulate``).
    label_key
        obs column with the cell type, present in both; adds the cell-type metrics.
    seed
        Seed of the half split, subsampling, PCA solver and classifiers.
    n_pcs
        PCA components.
    max_cells
        Per-side cap for the pairwise metrics (MMD, energy, AUC, iLISI).

    Returns
    -------
    DataFrame with columns ``metric``, ``model``, ``half_split`` and ``better`` (``"lower"``,
    ``"higher"`` or ``"closer to 1"``); ``attrs`` holds ``n_real``, ``n_sim``, ``n_genes``.
    """
    real_labels = _labels(real, label_key, "real") if label_key else None
    sim_labels = _labels(sim, label_key, "sim") if label_key else None
    xr, xs, genes = align_genes(real, sim)
    opts = {"n_pcs": n_pcs, "seed": seed, "max_cells": max_cells}
    model = compare(xr, xs, genes, real_labels=real_labels, sim_labels=sim_labels, **opts)
    first, second = half_split(xr.shape[0], real_labels, seed)
    half = compare(xr[first], xr[second], genes,
                   real_labels=None if real_labels is None else real_labels[first],
                   sim_labels=None if real_labels is None else real_labels[second], **opts)
    report = pd.DataFrame({"metric": list(model), "model": [model[m] for m in model],
                           "half_split": [half[m] for m in model], "better": [METRICS[m] for m in model]})
    report.attrs.update({"n_real": int(xr.shape[0]), "n_sim": int(xs.shape[0]), "n_genes": len(genes)})
    return report

