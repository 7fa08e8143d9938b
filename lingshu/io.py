"""Read and write single-cell files: ``.h5ad``, 10x Genomics ``.h5``, ``.h5mu`` (and ``.rds`` out).

Every reader checks that the file is really HDF5 before parsing it and turns any parser
failure into a one-line :class:`~lingshu.errors.LingshuError` that names the file. Every
writer writes to a temporary file next to the target and renames it into place, so an
interrupted or failed write never leaves a half-written output behind.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import LingshuError

__all__ = ["read_cells", "write_cells", "check_output_path", "align_genes", "READ_FORMATS", "WRITE_FORMATS"]

log = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
READ_FORMATS = (".h5ad", ".h5", ".h5mu")
WRITE_FORMATS = (".h5ad", ".h5mu", ".rds")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception message, shortened."""
    text = str(exc).strip() or type(exc).__name__
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _check_hdf5_file(path: Path) -> None:
    """Raise unless ``path`` is an existing, non-empty file that starts with the HDF5 signature."""
    if not path.exists():
        raise LingshuError(f"{path}: no such file")
    if path.is_dir():
        raise LingshuError(f"{path} is a directory, not a data file")
    size = path.stat().st_size
    if size == 0:
        raise LingshuError(f"{path} is not an HDF5 file (empty: 0 bytes)")
    # the superblock sits at offset 0 or, after a user block (as in .h5mu), at 512 * 2**k
    offsets = [0] + [512 << k for k in range(12) if (512 << k) + len(HDF5_SIGNATURE) <= size]
    with open(path, "rb") as fh:
        found = False
        for offset in offsets:
            fh.seek(offset)
            if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                found = True
                break
    if not found:
        raise LingshuError(f"{path} is not an HDF5 file (empty/truncated?); expected {', '.join(READ_FORMATS)}")


