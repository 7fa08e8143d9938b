"""Small data sets for demos and tests, and where the shared real data lives.

:func:`pbmc68k_counts` rebuilds integer UMI counts from the ``pbmc68k_reduced`` data set
that ships inside scanpy, so it works offline anywhere scanpy is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

__all__ = ["pbmc68k_counts", "shared_data_path"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def pbmc68k_counts():
    """700 PBMCs x 765 genes of 10x "Fresh 68k PBMCs" as raw integer counts.

    The source's ``.raw.X`` holds ``log1p(counts / n_counts * 1e4)`` rounded to about three
    decimals; the counts are ``round(expm1(x) * n_counts / 1e4)``.

    Returns
    -------
    AnnData with ``X`` a CSR float32 count matrix and ``obs`` columns ``cell_type`` (the
    source's ``bulk_labels``), ``louvain``, ``phase``, ``n_genes``, ``percent_mito``.
    """
    import anndata as ad
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    logx = sp.csr_matrix(src.raw.X, dtype=np.float64)  # (cells, genes)
    size = src.obs["n_counts"].to_numpy(dtype=np.float64) / 1e4  # (cells,)
    counts = logx.copy()
    counts.data = np.expm1(counts.data)
    counts = sp.csr_matrix(sp.diags(size) @ counts)
    counts.data = np.round(counts.data)
    counts.eliminate_zeros()
    counts = counts.astype(np.float32)

    obs = src.obs[["louvain", "phase", "n_genes", "percent_mito"]].copy()
    obs.insert(0, "cell_type", src.obs["bulk_labels"].astype(str).astype("category"))
    adata = ad.AnnData(X=counts, obs=obs)
    adata.var_names = list(src.raw.var_names)
    adata.uns["source"] = "scanpy.datasets.pbmc68k_reduced(); counts = round(expm1(raw.X) * n_counts / 1e4)"
    return adata


def shared_data_path(name: str) -> Path | None:
    """Path of the shared data file ``name``, or ``None`` if it is not there.

    Looks in ``$LINGSHU_DATA_DIR`` first, then in ``../shared/data`` next to the repository root.
    """
    candidates = []
    env = os.environ.get("LINGSHU_DATA_DIR")
    if env:
        candidates.append(Path(env) / name)
    candidates.append(_REPO_ROOT.parent / "shared" / "data" / name)
    for path in candidates:
        if path.is_file():
            return path
    return None
