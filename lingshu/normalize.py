"""``log1p(CP10k)``: the log-normalised expression the metrics and the cell states are computed on.

Kept in its own light module (NumPy and SciPy only) so that the engine can use it without
importing :mod:`lingshu.metrics` and its scikit-learn stack.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["TARGET_SUM", "log_cp10k"]

TARGET_SUM = 1e4


def log_cp10k(counts, dtype=np.float32) -> sp.csr_matrix:
    """``log1p(counts / total * 1e4)`` per cell (cells x genes) in ``dtype``; cells with 0 counts stay 0."""
    x = sp.csr_matrix(counts, dtype=dtype, copy=True)
    total = np.asarray(x.sum(axis=1)).ravel()  # (N,)
    scale = np.divide(TARGET_SUM, total, out=np.zeros_like(total), where=total > 0)
    x = sp.csr_matrix(sp.diags(scale.astype(dtype)) @ x)
    np.log1p(x.data, out=x.data)
    return x