def read_cells(path, *, layer: str | None = None, backed: bool = False, modality: str = "rna"):
    """Read a cells x genes AnnData from ``.h5ad``, a 10x Cell Ranger ``.h5`` or ``.h5mu``.

    Parameters
    ----------
    path
        The file; its extension picks the reader.
    layer
        If given, check that this layer (or ``"raw"`` for ``.raw``) exists; the data are
        returned unchanged, the caller selects the layer.
    backed
        Open an ``.h5ad``/``.h5mu`` read-only on disk instead of loading it into memory.
    modality
        For ``.h5mu``: the modality to take; if absent, the first whose name contains
        ``rna`` or ``gex``.

    Returns
    -------
    AnnData with cells in rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in READ_FORMATS:
        raise LingshuError(f"cannot read {path}: unknown extension {path.suffix or '(none)'!r}; "
                           f"supported: {', '.join(READ_FORMATS)}")
    _check_hdf5_file(path)
    try:
        with warnings.catch_warnings():
            # anndata's multi-line notice; duplicated names are reported below in one line
            warnings.filterwarnings("ignore", message=r".*names are not unique")
            if suffix == ".h5ad":
                import anndata as ad

                adata = ad.read_h5ad(path, backed="r" if backed and _has_x(path) else None)
            elif suffix == ".h5":
                adata = _read_10x_h5(path)
            else:
                adata = _read_h5mu(path, modality=modality, backed=backed)
    except LingshuError:
        raise
    except Exception as exc:  # h5py / anndata / mudata raise many types
        sizes = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
        if sizes:
            have, want = (int(v) for v in sizes.groups())
            raise LingshuError(f"could not read {path}: the file is truncated ({have:,} of {want:,} bytes); "
                               "copy or download it again") from exc
        raise LingshuError(f"could not read {path}: {_one_line(exc)} (truncated or corrupt file?)") from exc
    if layer is not None:
        _check_layer(adata, layer, path)
    _unique_cell_names(adata, path)
    if not adata.var_names.is_unique:
        dups = adata.var_names[adata.var_names.duplicated()].unique()
        log.warning("%s has %d duplicated gene name(s) (e.g. %s); training needs unique names "
                    "(adata.var_names_make_unique())", path, len(dups), ", ".join(map(str, dups[:3])))
    return adata


def _unique_cell_names(adata, path: Path) -> None:
    """Make repeated cell names unique (``c``, ``c-1``, ...) so every output row traces to one input cell.

    Cell names carry no meaning for training; only simulated cells' ``source_cell`` refers to them.
    """
    if adata.obs_names.is_unique:
        return
    dups = adata.obs_names[adata.obs_names.duplicated()].unique()
    import anndata as ad

    adata.obs_names = ad.utils.make_index_unique(adata.obs_names.astype(str))  # rule of obs_names_make_unique
    log.warning("%s has %d duplicated cell name(s) (e.g. %s); made them unique by appending -1, -2, ...",
                path, len(dups), ", ".join(map(str, dups[:3])))


def _has_x(path: Path) -> bool:
    """Whether an ``.h5ad`` stores ``X`` (anndata cannot open one without it backed; such files load in memory)."""
    import h5py

    with h5py.File(path, "r") as f:
        return "X" in f


def _check_layer(adata, layer: str, path: Path) -> None:
    if layer == "raw":
        if adata.raw is None:
            raise LingshuError(f"--layer raw given but {path} has no .raw")
    elif layer not in adata.layers:
        avail = ", ".join(adata.layers.keys()) or "(none)"
        raise LingshuError(f"layer {layer!r} not found in {path}; available: {avail}")


def _decode(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _read_10x_h5(path: Path):
    """Cell Ranger v3 feature-barcode matrix (or v2 single-genome) -> cells x genes AnnData."""
    import anndata as ad
    import h5py
    import pandas as pd

    with h5py.File(path, "r") as f:
        if "matrix" in f:  # Cell Ranger >= 3
            g = f["matrix"]
            feats = g["features"]
            gene_ids = _decode(feats["id"][:])
            names = _decode(feats["name"][:])
            types = _decode(feats["feature_type"][:]) if "feature_type" in feats else None
        else:  # Cell Ranger 2: one group per genome
            v2 = {"barcodes", "data", "indices", "indptr", "shape", "genes", "gene_names"}
            groups = [k for k in f if isinstance(f[k], h5py.Group) and v2 <= set(f[k].keys())]
            if not groups:
                raise LingshuError(f"{path} is HDF5 but not a 10x Genomics matrix (no 'matrix' group)"
                                   f"{_other_format_hint(f)}")
            g = f[groups[0]]
            gene_ids = _decode(g["genes"][:])
            names = _decode(g["gene_names"][:])
            types = None
        n_genes, n_cells = (int(s) for s in g["shape"][:])
        barcodes = _decode(g["barcodes"][:])
        # genes x cells CSC is the transpose of a cells x genes CSR with the same arrays
        x = sp.csr_matrix((g["data"][:].astype(np.float32), g["indices"][:], g["indptr"][:]),
                          shape=(n_cells, n_genes))  # (cells, genes)

    var = pd.DataFrame({"gene_ids": gene_ids})
    if types is not None:
        var["feature_types"] = types
        keep = np.asarray([t == "Gene Expression" for t in types])
        if not keep.any():
            raise LingshuError(f"{path} has no 'Gene Expression' features; feature types: "
                               f"{', '.join(sorted(set(types)))}")
        if not keep.all():
            log.info("%s: keeping %d Gene Expression features of %d", path, keep.sum(), len(keep))
        x = x[:, np.flatnonzero(keep)]
        var = var.loc[keep].reset_index(drop=True)
        names = [n for n, k in zip(names, keep) if k]
    var.index = ad.utils.make_index_unique(pd.Index(names, dtype=object))  # same rule as var_names_make_unique
    return ad.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame(index=pd.Index(barcodes, dtype=object)), var=var)


def _other_format_hint(f) -> str:
    """``; it looks like ...`` when an HDF5 file is an AnnData or MuData file under the wrong extension."""
    kind = f.attrs.get("encoding-type", "")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind.lower() == "mudata" or "mod" in f:
        return "; it looks like a MuData file: rename it to .h5mu"
    if kind.lower() == "anndata" or {"X", "obs", "var"} <= set(f.keys()):
        return "; it looks like an AnnData file: rename it to .h5ad"
    return f"; top-level entries: {', '.join(list(f.keys())[:8]) or '(none)'}; use .h5ad for AnnData files"


def _read_h5mu(path: Path, *, modality: str, backed: bool):
    """One modality of a MuData file, with the global obs columns it lacks."""
    import mudata as md

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # mudata's notice about pull_on_update
        mdata = md.read_h5mu(path, backed="r" if backed else None)
    mods = list(mdata.mod.keys())
    if modality in mdata.mod:
        name = modality
    else:
        hits = [m for m in mods if "rna" in m.lower() or "gex" in m.lower()]
        if modality != "rna" or not hits:
            raise LingshuError(f"{path} has no modality {modality!r}; modalities: {', '.join(mods) or '(none)'}")
        name = hits[0]
        log.info("%s: using modality %r", path, name)
    adata = mdata.mod[name]
    # labels stored on the MuData level (not prefixed 'mod:') are useful conditions too
    prefixes = tuple(f"{m}:" for m in mods)
    extra = [c for c in mdata.obs.columns if not c.startswith(prefixes) and c not in adata.obs.columns]
    if extra and not backed:
        for c in extra:
            col = mdata.obs[c]  # same rows in the same order (as with one modality) need no name lookup
            adata.obs[c] = col.values if col.index.equals(adata.obs_names) else col.reindex(adata.obs_names).values
    return adata


def align_genes(adata_or_matrix, source_genes: Sequence[str] | None, model_genes: Sequence[str]):
    """Reorder the columns of a cells x genes matrix to ``model_genes``.

    Genes the input lacks become zero columns; input genes the model does not know are dropped.

    Parameters
    ----------
    adata_or_matrix
        An AnnData (its ``X``) or a cells x genes matrix (dense or sparse).
    source_genes
        Column names of the input; ``None`` takes an AnnData's ``var_names``.
    model_genes
        The model's genes, in the model's order.

    Returns
    -------
    (CSR float32 matrix of cells x ``len(model_genes)``, number of model genes missing from the input)
    """
    x = adata_or_matrix
    if hasattr(x, "var_names"):
        if source_genes is None:
            source_genes = list(x.var_names)
        x = x.X
    if source_genes is None:
        raise LingshuError("align_genes needs the gene names of a plain matrix (source_genes)")
    if hasattr(x, "to_memory"):  # backed sparse dataset
        x = x.to_memory()
    source_genes = [str(g) for g in source_genes]
    model_genes = [str(g) for g in model_genes]
    if x.shape[1] != len(source_genes):
        raise LingshuError(f"the matrix has {x.shape[1]} columns but {len(source_genes)} gene names were given")
    _refuse_duplicates(source_genes, "the input")
    _refuse_duplicates(model_genes, "the model")

    where = {g: i for i, g in enumerate(source_genes)}
    model_idx = np.asarray([j for j, g in enumerate(model_genes) if g in where], dtype=np.int64)
    source_idx = np.asarray([where[model_genes[j]] for j in model_idx], dtype=np.int64)
    n_missing = len(model_genes) - len(model_idx)
    if len(model_idx) == 0:
        raise LingshuError(f"none of the model's {len(model_genes)} genes are in the input "
                           f"(model genes look like {', '.join(model_genes[:3])}; input genes like "
                           f"{', '.join(source_genes[:3])}); are both gene symbols or both Ensembl IDs?")
    if n_missing:
        examples = ", ".join(g for g in model_genes if g not in where)
        examples = examples if len(examples) <= 120 else examples[:117] + "..."
        log.warning("%d of the model's %d genes are missing from the input and are set to 0 (%s)",
                    n_missing, len(model_genes), examples)
    n_dropped = len(source_genes) - len(source_idx)
    if n_dropped:
        log.info("ignoring %d input genes the model does not know", n_dropped)

    # selection matrix P (source genes x model genes) with P[source_idx, model_idx] = 1
    select = sp.csr_matrix((np.ones(len(model_idx), dtype=np.float32), (source_idx, model_idx)),
                           shape=(len(source_genes), len(model_genes)))
    x = sp.csr_matrix(x, dtype=np.float32)  # (cells, source genes)
    out = sp.csr_matrix(x @ select, dtype=np.float32)  # (cells, model genes)
    out.sort_indices()
    return out, n_missing


def _refuse_duplicates(genes: list[str], what: str) -> None:
    if len(set(genes)) == len(genes):
        return
    seen, dups = set(), []
    for g in genes:
        if g in seen and g not in dups:
            dups.append(g)
        seen.add(g)
    raise LingshuError(f"{what} has {len(dups)} duplicated gene name(s) (e.g. {', '.join(dups[:5])}); "
                       "make them unique first, e.g. adata.var_names_make_unique()")


def check_output_path(path, *, overwrite: bool = False) -> Path:
    """Raise unless ``path`` can be written by :func:`write_cells` (known extension, not in the way).

    Call it before expensive work so a bad ``--out`` fails early.
    """
    path = Path(path)
    if path.suffix.lower() not in WRITE_FORMATS:
        raise LingshuError(f"cannot write {path}: unknown extension {path.suffix or '(none)'!r}; "
                           f"supported: {', '.join(WRITE_FORMATS)}")
    if path.is_dir():
        raise LingshuError(f"{path} is a directory; give a file name ending in {', '.join(WRITE_FORMATS)}")
    if path.exists() and not overwrite:
        raise LingshuError(f"{path} exists; pass --overwrite to replace it")
    return path


def write_cells(adata, path, *, overwrite: bool = False) -> Path:
    """Write ``adata`` to ``.h5ad``, ``.h5mu`` (modality ``rna``) or ``.rds`` (a Seurat object).

    The data go to a temporary file in the target's directory that is renamed into place
    only when complete; on any failure the temporary file is removed.

    Parameters
    ----------
    adata
        Cells x genes AnnData.
    path
        Output file; its extension picks the format. Parent directories are created.
    overwrite
        Replace an existing file.

    Returns
    -------
    The path written.
    """
    path = check_output_path(path, overwrite=overwrite)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}{suffix}"
    try:
        if suffix == ".h5ad":
            adata.write_h5ad(tmp)
        elif suffix == ".h5mu":
            import mudata as md

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # mudata's notice about pull_on_update
                md.MuData({"rna": adata}).write_h5mu(tmp)
        else:
            try:
                from .r import write_rds

                write_rds(adata, tmp)
            except ImportError as exc:  # lingshu.r or rpy2 missing
                raise LingshuError(f"writing .rds needs the R bridge (pip install 'lingshu[r]' and R with "
                                   f"Seurat): {_one_line(exc)}") from exc
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
