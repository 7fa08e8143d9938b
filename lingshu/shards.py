"""Count matrices too large for memory: one or many ``.h5ad`` / 10x ``.h5`` / ``.h5mu`` shards on disk.

:class:`ShardedCounts` presents the row-concatenation of its shards as one read-only
cells x genes matrix. Rows are read straight from the HDF5 CSR arrays in blocks of
consecutive cells and kept in a small LRU cache, so memory is ``O(cache x block x nnz
per cell)`` whatever the number of cells. Genes are aligned by name: the model uses the
genes every shard has, in the first shard's order. Count values are checked block by
block as they are read (a bad value stops training with the file and rows named).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import LingshuError
from .validation import check_count_values, require_unique_genes

__all__ = ["ShardedCounts"]

log = logging.getLogger(__name__)


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class _Shard:
    """One file's CSR (or dense) count arrays, opened read-only."""

    def __init__(self, path: Path, layer: str | None) -> None:
        self.path = path
        if path.suffix.lower() not in (".h5ad", ".h5", ".h5mu"):
            raise LingshuError(f"cannot stream {path}: unknown extension {path.suffix or '(none)'!r}; "
                               "supported: .h5ad, .h5, .h5mu")
        if not path.is_file():
            raise LingshuError(f"{path}: no such file")
        try:
            self.file = h5py.File(path, "r")
        except OSError as e:
            raise LingshuError(f"could not open {path} as HDF5 ({str(e).splitlines()[0]}); truncated or corrupt?") \
                from None
        try:
            self._open(layer)
        except LingshuError:
            self.file.close()
            raise
        except (KeyError, ValueError, TypeError) as e:
            self.file.close()
            raise LingshuError(f"{path}: unexpected layout ({e.__class__.__name__}: {e})") from None

    def _open(self, layer: str | None) -> None:
        import anndata as ad

        f, suffix = self.file, self.path.suffix.lower()
        if suffix == ".h5":
            if "matrix" not in f:
                raise LingshuError(f"{self.path} is not a Cell Ranger >= 3 matrix (no 'matrix' group)")
            g = f["matrix"]
            n_genes, n_cells = (int(s) for s in g["shape"][:])
            self.x, self.shape, self.dense = g, (n_cells, n_genes), False
            feats = g["features"]
            names = pd.Index(_names(feats["name"][:]), dtype=object)
            gex = (np.array([t == "Gene Expression" for t in _names(feats["feature_type"][:])])
                   if "feature_type" in feats else np.ones(len(names), bool))
            unique = list(ad.utils.make_index_unique(names[gex]))  # as lingshu.io.read_cells names them
            self.genes = [None] * len(names)  # None: not a gene-expression feature, never used
            for j, name in zip(np.flatnonzero(gex), unique):
                self.genes[j] = name
            self.obs = pd.DataFrame(index=pd.Index(_names(g["barcodes"][:]), dtype=object))
            return
        root = f
        if suffix == ".h5mu":
            mods = list(f.get("mod", {}).keys())
            rna = [m for m in mods if "rna" in m.lower() or "gex" in m.lower()]
            if not rna:
                raise LingshuError(f"{self.path} has no RNA modality (modalities: {', '.join(mods) or 'none'})")
            root = f["mod"][rna[0]]
        self.obs = ad.io.read_elem(root["obs"])
        if layer == "raw":
            if "raw" not in root:
                raise LingshuError(f"--layer raw given but {self.path} has no .raw")
            x, var = root["raw"]["X"], root["raw"]["var"]
        elif layer is not None:
            if layer not in root.get("layers", {}):
                raise LingshuError(f"layer {layer!r} not found in {self.path}")
            x, var = root["layers"][layer], root["var"]
        else:
            x, var = root["X"], root["var"]
        self.genes = list(map(str, ad.io.read_elem(var).index))
        enc = x.attrs.get("encoding-type", "array")
        enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        if isinstance(x, h5py.Dataset):
            self.x, self.shape, self.dense = x, tuple(int(s) for s in x.shape), True
        elif enc == "csr_matrix":
            self.x, self.shape, self.dense = x, tuple(int(s) for s in x.attrs["shape"]), False
        else:
            raise LingshuError(f"{self.path}: counts are stored as {enc}; streaming needs row-major CSR "
                               "(in Python: adata.X = adata.X.tocsr(); adata.write_h5ad(...))")

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR in this shard's gene order."""
        if self.dense:
            return sp.csr_matrix(np.asarray(self.x[start:stop], dtype=np.float32))
        ptr = self.x["indptr"][start:stop + 1].astype(np.int64)
        data = self.x["data"][ptr[0]:ptr[-1]].astype(np.float32)
        idx = self.x["indices"][ptr[0]:ptr[-1]]
        return sp.csr_matrix((data, idx, ptr - ptr[0]), shape=(stop - start, self.shape[1]))


