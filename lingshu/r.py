"""Bridge to R: AnnData -> Seurat / SingleCellExperiment, and the hand-off used by the R package.

Two directions, two mechanisms:

* Python -> R objects through rpy2 (an optional extra, ``pip install 'lingshu[r]'``, imported
  only when a function here needs it): :func:`to_seurat`, :func:`to_sce`, :func:`write_rds`.
  ``lingshu simulate --out sim.rds`` goes through :func:`write_rds`.
* The R package ``lingshu`` (in ``r/``) calls the engine through reticulate. reticulate 1.28
  cannot convert NumPy 2 arrays, so nothing here hands R an array: sparse matrices travel as
  their CSC components packed in little-endian ``bytearray`` s (R ``raw`` vectors on the other
  side, read with ``readBin``) and labels as plain lists. See :func:`cells_from_r`,
  :func:`cells_to_r`, :func:`train_from_r`.

Feature names: Seurat rewrites ``_`` and ``|`` in feature names to ``-`` (with a warning).
Lingshu does the rewrite itself, refuses it when two genes would collide, and keeps the
original names in the assay's feature metadata column ``original_name`` so that they can be
mapped back to the model's genes (:func:`model_gene_names`). SingleCellExperiment keeps the
names unchanged.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import LingshuError

__all__ = ["to_seurat", "to_sce", "write_rds", "seurat_feature_names", "model_gene_names", "cells_from_r",
           "cells_to_r", "train_from_r"]

log = logging.getLogger(__name__)
_SEURAT_BAD = re.compile(r"[_|]")
_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------- feature names
def seurat_feature_names(genes: Sequence[str]) -> list[str]:
    """Gene names as Seurat stores them: ``_`` and ``|`` become ``-``.

    Raises :class:`LingshuError` when the rewrite would give two genes the same name.
    """
    genes = [str(g) for g in genes]
    renamed = [_SEURAT_BAD.sub("-", g) for g in genes]
    if len(set(renamed)) != len(renamed):
        first: dict[str, str] = {}
        for g, r in zip(genes, renamed):
            if r in first and first[r] != g:
                raise LingshuError(f"genes {first[r]!r} and {g!r} would both be named {r!r} in Seurat "
                                   "(it replaces '_' and '|' with '-'); rename one of them first")
            first[r] = g
    n = sum(g != r for g, r in zip(genes, renamed))
    if n:
        log.info("Seurat does not allow '_' or '|' in feature names: renamed %d genes (e.g. %s -> %s); "
                 "the original names are in the feature metadata column 'original_name'",
                 n, *next((g, r) for g, r in zip(genes, renamed) if g != r))
    return renamed


def model_gene_names(features: Sequence[str], model_genes: Sequence[str]) -> list[str]:
    """Map feature names back to the model's genes where only Seurat's ``_``/``|`` -> ``-`` differs.

    A feature the model knows verbatim is kept; one that matches a model gene only after the
    rewrite gets the model's name; anything else is kept as is (and later ignored by the model).
    """
    features = [str(f) for f in features]
    known = set(map(str, model_genes))
    by_seurat: dict[str, str] = {}
    for g in map(str, model_genes):
        by_seurat.setdefault(_SEURAT_BAD.sub("-", g), g)
    return [f if f in known else by_seurat.get(f, f) for f in features]


# --------------------------------------------------------------------------- reticulate hand-off
def _from_bytes(buf, dtype: str, n: int, what: str) -> np.ndarray:
    arr = np.frombuffer(bytes(buf), dtype=dtype)
    if arr.size != n:
        raise LingshuError(f"R hand-off: {what} has {arr.size} values, expected {n}")
    return arr


def _as_list(values) -> list:
    """reticulate turns a length-1 R vector into a scalar; make it a list again."""
    if values is None:
        return []
    if isinstance(values, (str, bytes, int, float, bool)):
        return [values]
    return list(values)


def cells_from_r(obs: Mapping[str, Any], cells: Sequence[str], genes: Sequence[str] | None = None, *,
                 i=None, p=None, x=None, model_genes: Sequence[str] | None = None):
    """Build a cells x genes AnnData from an R ``dgCMatrix`` (genes x cells) and metadata.

    Parameters
    ----------
    obs
        ``{column: values}``, one value per cell (R character or numeric vectors).
    cells
        Cell names (the matrix's column names).
    genes
        Gene names (row names); ignored without ``i``.
    i, p, x
        The ``dgCMatrix`` slots as little-endian bytes: ``i`` and ``p`` int32, ``x`` float64.
        A genes x cells CSC matrix has the same arrays as a cells x genes CSR matrix.
        Without them the AnnData has no genes (enough for :meth:`LingshuModel.predict`).
    model_genes
        If given, gene names that differ from the model's only by Seurat's renaming are
        mapped back (:func:`model_gene_names`).
    """
    import anndata as ad

    cells = [str(c) for c in _as_list(cells)]
    n_cells = len(cells)
    obs_df = pd.DataFrame(index=pd.Index(cells, dtype=str))
    for key, values in dict(obs or {}).items():
        values = _as_list(values)
        if len(values) != n_cells:
            raise LingshuError(f"R hand-off: metadata column {key!r} has {len(values)} values for {n_cells} cells")
        obs_df[str(key)] = values
    if i is None:
        return ad.AnnData(X=sp.csr_matrix((n_cells, 0), dtype=np.float32), obs=obs_df)
    genes = [str(g) for g in _as_list(genes)]
    if model_genes is not None:
        genes = model_gene_names(genes, model_genes)
    indptr = _from_bytes(p, "<i4", n_cells + 1, "p")
    indices = _from_bytes(i, "<i4", int(indptr[-1]), "i")
    data = _from_bytes(x, "<f8", int(indptr[-1]), "x")
    x_csr = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int32)),
                          shape=(n_cells, len(genes)))  # (cells, genes)
    return ad.AnnData(X=x_csr, obs=obs_df, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))


def _csc_parts(adata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, p, x)`` of the genes x cells ``dgCMatrix`` holding ``adata.X`` (sorted, int32)."""
    x = adata.X
    if hasattr(x, "to_memory"):
        x = x.to_memory()
    x = sp.csr_matrix(x, dtype=np.float64)  # (cells, genes); also turns sparse arrays into matrices
    x.sum_duplicates()
    x.sort_indices()
    if x.nnz > _INT32_MAX:
        raise LingshuError(f"{x.nnz:,} non-zero counts do not fit an R dgCMatrix (limit {_INT32_MAX:,}); split the cells")
    return x.indices.astype("<i4"), x.indptr.astype("<i4"), x.data.astype("<f8")


def _column(values: pd.Series) -> dict[str, Any]:
    """One obs column as plain lists: ``{"values", "levels"}`` (levels only for categoricals).

    Strings (missing -> ``None``), bools, ints (when they fit R's 32-bit integers) or floats.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in values.cat.categories]
        return {"values": [None if pd.isna(v) else str(v) for v in values], "levels": cats}
    if pd.api.types.is_bool_dtype(values):
        return {"values": [bool(v) for v in values], "levels": None}
    if pd.api.types.is_integer_dtype(values) and (values.abs() <= _INT32_MAX).all():
        return {"values": [int(v) for v in values], "levels": None}
    if pd.api.types.is_numeric_dtype(values):
        return {"values": [float(v) for v in values], "levels": None}
    return {"values": [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values],
            "levels": None}


def _provenance(adata) -> str:
    """``uns['lingshu']`` as a JSON string ("{}" if absent)."""
    return json.dumps(adata.uns.get("lingshu", {}), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _payload(adata, seurat: bool = True) -> dict[str, Any]:
    i, p, x = _csc_parts(adata)
    genes = [str(g) for g in adata.var_names]
    return {"i": i, "p": p, "x": x, "n_genes": len(genes), "n_cells": int(adata.n_obs), "genes": genes,
            "features": seurat_feature_names(genes) if seurat else genes, "cells": [str(c) for c in adata.obs_names],
            "obs": {str(k): _column(adata.obs[k]) for k in adata.obs.columns},
            "provenance": _provenance(adata)}


def cells_to_r(adata) -> dict[str, Any]:
    """Everything R needs to rebuild ``adata`` as a Seurat object, without NumPy arrays.

    Returns
    -------
    dict
        ``i``, ``p``, ``x`` (bytearray: int32, int32, float64 little-endian slots of the genes x
        cells ``dgCMatrix``), ``n_genes``, ``n_cells``, ``genes`` (original names), ``features``
        (Seurat-safe names), ``cells``, ``obs`` (``{column: {"values", "levels"}}``) and
        ``provenance`` (``uns['lingshu']`` as JSON).
    """
    payload = _payload(adata)
    for k in ("i", "p", "x"):
        payload[k] = bytearray(payload[k].tobytes())
    return payload


def train_from_r(adata, *, context_keys: Sequence[str] = (), perturbation_key: str | None = None,
                 control: str | None = None, preset: str = "tiny", max_steps: int | None = None,
                 device: str = "auto", seed: int = 0, out_dir: str | None = None, cell_states: int | None = None):
    """Build and train a :class:`~lingshu.LingshuModel` the way ``lingshu train`` does.

    ``seed`` seeds both the model (gene permutation, weights) and the training run;
    ``cell_states`` (``None``: the preset's) sets :attr:`ModelConfig.cell_states`.
    """
    import dataclasses

    from .config import preset as get_preset
    from .model import LingshuModel

    model_config = (None if cell_states is None
                    else dataclasses.replace(get_preset(preset).model, cell_states=int(cell_states)))
    model = LingshuModel(adata, context_keys=[str(k) for k in _as_list(context_keys)],
                         perturbation_key=perturbation_key, control=control, preset=preset, config=model_config,
                         seed=int(seed))
    config = dataclasses.replace(get_preset(preset).train, seed=int(seed))
    model.train(config, max_steps=None if max_steps is None else int(max_steps), device=device,
                out_dir=out_dir, progress=False)
    if out_dir is not None:
        model.save(out_dir)
    return model


# --------------------------------------------------------------------------- rpy2: Python -> R objects
_R_BUILDER = r"""
function(i, p, x, dims, genes, features, cells, obs, levels, reductions, provenance, kind) {
  counts <- new("dgCMatrix", i = i, p = p, x = x, Dim = dims, Dimnames = list(genes, cells))
  meta <- data.frame(row.names = cells)
  for (k in names(obs)) {
    v <- obs[[k]]
    if (!is.null(levels[[k]])) v <- factor(v, levels = levels[[k]])
    meta[[k]] <- v
  }
  prov <- if (requireNamespace("jsonlite", quietly = TRUE)) jsonlite::fromJSON(provenance) else provenance
  if (kind == "sce") {
    sce <- SingleCellExperiment::SingleCellExperiment(
      assays = list(counts = counts), colData = S4Vectors::DataFrame(meta, check.names = FALSE))
    for (r in names(reductions)) {
      m <- matrix(reductions[[r]]$values, nrow = length(cells), dimnames = list(cells, NULL))
      SingleCellExperiment::reducedDim(sce, r) <- m
    }
    S4Vectors::metadata(sce)$lingshu <- prov
    return(sce)
  }
  rownames(counts) <- features
  # Seurat computes these itself; a copied column would go stale after subsetting genes
  meta <- meta[, setdiff(names(meta), c("nCount_RNA", "nFeature_RNA")), drop = FALSE]
  obj <- SeuratObject::CreateSeuratObject(counts = counts, project = "lingshu", meta.data = meta)
  if (!"orig.ident" %in% names(meta)) obj$orig.ident <- factor(rep("lingshu", ncol(obj)))
  SeuratObject::Idents(obj) <- "orig.ident"
  obj[["RNA"]] <- SeuratObject::AddMetaData(obj[["RNA"]], data.frame(original_name = genes, row.names = features))
  for (r in names(reductions)) {
    key <- reductions[[r]]$key
    m <- matrix(reductions[[r]]$values, nrow = length(cells),
                dimnames = list(cells, paste0(key, seq_len(length(reductions[[r]]$values) / length(cells)))))
    obj[[r]] <- SeuratObject::CreateDimReducObject(embeddings = m, key = key, assay = "RNA")
  }
  SeuratObject::Misc(obj, "lingshu") <- prov
  obj
}
"""


def _rpy2():
    """Import rpy2 (raising ImportError with an install hint) and quiet the R console."""
    try:
        import rpy2.rinterface as ri
        import rpy2.robjects as ro
    except ImportError as exc:
        raise ImportError(f"rpy2 is not installed (pip install 'lingshu[r]', needs R): {exc}") from exc
    except Exception as exc:  # R itself missing or broken: rpy2 fails while loading libR
        raise ImportError(f"rpy2 could not start R ({type(exc).__name__}: {exc}); is R installed?") from exc
    return ri, ro


def _r_call(fn_source: str, *args, packages: Sequence[str] = ()):
    """Evaluate ``fn_source`` in R and call it; R console output goes to the debug log."""
    ri, ro = _rpy2()
    from rpy2.rinterface_lib import callbacks

    def to_log(text: str) -> None:
        if text.strip():
            log.debug("R: %s", text.rstrip())

    with callbacks.obj_in_module(callbacks, "consolewrite_print", to_log), \
            callbacks.obj_in_module(callbacks, "consolewrite_warnerror", to_log):
        # rpy2 3.5 hooks a warning about a reticulate segfault fixed long before reticulate 1.28
        # onto reticulate's onLoad; Seurat loads reticulate, so drop that hook.
        ro.r('setHook(packageEvent("reticulate", "onLoad"), NULL, "replace")')
        for pkg in packages:
            if not ro.r(f'isTRUE(requireNamespace("{pkg}", quietly = TRUE))')[0]:
                raise LingshuError(f"the R package {pkg!r} is not installed in R ({ro.r('R.home()')[0]}); "
                                   f"install it, e.g. install.packages('{pkg}') or apt install r-cran-{pkg.lower()}")
        try:
            return ro.r(fn_source)(*args)
        except ri.embedded.RRuntimeError as exc:
            raise LingshuError(f"R failed: {' '.join(str(exc).split())}") from None


def _reductions(adata, kind: str, ri) -> dict[str, Any]:
    """``obsm`` 2-D arrays as R vectors (column-major) with a Seurat name and key."""
    from rpy2.robjects.vectors import ListVector

    out = {}
    for key in adata.obsm.keys():
        m = adata.obsm[key]
        if sp.issparse(m) or isinstance(m, pd.DataFrame) or getattr(m, "ndim", 0) != 2 or m.shape[1] == 0:
            log.info("obsm[%r] is not a dense matrix; not converted", key)
            continue
        name = re.sub(r"^X_", "", str(key))
        name = name.upper() if kind == "sce" and name.lower() in ("pca", "umap", "tsne") else name
        alnum = re.sub(r"[^A-Za-z0-9]", "", name) or "DR"
        tag = {"pca": "PC", "umap": "UMAP", "tsne": "tSNE"}.get(name.lower(), alnum.upper())
        values = np.asarray(m, dtype=np.float64).ravel(order="F")  # column-major, as R stores a matrix
        out[name] = ListVector({"values": ri.FloatSexpVector.from_memoryview(memoryview(np.ascontiguousarray(values))),
                                "key": ri.StrSexpVector([tag + "_"])})
    return out


def _r_vector(values: list, ri):
    """A plain list from :func:`_column` as an R vector (``None`` -> ``NA``)."""
    if values and all(isinstance(v, bool) for v in values):
        return ri.BoolSexpVector(values)
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return ri.IntSexpVector(values)
    if values and all(isinstance(v, float) for v in values):
        return ri.FloatSexpVector(values)
    return ri.StrSexpVector([ri.NA_Character if v is None else str(v) for v in values])


def _convert(adata, kind: str):
    from .validation import counts_matrix

    ri, _ = _rpy2()
    from rpy2.robjects.vectors import ListVector

    counts_matrix(adata)  # raw integer counts, or a LingshuError that says where they might be
    pl = _payload(adata, seurat=kind == "seurat")
    obs = {k: _r_vector(c["values"], ri) for k, c in pl["obs"].items()}
    levels = {k: ri.StrSexpVector(c["levels"]) for k, c in pl["obs"].items() if c["levels"] is not None}
    args = (ri.IntSexpVector.from_memoryview(memoryview(np.ascontiguousarray(pl["i"], dtype=np.int32))),
            ri.IntSexpVector.from_memoryview(memoryview(np.ascontiguousarray(pl["p"], dtype=np.int32))),
            ri.FloatSexpVector.from_memoryview(memoryview(np.ascontiguousarray(pl["x"], dtype=np.float64))),
            ri.IntSexpVector([pl["n_genes"], pl["n_cells"]]), ri.StrSexpVector(pl["genes"]),
            ri.StrSexpVector(pl["features"]), ri.StrSexpVector(pl["cells"]), ListVector(obs), ListVector(levels),
            ListVector(_reductions(adata, kind, ri)), ri.StrSexpVector([pl["provenance"]]), ri.StrSexpVector([kind]))
    packages = ("Matrix", "SingleCellExperiment", "S4Vectors") if kind == "sce" else ("Matrix", "SeuratObject")
    return _r_call(_R_BUILDER, *args, packages=packages)


def to_seurat(adata):
    """Convert an AnnData of raw counts to an R Seurat object (rpy2).

    Counts become the ``RNA`` assay's ``counts`` (a genes x cells ``dgCMatrix``), ``obs`` the
    ``meta.data`` (categoricals as factors), dense 2-D ``obsm`` entries reductions (``X_pca`` ->
    ``pca`` with key ``PC_``), ``uns['lingshu']`` the object's ``misc$lingshu``. Gene names get
    Seurat's ``_``/``|`` -> ``-`` rewrite; the original names are kept in the feature metadata
    column ``original_name``.

    Returns
    -------
    ``rpy2.robjects.methods.RS4`` wrapping the Seurat object.
    """
    return _convert(adata, "seurat")


def to_sce(adata):
    """Convert an AnnData of raw counts to a SingleCellExperiment (rpy2).

    Assay ``counts`` (genes x cells ``dgCMatrix``), ``colData`` from ``obs``, ``reducedDims``
    from dense ``obsm`` entries (``X_pca`` -> ``PCA``), ``metadata$lingshu`` from ``uns['lingshu']``.
    Gene names are kept unchanged.
    """
    return _convert(adata, "sce")


def write_rds(adata, path, kind: str = "seurat") -> Path:
    """Write ``adata`` as an R object with ``saveRDS``: a Seurat object (default) or ``kind="sce"``."""
    if kind not in ("seurat", "sce"):
        raise LingshuError(f"kind must be 'seurat' or 'sce', got {kind!r}")
    path = Path(path)
    obj = _to_r(adata, kind)
    ri, _ = _rpy2()
    _r_call("function(obj, path) saveRDS(obj, file = path)", obj, ri.StrSexpVector([str(path)]))
    return path


def _to_r(adata, kind: str):
    return to_seurat(adata) if kind == "seurat" else to_sce(adata)
