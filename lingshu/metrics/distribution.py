"""Distances between two cell populations, and per-gene agreement of their statistics.

Conventions (shared by the whole :mod:`lingshu.metrics` package): cells are rows; "log"
matrices hold ``log1p(counts / total * 1e4)``; "PCA" arrays are coordinates in a joint PCA of
both sides (:func:`lingshu.metrics.joint_pca`). Arguments named ``real``/``sim`` are ordered; ``x``/``y`` are symmetric.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy import stats
from scipy.spatial.distance import cdist

from ..errors import LingshuError
from ._data import one_blas_thread, subsample

__all__ = [
    "mmd",
    "energy_distance",
    "mean_wasserstein",
    "gene_moment_correlations",
    "zero_fraction_agreement",
    "library_size_agreement",
]

MAX_CELLS = 2000
_GENE_CHUNK = 512


def _pair(x, y, max_cells: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense float64 copies of ``x`` and ``y``, each subsampled to at most ``max_cells`` rows."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise LingshuError(f"x and y must be cells x features with the same features, got {x.shape} and {y.shape}")
    if len(x) < 1 or len(y) < 1:
        raise LingshuError(f"both samples need at least 1 cell, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    return x[subsample(len(x), max_cells, rng)], y[subsample(len(y), max_cells, rng)]


@one_blas_thread
def mmd(x, y, *, max_cells: int | None = MAX_CELLS, seed: int = 0) -> float:
    r"""Squared maximum mean discrepancy with the Lingshu-Cell multi-scale Gaussian kernel.

    With the pooled sample :math:`z = x \cup y` (:math:`N` cells),
    :math:`\sigma_0 = \frac{1}{N(N-1)} \sum_{i \ne j} \lVert z_i - z_j \rVert^2` (mean squared
    pairwise distance), :math:`\sigma_s = \sigma_0 \, 2^{s-3}` for :math:`s = 0..4` (bandwidths
    in squared-distance units: :math:`\sigma_0/8 .. 2\sigma_0`) and
    :math:`k(a, b) = \frac{1}{5} \sum_s \exp(-\lVert a - b \rVert^2 / \sigma_s)`.
    Returned is the biased V-statistic
    :math:`\mathrm{MMD}^2 = \overline{K_{xx}} + \overline{K_{yy}} - 2\,\overline{K_{xy}}`, means
    over all pairs including :math:`i = j`. It is >= 0, exactly 0 when ``x`` and ``y`` are the
    same set, and for two samples of one distribution its expectation is
    :math:`(1/n + 1/m)(\mathbb{E}k(a,a) - \mathbb{E}k(a,a'))` > 0: compare values only at
    equal sample sizes.

    Parameters
    ----------
    x, y
        Cells x features (e.g. PCA coordinates of real and simulated cells).
    max_cells
        Each side is subsampled without replacement to at most this many cells (``None``: all).
    seed
        Seed of the subsampling.

    Returns
    -------
    The squared MMD (a float; lower is better).
    """
    x, y = _pair(x, y, max_cells, seed)
    z = np.vstack([x, y])  # (N, F)
    n_pool = len(z)
    if n_pool < 2:
        return 0.0
    # sum_{i,j} |z_i - z_j|^2 = 2 N sum_i |z_i|^2 - 2 |sum_i z_i|^2
    zc = z - z.mean(axis=0)
    sigma0 = 2.0 * n_pool * np.sum(zc * zc) / (n_pool * n_pool - n_pool)
    if sigma0 <= 0:
        return 0.0
    sigmas = sigma0 * 2.0 ** (np.arange(5) - 3.0)

    def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
        d2 = cdist(a, b, "sqeuclidean")  # (len(a), len(b))
        return float(np.mean([np.exp(-d2 / s).mean() for s in sigmas]))

    value = kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y)
    return max(value, 0.0)


@one_blas_thread
def energy_distance(x, y, *, max_cells: int | None = MAX_CELLS, seed: int = 0) -> float:
    r"""Energy distance :math:`2\,\mathbb{E}\lVert X-Y \rVert - \mathbb{E}\lVert X-X' \rVert - \mathbb{E}\lVert Y-Y' \rVert`.

    Euclidean distances; each expectation is a mean over all pairs including :math:`i = j`
    (V-statistic), so the value is >= 0 and exactly 0 when ``x`` and ``y`` are the same set.
    Not squared, not divided by 2 (some texts halve it).

    Parameters
    ----------
    x, y
        Cells x features (e.g. PCA coordinates).
    max_cells
        Each side is subsampled without replacement to at most this many cells (``None``: all).
    seed
        Seed of the subsampling.
    """
    x, y = _pair(x, y, max_cells, seed)
    value = 2.0 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    return max(float(value), 0.0)


def _quantile_grid(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces on which both empirical quantile functions (``n`` and ``m`` points) are constant.

    Breakpoints ``i/n`` and ``j/m`` are held exactly as integers over ``n * m``; on piece ``k``
    the quantile functions take the sorted values with index ``ix[k]`` and ``iy[k]``.
    """
    grid = np.union1d(np.arange(n + 1, dtype=np.int64) * m, np.arange(m + 1, dtype=np.int64) * n)
    width = np.diff(grid) / float(n * m)  # (K,)
    return grid[:-1] // m, grid[:-1] // n, width


