"""Write an ``.h5ad`` chunk by chunk, so simulated cells never sit in memory all at once.

:class:`H5adStreamWriter` appends CSR row chunks to a resizable sparse ``X`` in a temporary
file next to the target, collects the (small) ``obs`` table, and on :meth:`~H5adStreamWriter.close`
writes ``obs``/``var``/``uns`` and renames the file into place. If anything fails, the
temporary file is removed and no output appears.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import LingshuError

__all__ = ["H5adStreamWriter"]


class H5adStreamWriter:
    """Append-only ``.h5ad`` writer (sparse CSR ``X``, float32 counts).

    Parameters
    ----------
    path
        Target file (written under a temporary name until :meth:`close`).
    genes
        Gene names (``var_names``).
    overwrite
        Replace an existing ``path``.

    Examples
    --------
    >>> with H5adStreamWriter("sim.h5ad", genes) as w:  # doctest: +SKIP
    ...     for chunk in model.iter_simulate(table):
    ...         w.append(chunk)
    ...     w.uns = chunk.uns
    """

    def __init__(self, path: str | Path, genes: list[str], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise LingshuError(f"{self.path} exists; pass --overwrite to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.genes = [str(g) for g in genes]
        self.uns: dict[str, Any] = {}
        self._obs: list[pd.DataFrame] = []
        self.n_obs = 0
        self._f = h5py.File(self.tmp, "w")
        empty = sp.csr_matrix((0, len(self.genes)), dtype=np.float32)
        ad.io.write_elem(self._f, "X", empty, dataset_kwargs={"chunks": (1 << 16,)})
        self._x = ad.io.sparse_dataset(self._f["X"])

    def append(self, chunk: ad.AnnData) -> None:
        """Append the cells of ``chunk`` (same genes, in order)."""
        if list(map(str, chunk.var_names)) != self.genes:
            raise ValueError("chunk genes differ from the writer's")
        x = sp.csr_matrix(chunk.X, dtype=np.float32)
        if x.shape[0]:
            self._x.append(x)
        self._obs.append(chunk.obs)
        self.n_obs += x.shape[0]

    def close(self) -> Path:
        """Write the annotations and move the finished file into place."""
        obs = pd.concat(self._obs) if self._obs else pd.DataFrame(index=pd.Index([], dtype=str))
        ad.io.write_elem(self._f, "obs", obs)
        ad.io.write_elem(self._f, "var", pd.DataFrame(index=pd.Index(self.genes, dtype=str)))
        ad.io.write_elem(self._f, "uns", self.uns)
        for name in ("obsm", "varm", "obsp", "varp", "layers"):
            ad.io.write_elem(self._f, name, {})
        self._f.attrs["encoding-type"] = "anndata"
        self._f.attrs["encoding-version"] = "0.1.0"
        self._f.flush()
        self._f.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Discard the partial file."""
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "H5adStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
