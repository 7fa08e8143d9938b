"""Distribution metrics comparing simulated with real cells.

Everything is computed on ``log1p(counts / total * 1e4)`` over the genes both share; the
embedding metrics use a joint PCA of both sides (see :func:`joint_pca`). Start with
:func:`distribution_report`, which runs every metric and a half-split ceiling of the real data.
"""

from __future__ import annotations

from ._data import align_genes, joint_pca, half_split, log_cp10k
from .celltype import CellTypeProportions, MarkerRecovery, celltype_proportions, marker_recovery, top_markers
from .distribution import (energy_distance, gene_moment_correlations, library_size_agreement, mean_wasserstein,
                           mmd, zero_fraction_agreement)
from .mixing import classifier_auc, ilisi
from .report import METRICS, compare, distribution_report

__all__ = [
    "distribution_report",
    "compare",
    "METRICS",
    "mmd",
    "energy_distance",
    "mean_wasserstein",
    "gene_moment_correlations",
    "zero_fraction_agreement",
    "library_size_agreement",
    "classifier_auc",
    "ilisi",
    "celltype_proportions",
    "marker_recovery",
    "top_markers",
    "CellTypeProportions",
    "MarkerRecovery",
    "log_cp10k",
    "align_genes",
    "joint_pca",
    "half_split",
]