def _columns(x, start: int, stop: int) -> np.ndarray:
    block = x[:, start:stop]
    return block.toarray() if sp.issparse(block) else np.asarray(block)


@one_blas_thread
def mean_wasserstein(x_genes, y_genes) -> float:
    r"""Mean over genes of the 1-D Wasserstein-1 distance between the two cells' values.

    For each gene, :math:`W_1 = \int_0^1 \lvert F^{-1}(u) - G^{-1}(u) \rvert\,du` of the two
    empirical distributions, exactly what ``scipy.stats.wasserstein_distance`` returns (the
    integral is evaluated on the common breakpoints ``i/n``, ``j/m``, for all genes at once).
    Every gene counts, including genes that are zero in every cell (they add 0).

    Parameters
    ----------
    x_genes, y_genes
        Cells x genes, the same genes in the same order (log1p-CP10k in the reports);
        dense or sparse.
    """
    n, m = x_genes.shape[0], y_genes.shape[0]
    if x_genes.shape[1] != y_genes.shape[1]:
        raise LingshuError(f"x and y must have the same genes, got {x_genes.shape[1]} and {y_genes.shape[1]}")
    if n < 1 or m < 1:
        raise LingshuError(f"both samples need at least 1 cell, got {n} and {m}")
    if sp.issparse(x_genes):
        x_genes = sp.csc_matrix(x_genes)
    if sp.issparse(y_genes):
        y_genes = sp.csc_matrix(y_genes)
    ix, iy, width = _quantile_grid(n, m)
    n_genes = x_genes.shape[1]
    total = 0.0
    for start in range(0, n_genes, _GENE_CHUNK):
        stop = min(start + _GENE_CHUNK, n_genes)
        xs = np.sort(_columns(x_genes, start, stop).astype(np.float64), axis=0)  # (n, C)
        ys = np.sort(_columns(y_genes, start, stop).astype(np.float64), axis=0)  # (m, C)
        total += float((width @ np.abs(xs[ix] - ys[iy])).sum())  # (K,) @ (K, C)
    return total / n_genes


def _mean_var(x) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and variance (``ddof=1``) of a cells x genes matrix, in float64."""
    n = x.shape[0]
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64)
        mean = np.asarray(x.mean(axis=0)).ravel()
        sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    else:
        x = np.asarray(x, dtype=np.float64)
        mean, sq = x.mean(axis=0), (x * x).mean(axis=0)
    var = np.maximum(sq - mean * mean, 0.0) * (n / max(n - 1, 1))
    return mean, var


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson and Spearman correlation; NaN when either vector is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    return float(stats.pearsonr(a, b)[0]), float(stats.spearmanr(a, b)[0])


def gene_moment_correlations(real_log, sim_log) -> dict[str, float]:
    """Correlation across genes of per-gene means and of per-gene variances.

    Parameters
    ----------
    real_log, sim_log
        Cells x genes log1p-CP10k matrices over the same genes (dense or sparse).

    Returns
    -------
    ``{"pearson_mean", "spearman_mean", "pearson_var", "spearman_var"}``; 1 is perfect.
    Variances use ``ddof=1``; every gene counts (genes constant in both give ties).
    """
    mr, vr = _mean_var(real_log)
    ms, vs = _mean_var(sim_log)
    pm, sm = _corr(mr, ms)
    pv, sv = _corr(vr, vs)
    return {"pearson_mean": pm, "spearman_mean": sm, "pearson_var": pv, "spearman_var": sv}


def _zero_fraction(counts) -> np.ndarray:
    if sp.issparse(counts):
        c = sp.csr_matrix(counts)
        nonzero = np.bincount(c.indices[c.data != 0], minlength=c.shape[1])
    else:
        nonzero = np.count_nonzero(np.asarray(counts), axis=0)
    return 1.0 - nonzero / counts.shape[0]


def zero_fraction_agreement(real_counts, sim_counts) -> dict[str, float]:
    """Agreement of the per-gene fraction of cells with a zero count.

    Returns
    -------
    ``{"zero_fraction_pearson": Pearson r across genes (1 is perfect),
    "zero_fraction_mae": mean over genes of |real - sim| fraction (0 is perfect)}``.
    """
    zr, zs = _zero_fraction(real_counts), _zero_fraction(sim_counts)
    return {"zero_fraction_pearson": _corr(zr, zs)[0], "zero_fraction_mae": float(np.mean(np.abs(zr - zs)))}


def library_size_agreement(real_counts, sim_counts) -> dict[str, float]:
    """Agreement of per-cell total counts (over the genes given, i.e. the shared genes).

    Returns
    -------
    ``{"library_size_ks": two-sample Kolmogorov-Smirnov statistic of the totals (0 is
    perfect; the same for log totals, since KS is invariant to monotone maps),
    "library_size_median_ratio": median(sim totals) / median(real totals) (1 is perfect)}``.
    """
    tr = np.asarray(real_counts.sum(axis=1), dtype=np.float64).ravel()
    ts = np.asarray(sim_counts.sum(axis=1), dtype=np.float64).ravel()
    ks = float(stats.ks_2samp(np.log1p(tr), np.log1p(ts)).statistic)
    med_r = float(np.median(tr))
    ratio = float(np.median(ts)) / med_r if med_r > 0 else float("nan")
    return {"library_size_ks": ks, "library_size_median_ratio": ratio}
