"""Condition vocabularies and a deterministic, streamed batch source.

Batches are read as CSR row blocks (from memory, or from ``.h5ad`` / 10x ``.h5`` shards
on disk through :class:`lingshu.shards.ShardedCounts`) and encoded to tokens one batch at
a time, so training memory is ``O(batch x genes)``. The order of cells is a pure function
of ``(seed, epoch)``, so the batch of any step can be rebuilt exactly when a run resumes.

In memory the order is a full permutation. On disk it is a block shuffle: the cells are
cut into blocks of consecutive rows, the blocks are permuted, and the rows of each group
of ``buffer`` blocks are shuffled together (a shuffle buffer), so every batch reads from
at most ``buffer`` blocks and a reader caching that many blocks reads each block once per
epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .cellstate import CellState
from .errors import LingshuError
from .library import LibrarySize
from .tokenizer import CountTokenizer
from .validation import check_labels

__all__ = ["Vocabulary", "BatchStream", "split_indices", "block_shuffle"]


@dataclass
class Vocabulary:
    """Labels of each condition key; id 0 is null, label ``i`` has id ``i + 1``."""

    keys: list[str]
    labels: dict[str, list[str]]

    @classmethod
    def from_obs(cls, obs: pd.DataFrame, keys: list[str]) -> "Vocabulary":
        labels = {}
        for k in keys:
            col = obs[k]
            if col.isna().any():
                raise LingshuError(f"obs column {k!r} has {int(col.isna().sum())} missing labels; fill or drop those cells")
            labels[k] = sorted(map(str, pd.unique(col.astype(str))))
        return cls(list(keys), labels)

    def sizes(self) -> list[int]:
        return [len(self.labels[k]) for k in self.keys]

    def encode(self, obs: pd.DataFrame, *, allow_missing_keys: bool = False) -> np.ndarray:
        """``(n, K)`` int64 ids of the labels in ``obs`` (a missing column gives null ids if allowed)."""
        out = np.zeros((len(obs), len(self.keys)), dtype=np.int64)
        for j, k in enumerate(self.keys):
            if k not in obs.columns:
                if allow_missing_keys:
                    continue
                raise LingshuError(f"obs column {k!r} not found; available: {', '.join(map(str, obs.columns)) or '(none)'}")
            values = obs[k].astype(str).to_numpy()
            check_labels(values, self.labels[k], f"{k}")
            lookup = {lab: i + 1 for i, lab in enumerate(self.labels[k])}
            out[:, j] = [lookup[v] for v in values]
        return out

    def decode(self, ids: np.ndarray) -> pd.DataFrame:
        """Labels for ``(n, K)`` ids (null becomes ``None``)."""
        cols = {}
        for j, k in enumerate(self.keys):
            labs = np.array([None] + self.labels[k], dtype=object)
            cols[k] = pd.Categorical(labs[ids[:, j]], categories=self.labels[k])
        return pd.DataFrame(cols, index=pd.RangeIndex(len(ids)))


def split_indices(n: int, val_fraction: float, seed: int, max_val: int = 2000,
                  block: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / validation split of ``n`` cells.

    With ``block > 1`` the validation cells are whole blocks of consecutive rows, so
    reading them from disk touches few blocks.
    """
    rng = np.random.default_rng(seed)
    n_val = min(int(round(n * val_fraction)), max_val) if n >= 20 else 0
    if block <= 1:
        perm = rng.permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    starts = rng.permutation(np.arange(0, n, block))
    val: list[np.ndarray] = []
    taken = 0
    for s0 in starts:
        if taken >= n_val:
            break
        rows = np.arange(s0, min(s0 + block, n))[: n_val - taken]
        val.append(rows)
        taken += len(rows)
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(n), val_idx), val_idx


def block_shuffle(indices: np.ndarray, rng: np.random.Generator, block: int, buffer: int) -> np.ndarray:
    """A permutation of ``indices`` that mixes only within groups of ``buffer`` permuted blocks.

    ``indices`` (sorted) are cut into blocks of ``block`` consecutive rows (by row number),
    the blocks are permuted, and each run of ``buffer`` blocks is shuffled as one pool.
    """
    block_id = np.asarray(indices) // block
    cuts = np.flatnonzero(np.diff(block_id)) + 1
    blocks = np.split(np.asarray(indices), cuts)
    order = rng.permutation(len(blocks))
    out = []
    for g in range(0, len(order), buffer):
        pool = np.concatenate([blocks[i] for i in order[g:g + buffer]])
        out.append(rng.permutation(pool))
    return np.concatenate(out) if out else np.asarray(indices)


class BatchStream:
    """Token batches for a fixed set of cells, in an order given by ``(seed, epoch)``.

    Parameters
    ----------
    x
        Cells x genes counts: scipy CSR in memory or an anndata backed sparse dataset.
    cond
        ``(n_cells, K)`` condition ids.
    indices
        Rows of ``x`` that this stream draws from.
    batch_size
        Cells per batch (the last incomplete batch of an epoch is dropped when the
        epoch has at least one full batch).
    tokenizer
        Encodes each CSR batch.
    seed
        Order seed.
    block, buffer
        ``block > 0``: block-shuffled order (for data on disk) with blocks of ``block``
        rows mixed ``buffer`` blocks at a time; ``0``: a full permutation.
    states
        If given, each batch's condition ids get one more column: the state of each cell,
        computed from the counts read (:class:`lingshu.cellstate.CellState`).
    library
        If given, each batch's condition ids get one more column (after the state): the
        library-size bin of each cell, computed from the counts read
        (:class:`lingshu.library.LibrarySize`).
    """

    def __init__(self, x, cond: np.ndarray, indices: np.ndarray, batch_size: int,
                 tokenizer: CountTokenizer, seed: int = 0, block: int = 0, buffer: int = 16,
                 library: LibrarySize | None = None, states: CellState | None = None) -> None:
        if len(indices) == 0:
            raise LingshuError("no cells to train on")
        self.x, self.cond, self.indices = x, cond, np.asarray(indices)
        self.batch_size = min(batch_size, len(self.indices))
        self.tokenizer, self.seed = tokenizer, seed
        self.block, self.buffer = block, max(buffer, 1)
        self.library, self.states = library, states
        self.per_epoch = len(self.indices) // self.batch_size
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def n_genes(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_keys(self) -> int:
        return int(self.cond.shape[1]) + (self.states is not None) + (self.library is not None)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = (block_shuffle(self.indices, rng, self.block, self.buffer) if self.block > 0
                     else rng.permutation(self.indices))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def rows(self, i: int) -> np.ndarray:
        """Row indices of micro-batch ``i`` (counting from the start of training)."""
        epoch, j = divmod(i, self.per_epoch)
        return self._order(epoch)[j * self.batch_size:(j + 1) * self.batch_size]

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (B, G), cond (B, K))`` of micro-batch ``i``."""
        return self.take(self.rows(i))

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and condition ids of the given rows (read in sorted order for backed files)."""
        rows = np.sort(rows)
        block = self.x[rows]
        if not sp.issparse(block):
            block = sp.csr_matrix(np.asarray(block))
        cond = self.cond[rows]
        if self.states is not None:
            cond = np.concatenate([cond, self.states.ids(block)[:, None]], axis=1)
        if self.library is not None:
            cond = np.concatenate([cond, self.library.ids(block)[:, None]], axis=1)
        return self.tokenizer.encode(block), torch.from_numpy(cond)
