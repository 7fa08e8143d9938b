"""Perturbation metrics of the Virtual Cell Challenge family, defined exactly as in cell-eval 0.8.2.

Every metric compares, for one *condition* (a perturbation, within one context if there are
several), the real perturbed cells with the predicted ones, each relative to its own control
cells. The definitions below are those of the ``cell-eval`` package (``MetricsEvaluator``
with pdex differential expression, ``profile="full"``), reimplemented with numpy/scipy so
Lingshu does not depend on it; ``tests/test_cell_eval_parity.py`` checks the numbers
against cell-eval itself.

Expression scale
    Each side (the real cells with their controls; the predicted cells with theirs) is
    normalised on its own, as cell-eval does with raw counts: every cell is scaled to the
    median total count of that side's cells (``scanpy.pp.normalize_total``), then
    ``log1p``. Pseudobulks are means of these values (float32, as cell-eval's polars
    group-by yields).
Differential expression (pdex ``mode="ref"`` with cell-eval's settings)
    Each condition vs its control cells, gene by gene: a two-sided Mann-Whitney U test,
    normal approximation with tie correction and a 0.5 continuity correction (p = 1 for a
    gene constant across both groups); Benjamini-Hochberg FDR over all genes of the
    condition; ``log2_fold_change = log2(expm1(mean(a)) / expm1(mean(b)))`` of the
    log-normalised values (geometric means, no pseudocount: ``0/0 -> 0``, one-sided zeros
    give ``+-inf``). p-values, FDRs and fold changes are then rounded to float32, and a gene
    is a DE gene when its FDR < 0.05.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special, stats

from ..errors import LingshuError

__all__ = [
    "FDR_THRESHOLD",
    "PERTURBATION_METRICS",
    "VCC_METRICS",
    "log_normalize",
    "DETable",
    "mann_whitney_u",
    "differential_expression",
    "PerturbationSide",
    "summarize_side",
    "discrimination_scores",
    "de_overlap",
    "pearson_delta",
    "mean_absolute_error",
    "spearman_deg",
    "spearman_lfc",
    "auprc",
    "perturbation_scores",
    "relative_gain",
]

FDR_THRESHOLD = 0.05
# metric -> which direction is better
PERTURBATION_METRICS: dict[str, str] = {
    "pds": "higher",
    "des": "higher",
    "mae": "lower",
    "pearson_delta": "higher",
    "spearman_deg": "higher",
    "spearman_lfc": "higher",
    "auprc": "higher",
}
VCC_METRICS = ("pds", "des", "mae")  # the Virtual Cell Challenge score averages these three
_GENE_CHUNK = 1024


def log_normalize(counts) -> sp.csr_matrix:
    """``log1p`` of counts scaled to the median total count of these cells (cells x genes, float32).

    Exactly cell-eval's conversion of raw counts: ``scanpy.pp.normalize_total`` (target: the
    median total of cells with any counts; empty cells stay 0) then ``scanpy.pp.log1p``.
    """
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32, copy=True))
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    return sp.csr_matrix(a.X)


@dataclass
class DETable:
    """Differential expression of one condition vs its controls, one entry per gene (float32)."""

    lfc: np.ndarray
    pvalue: np.ndarray
    fdr: np.ndarray

    @property
    def significant(self) -> np.ndarray:
        """Boolean mask of DE genes (FDR < 0.05)."""
        return self.fdr.astype(np.float64) < FDR_THRESHOLD

    def ranked_significant(self) -> np.ndarray:
        """Indices of the DE genes, largest ``|log2 fold change|`` first; ties keep gene order."""
        sig = np.flatnonzero(self.significant)
        order = np.argsort(-np.abs(self.lfc[sig]), kind="stable")
        return sig[order]

    @classmethod
    def empty(cls, n_genes: int) -> DETable:
        nan = np.full(n_genes, np.nan, dtype=np.float32)
        return cls(lfc=nan, pvalue=nan.copy(), fdr=nan.copy())


def _tie_term(sorted_block: np.ndarray) -> np.ndarray:
    """Per column, ``sum(t^3 - t)`` over runs of equal values of a column-sorted block (n, C)."""
    n, n_cols = sorted_block.shape
    starts = np.ones((n, n_cols), dtype=bool)
    starts[1:] = sorted_block[1:] != sorted_block[:-1]
    pos = np.flatnonzero(starts.T.ravel())  # column-major run starts
    lengths = np.diff(np.append(pos, n * n_cols)).astype(np.float64)
    return np.bincount(pos // n, weights=lengths**3 - lengths, minlength=n_cols)


def mann_whitney_u(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Mann-Whitney U test of every column of ``x`` (n1, G) against ``y`` (n2, G).

    Normal approximation with tie correction and continuity correction, as
    ``scipy.stats.mannwhitneyu(method="asymptotic")`` and numba-mwu (pdex) compute it:
    ``z = (max(U1, U2) - n1 n2 / 2 - 0.5) / s`` with
    ``s^2 = n1 n2 / 12 * (n + 1 - sum(t^3 - t) / (n (n - 1)))``, ``p = 2 * Phi(-z)``
    clipped to [0, 1]; a column constant across both samples gets p = 1.

    Returns
    -------
    ``U1`` (the statistic of ``x``) and the p-values, each of shape (G,).
    """
    n1, n2 = x.shape[0], y.shape[0]
    if n1 < 1 or n2 < 1:
        raise LingshuError(f"a Mann-Whitney test needs at least 1 cell per group, got {n1} and {n2}")
    n_genes, n = x.shape[1], n1 + n2
    u1, pval = np.empty(n_genes), np.empty(n_genes)
    for start in range(0, n_genes, _GENE_CHUNK):
        stop = min(start + _GENE_CHUNK, n_genes)
        block = np.vstack([_dense(x[:, start:stop]), _dense(y[:, start:stop])])  # (n, C)
        ranks = stats.rankdata(block, axis=0)  # average ranks of ties
        ties = _tie_term(np.sort(block, axis=0))
        u = ranks[:n1].sum(axis=0) - n1 * (n1 + 1.0) / 2.0
        s_sq = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)))
        z = (np.maximum(u, n1 * n2 - u) - n1 * n2 / 2.0 - 0.5) / np.sqrt(np.where(s_sq > 0, s_sq, 1.0))
        p = np.clip(special.erfc(z / np.sqrt(2.0)), 0.0, 1.0)  # 2 * Phi(-z)
        u1[start:stop], pval[start:stop] = u, np.where(s_sq > 0, p, 1.0)
    return u1, pval


