"""Checks of user input: integer counts, obs keys and labels, with one-line messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import LingshuError

__all__ = ["counts_matrix", "check_count_values", "require_obs_keys", "require_unique_genes", "check_labels",
           "closest"]

_CHUNK = 4096
_MAX_COUNT = 2**31 - 1  # no UMI count comes near; larger values would overflow the tokenizer


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``choices`` that look most like ``name`` (case-insensitive)."""
    choices = [str(c) for c in choices]
    lower = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(str(name).lower(), list(lower), n=n, cutoff=0.5)
    return [lower[h] for h in hits]


def _fmt_list(items: Sequence[str], limit: int = 20) -> str:
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def require_obs_keys(adata, keys: Iterable[str]) -> None:
    """Raise if any of ``keys`` is not an ``obs`` column, listing the available ones."""
    missing = [k for k in keys if k not in adata.obs.columns]
    if missing:
        avail = _fmt_list(list(adata.obs.columns)) or "(none)"
        raise LingshuError(f"obs column {missing[0]!r} not found; available: {avail}")


def require_unique_genes(genes: Sequence[str], where: str = "") -> None:
    """Raise if a gene name occurs twice (``where``: a prefix naming the file)."""
    index = pd.Index(genes)
    if not index.is_unique:
        dup = index[index.duplicated()][0]
        raise LingshuError(f"{where + ': ' if where else ''}gene names must be unique; {dup!r} occurs more than once "
                           "(use adata.var_names_make_unique())")


def check_labels(values: Iterable[str], known: Sequence[str], what: str) -> None:
    """Raise if a label in ``values`` is not among ``known`` (the model's vocabulary)."""
    known_set = set(known)
    for v in dict.fromkeys(str(v) for v in values):
        if v not in known_set:
            near = closest(v, known)
            hint = f"; closest: {', '.join(near)}" if near else ""
            raise LingshuError(f"{what} {v!r} was never seen in training; known: {_fmt_list(list(known))}{hint}")


def _bad_values(data: np.ndarray) -> str | None:
    kind = data.dtype.kind
    if kind == "b":
        return "True/False values (a boolean matrix)"
    if kind in "US" or (kind == "O" and data.size and isinstance(data.flat[0], (str, bytes))):
        return f"text values (dtype {data.dtype})"
    if kind not in "iuf":  # objects, complex numbers, dates
        return f"non-numeric values (dtype {data.dtype})"
    if data.size == 0:
        return None
    if not np.all(np.isfinite(data)):
        return "NaN or infinite values"
    if np.any(data < 0):
        return "negative values"
    dtype_max = float(np.finfo(data.dtype).max if kind == "f" else np.iinfo(data.dtype).max)
    if dtype_max > _MAX_COUNT and np.any(data > _MAX_COUNT):
        return f"values above {_MAX_COUNT:,} (largest {float(data.max()):.3g})"
    if np.issubdtype(data.dtype, np.integer):
        return None
    if np.any(data != np.round(data)):
        return "non-integer values"
    return None


def check_count_values(x, where: str = "X") -> str | None:
    """Return why ``x`` is not a matrix of raw counts, or ``None`` if it is.

    Works in row chunks so a backed or large matrix is never densified whole.
    """
    n = x.shape[0]
    for start in range(0, max(n, 1), _CHUNK):
        chunk = x[start:start + _CHUNK]
        if sp.issparse(chunk):
            data = np.asarray(chunk.data)
        else:
            data = np.asarray(chunk)
        why = _bad_values(data)
        if why:
            return why
    return None


def _alternatives(adata) -> str:
    """Where else raw counts might live in ``adata``."""
    options = []
    for name in adata.layers.keys():
        if check_count_values(adata.layers[name]) is None:
            options.append(f"--layer {name}")
    if adata.raw is not None and check_count_values(adata.raw.X) is None:
        options.append("--layer raw (adata.raw.X)")
    if options:
        return "raw counts appear to be in: " + ", ".join(options)
    return "Lingshu needs raw integer UMI counts (not log-normalised values); pass the layer that holds them with --layer"


def counts_matrix(adata, layer: str | None = None) -> sp.csr_matrix:
    """Return the raw count matrix of ``adata`` as CSR float32, or raise a clear error.

    Parameters
    ----------
    adata
        Cells x genes AnnData.
    layer
        ``None`` for ``X``, a key of ``adata.layers``, or ``"raw"`` for ``adata.raw.X``.
    """
    if adata.n_obs == 0:
        raise LingshuError("the data has 0 cells")
    if adata.n_vars == 0:
        raise LingshuError("the data has 0 genes")
    if layer is None:
        x, where = adata.X, "X"
    elif layer == "raw":
        if adata.raw is None:
            raise LingshuError("--layer raw given but the file has no .raw")
        if adata.raw.n_vars != adata.n_vars:
            raise LingshuError("--layer raw: .raw has a different gene set than X; subset or export .raw as its own file")
        x, where = adata.raw.X, ".raw.X"
    else:
        if layer not in adata.layers:
            raise LingshuError(f"layer {layer!r} not found; available: {_fmt_list(list(adata.layers.keys())) or '(none)'}")
        x, where = adata.layers[layer], f"layers[{layer!r}]"
    if x is None:
        raise LingshuError(f"{where} is empty (the file stores no matrix there); {_alternatives(adata)}")
    why = check_count_values(x, where)
    if why:
        raise LingshuError(f"{where} holds {why}, not raw counts; {_alternatives(adata)}")
    if hasattr(x, "to_memory"):  # backed sparse dataset
        x = x.to_memory()
    x = sp.csr_matrix(x, dtype=np.float32)
    if not x.has_canonical_format:  # repeated (cell, gene) entries mean their sum; the tokenizer wants one each
        x = x.copy()  # never sort or sum the caller's arrays in place
        x.sum_duplicates()
    return x