class ShardedCounts:
    """Cells x genes counts of one or more files on disk, read lazily in row blocks.

    Parameters
    ----------
    paths
        ``.h5ad``, 10x ``.h5`` or ``.h5mu`` files (rows concatenated in this order).
    layer
        Where the counts are in ``.h5ad``/``.h5mu`` files: ``None`` (``X``), a layer or ``"raw"``.
    block
        Rows per read (and per cache entry).
    cache_blocks
        Blocks kept in memory (match the training shuffle buffer).
    """

    def __init__(self, paths: Sequence[str | Path], *, layer: str | None = None, block: int = 1024,
                 cache_blocks: int = 16) -> None:
        if not paths:
            raise LingshuError("no input files given")
        self.shards = [_Shard(Path(p), layer) for p in paths]
        self.block, self.cache_blocks = int(block), int(cache_blocks)
        named = [[g for g in s.genes if g is not None] for s in self.shards]
        for s, genes in zip(self.shards, named):
            require_unique_genes(genes, str(s.path))
        common = set(named[0]).intersection(*named[1:])
        self.genes = [g for g in named[0] if g in common]
        if not self.genes:
            raise LingshuError("the input files share no gene names; they cannot be trained on together")
        dropped = len(set().union(*named)) - len(self.genes)
        if dropped:
            log.warning("training on the %d genes every file has (%d genes missing from some file are left out)",
                        len(self.genes), dropped)
        pos = {g: i for i, g in enumerate(self.genes)}
        self._colmap = [np.array([-1 if g is None else pos.get(g, -1) for g in s.genes], dtype=np.int64)
                        for s in self.shards]
        self._identity = [bool(np.array_equal(m, np.arange(len(m)))) for m in self._colmap]
        sizes = [s.shape[0] for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), len(self.genes))
        if self.shape[0] == 0:
            raise LingshuError("the input files hold 0 cells")
        self._cache: OrderedDict[int, sp.csr_matrix] = OrderedDict()

        self.obs = self._concat_obs()

    def _concat_obs(self) -> pd.DataFrame:
        """Cell annotations of every shard (columns missing from a shard are NA)."""
        frames = []
        for s in self.shards:
            o = s.obs.copy()
            o.index = o.index.astype(str)
            frames.append(o)
        if len(frames) == 1:
            return frames[0]
        return pd.concat(frames, axis=0, join="outer")

    def close(self) -> None:
        for s in self.shards:
            s.file.close()

    # ------------------------------------------------------------------ rows
    def _read(self, start: int, stop: int) -> sp.csr_matrix:
        """Global rows ``start:stop`` in model gene order, checked to be counts."""
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while start < stop:
            s, off = self.shards[i], int(self.offsets[i])
            end = min(stop, int(self.offsets[i + 1]))
            m = s.rows(start - off, end - off)
            why = check_count_values(m)
            if why:
                raise LingshuError(f"{s.path}: rows {start - off}..{end - off - 1} hold {why}, not raw counts")
            if not self._identity[i]:
                m = m.tocoo()
                col = self._colmap[i][m.col]
                keep = col >= 0
                m = sp.csr_matrix((m.data[keep], (m.row[keep], col[keep])), shape=(end - start, self.shape[1]))
            parts.append(m)
            start, i = end, i + 1
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")

    def _block(self, b: int) -> sp.csr_matrix:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        m = self._read(b * self.block, min((b + 1) * self.block, self.shape[0]))
        self._cache[b] = m
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return m

    def __getitem__(self, rows) -> sp.csr_matrix:
        """CSR of the given rows (an integer array or a slice), in the order given."""
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} cells")
        blocks = rows // self.block
        out = []
        for b in np.unique(blocks):
            sel = rows[blocks == b] - b * self.block
            out.append((np.flatnonzero(blocks == b), self._block(int(b))[sel]))
        if not out:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        order = np.concatenate([o for o, _ in out])
        stacked = sp.vstack([m for _, m in out], format="csr")
        return stacked[np.argsort(order)]

    def sample(self, n_cells: int, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
        """About ``n_cells`` cells from whole blocks spread over the data (for fitting the tokenizer).

        Returns the CSR matrix and the row number of each of its cells.
        """
        rng = np.random.default_rng(seed)
        n_blocks = -(-self.shape[0] // self.block)
        chosen, parts, rows, total = rng.permutation(n_blocks), [], [], 0
        for b in chosen:
            lo, hi = int(b) * self.block, min((int(b) + 1) * self.block, self.shape[0])
            parts.append(self._read(lo, hi))
            rows.append(np.arange(lo, hi))
            total += hi - lo
            if total >= n_cells:
                break
        return sp.vstack(parts, format="csr"), np.concatenate(rows)