def _dense(block) -> np.ndarray:
    return block.toarray().astype(np.float64) if sp.issparse(block) else np.asarray(block, dtype=np.float64)


def _col_mean(x) -> np.ndarray:
    """Per-gene mean of log-normalised cells, computed as pdex does (scipy's float32 mean)."""
    return np.asarray(x.mean(axis=0)).ravel()


def differential_expression(x_group, x_ref) -> DETable:
    """DE of ``x_group`` vs ``x_ref`` (cells x genes, log-normalised), as pdex does for cell-eval.

    See the module docstring: Mann-Whitney U, Benjamini-Hochberg FDR over all genes,
    geometric-mean log2 fold change without pseudocount; results rounded to float32.
    """
    _, pval = mann_whitney_u(x_group, x_ref)
    fdr = stats.false_discovery_control(pval)
    bulk_g = np.expm1(_col_mean(x_group)).astype(np.float64)
    bulk_r = np.expm1(_col_mean(x_ref)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(bulk_g / bulk_r)
    lfc[np.isnan(lfc)] = 0.0  # unexpressed in both: no change
    return DETable(lfc=lfc.astype(np.float32), pvalue=pval.astype(np.float32), fdr=fdr.astype(np.float32))


@dataclass
class PerturbationSide:
    """What the metrics need from one side: pseudobulks and DE per condition.

    Attributes
    ----------
    means
        Condition -> mean log-normalised expression of its perturbed cells, float32 (G,).
    control_means
        Condition -> mean of its control cells (the same array for conditions sharing controls).
    de
        Condition -> :class:`DETable` vs its control cells.
    """

    means: dict[str, np.ndarray]
    control_means: dict[str, np.ndarray]
    de: dict[str, DETable]


def _pseudobulk(x: sp.csr_matrix, idx: np.ndarray) -> np.ndarray:
    """Float32 mean of rows ``idx``: float64 sum / n, rounded (as cell-eval's polars group-by mean)."""
    total = np.asarray(x[idx].astype(np.float64).sum(axis=0)).ravel()
    return (total / len(idx)).astype(np.float32)


def summarize_side(x_log, groups: dict[str, np.ndarray], controls: dict[str, np.ndarray]) -> PerturbationSide:
    """Pseudobulks and DE of every condition of one side.

    Parameters
    ----------
    x_log
        Cells x genes, log-normalised with :func:`log_normalize` over all cells of the side.
    groups
        Condition -> row indices of its perturbed cells.
    controls
        Condition -> row indices of its control cells (at least 1).
    """
    x_log = sp.csr_matrix(x_log)
    cache: dict[bytes, np.ndarray] = {}
    means, ctrl_means, de = {}, {}, {}
    for cond, idx in groups.items():
        ctrl = np.asarray(controls[cond])
        key = ctrl.tobytes()
        if key not in cache:
            cache[key] = _pseudobulk(x_log, ctrl)
        means[cond], ctrl_means[cond] = _pseudobulk(x_log, np.asarray(idx)), cache[key]
        de[cond] = differential_expression(x_log[np.asarray(idx)], x_log[ctrl])
    return PerturbationSide(means=means, control_means=ctrl_means, de=de)


def discrimination_scores(real_effects: np.ndarray, pred_effects: np.ndarray, genes, targets) -> np.ndarray:
    """Perturbation discrimination score (PDS) of each condition; 1 is best, ``1/K`` worst.

    For condition ``k`` the predicted effect (pred pseudobulk minus pred control pseudobulk,
    signed) is compared by L1 distance with the real effect of every one of the ``K``
    conditions; genes named like the condition's target (``targets[k]``) are left out of the
    distance. With ``rank`` the 0-based position of the true condition in ``np.argsort`` of the
    distances (so ties go the way numpy's default sort puts them, as in cell-eval), the
    score is ``1 - rank / K``. Chance level is about ``0.5 + 1 / (2K)``.

    Parameters
    ----------
    real_effects, pred_effects
        (K, G) signed effects, rows in the same condition order.
    genes
        The G gene names.
    targets
        K target names (the perturbation label of each condition).
    """
    from sklearn.metrics import pairwise_distances

    genes = np.asarray(genes).astype(str)
    n_cond = real_effects.shape[0]
    scores = np.empty(n_cond)
    for k in range(n_cond):
        keep = np.flatnonzero(genes != str(targets[k]))
        dist = pairwise_distances(real_effects[:, keep], pred_effects[k, keep].reshape(1, -1), metric="l1").ravel()
        rank = int(np.flatnonzero(np.argsort(dist) == k)[0])
        scores[k] = 1.0 - rank / n_cond
    return scores


def de_overlap(real: DETable, pred: DETable) -> float:
    """DE overlap at N (DES): share of the real DE genes found among the top predicted DE genes.

    With the ``N`` real DE genes (FDR < 0.05) and the predicted DE genes both ranked by
    ``|log2 fold change|`` (descending, ties in gene order), the score is
    ``|real top N & pred top N| / N``. 0 when the real condition has no DE gene (cell-eval's
    convention, not NaN).
    """
    real_top, pred_top = real.ranked_significant(), pred.ranked_significant()
    k = real_top.size
    if k == 0:
        return 0.0
    return np.intersect1d(real_top, pred_top[:k]).size / k


def pearson_delta(real_effect: np.ndarray, pred_effect: np.ndarray) -> float:
    """Pearson correlation over all genes of the predicted and real effects (pseudobulk minus control).

    NaN when either effect is constant.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.pearsonr(pred_effect, real_effect)[0])


def mean_absolute_error(real_mean: np.ndarray, pred_mean: np.ndarray) -> float:
    """Mean over genes of ``|pred pseudobulk - real pseudobulk|`` (log-normalised, not a delta)."""
    from sklearn.metrics import mean_absolute_error as mae

    return float(mae(pred_mean, real_mean))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation with average ranks; NaN for fewer than 2 points or a constant side."""
    if a.size < 2:
        return float("nan")
    ra, rb = stats.rankdata(a), stats.rankdata(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def spearman_deg(real: list[DETable], pred: list[DETable]) -> float:
    """Spearman correlation, across conditions, of the number of real and predicted DE genes.

    As in cell-eval, only conditions with at least one real DE gene take part; 1.0 when none
    has any (agreement by convention), NaN when fewer than 2 take part or a side is constant.
    One value for the whole set of conditions.
    """
    n_real = np.array([d.significant.sum() for d in real], dtype=np.float64)
    n_pred = np.array([d.significant.sum() for d in pred], dtype=np.float64)
    keep = n_real > 0
    if not keep.any():
        return 1.0
    return _spearman(n_real[keep], n_pred[keep])


def spearman_lfc(real: DETable, pred: DETable) -> float:
    """Spearman correlation of real and predicted log2 fold changes over the real DE genes.

    NaN when the condition has fewer than 2 real DE genes. Fold changes of ``+-inf`` rank
    at the ends.
    """
    sig = real.significant
    return _spearman(real.lfc[sig].astype(np.float64), pred.lfc[sig].astype(np.float64))


def auprc(real: DETable, pred: DETable) -> float:
    """Average precision of predicted FDRs at recovering the real DE genes.

    Labels: real FDR < 0.05 over all genes; scores: ``-log10(clip(pred FDR, 1e-10, 1))``
    (float32); ``sklearn.metrics.average_precision_score``. NaN when every gene or no gene
    is a real DE gene.
    """
    from sklearn.metrics import average_precision_score

    labels = real.significant
    if labels.all() or not labels.any():
        return float("nan")
    q = np.clip(np.nan_to_num(pred.fdr, nan=1.0), np.float32(1e-10), np.float32(1.0)).astype(np.float32)
    return float(average_precision_score(labels.astype(np.float32), -np.log10(q)))


def perturbation_scores(real: PerturbationSide, pred: PerturbationSide, genes, targets: dict[str, str]) -> pd.DataFrame:
    """Every metric of :data:`PERTURBATION_METRICS` for every condition of ``real``.

    Conditions missing from ``pred`` get NaN (and take no part in PDS or ``spearman_deg``).

    Returns
    -------
    DataFrame indexed by condition (sorted), one column per metric; ``spearman_deg`` is one
    value repeated on every row.
    """
    conds = sorted(real.means)
    both = [c for c in conds if c in pred.means]
    table = pd.DataFrame(np.nan, index=pd.Index(conds, name="condition"), columns=list(PERTURBATION_METRICS))
    if not both:
        return table
    real_eff = np.vstack([real.means[c] - real.control_means[c] for c in both])  # (K, G)
    pred_eff = np.vstack([pred.means[c] - pred.control_means[c] for c in both])  # (K, G)
    table.loc[both, "pds"] = discrimination_scores(real_eff, pred_eff, genes, [targets[c] for c in both])
    for k, c in enumerate(both):
        table.loc[c, "des"] = de_overlap(real.de[c], pred.de[c])
        table.loc[c, "mae"] = mean_absolute_error(real.means[c], pred.means[c])
        table.loc[c, "pearson_delta"] = pearson_delta(real_eff[k], pred_eff[k])
        table.loc[c, "spearman_lfc"] = spearman_lfc(real.de[c], pred.de[c])
        table.loc[c, "auprc"] = auprc(real.de[c], pred.de[c])
    table["spearman_deg"] = spearman_deg([real.de[c] for c in both], [pred.de[c] for c in both])
    return table


def relative_gain(method: dict[str, float], baseline: dict[str, float],
                  metrics=VCC_METRICS) -> tuple[dict[str, float], float]:
    """Improvement of ``method`` over ``baseline``, per metric and on average (cell-eval's score).

    For a lower-is-better metric (MAE) the gain is ``1 - method / baseline``; for the others
    ``(method - baseline) / (1 - baseline)``, i.e. the share of the remaining distance to a
    perfect 1 that was closed. NaN becomes 0 and negative gains are clipped to 0, then the
    gains are averaged over ``metrics`` (default: PDS, DES and MAE, the Virtual Cell
    Challenge score). Inputs are per-metric means over conditions.

    Returns
    -------
    ``({metric: gain}, average gain)``.
    """
    gains = {}
    for m in metrics:
        user, base = np.float64(method.get(m, np.nan)), np.float64(baseline.get(m, np.nan))
        with np.errstate(divide="ignore", invalid="ignore"):
            g = 1.0 - user / base if PERTURBATION_METRICS[m] == "lower" else (user - base) / (1.0 - base)
        gains[m] = 0.0 if not np.isfinite(g) else max(float(g), 0.0)
    return gains, float(np.mean(list(gains.values()))) if gains else float("nan")
