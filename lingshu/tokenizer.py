"""Raw UMI counts <-> discrete quasi-log value tokens.

Token layout (281 value tokens + MASK = 282):

======  ==============  ===========================
token   counts          width
======  ==============  ===========================
0..99   0..99           exact
100..189 100..999       bins of 10
190..279 1000..9999     bins of 100
280     >= 10000        one overflow token
281     MASK
======  ==============  ===========================

Decoding is exact below 100. Inside a bin the count is drawn from a within-bin
distribution: the empirical one observed in the training data when the
tokenizer was :meth:`CountTokenizer.fit` (so pseudobulk sums stay unbiased with
respect to the training data), otherwise uniform over the bin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["CountTokenizer", "N_VALUE_TOKENS", "MASK_ID", "VOCAB_SIZE", "encode_values", "token_frequencies",
           "token_midpoints"]

N_VALUE_TOKENS = 281
MASK_ID = 281
VOCAB_SIZE = 282
_OVERFLOW = 280
_MAX_OVERFLOW_SAMPLES = 512


def _bin_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Lower bound and width of every value token (overflow width: 0 = open)."""
    lower = np.concatenate([np.arange(100), 100 + 10 * np.arange(90), 1000 + 100 * np.arange(90), [10000]])
    width = np.concatenate([np.ones(100), np.full(90, 10), np.full(90, 100), [0]]).astype(np.int64)
    return lower.astype(np.int64), width


_LOWER, _WIDTH = _bin_bounds()


def token_midpoints() -> np.ndarray:
    """The count each value token stands for: itself below 100, a bin's middle above (float64, 281)."""
    return _LOWER + np.maximum(_WIDTH - 1, 0) / 2.0


def encode_values(counts: np.ndarray) -> np.ndarray:
    """Map non-negative integer counts (any shape) to value tokens (int64)."""
    c = np.asarray(counts).astype(np.int64, copy=False)
    tok = np.where(c < 100, c, np.where(c < 1000, 100 + (c - 100) // 10, np.where(c < 10000, 190 + (c - 1000) // 100, _OVERFLOW)))
    return tok.astype(np.int64)


def token_frequencies(x: sp.spmatrix) -> np.ndarray:
    """Fraction of all (cell, gene) entries of a count matrix that fall on each value token.

    Zeros are counted without densifying (``cells * genes - nnz``).
    """
    x = sp.csr_matrix(x)
    counts = np.bincount(encode_values(x.data), minlength=N_VALUE_TOKENS).astype(np.float64)
    counts[0] += x.shape[0] * x.shape[1] - x.nnz - np.sum(x.data == 0)
    return counts / max(counts.sum(), 1.0)


@dataclass
class CountTokenizer:
    """Counts to tokens and back, with a calibrated within-bin decoder.

    Attributes
    ----------
    within_bin
        For each binned token (100..279) present in the fitted data, the observed
        count of each integer in the bin (``{token: [n_lower, n_lower+1, ...]}``).
    overflow_values
        A sample of observed counts >= 10000 (decoding draws from it).
    """

    within_bin: dict[int, list[int]] = field(default_factory=dict)
    overflow_values: list[int] = field(default_factory=list)

    vocab_size: int = VOCAB_SIZE
    mask_id: int = MASK_ID
    n_values: int = N_VALUE_TOKENS

    # ------------------------------------------------------------------ fit
    def fit(self, x: sp.spmatrix | np.ndarray, seed: int = 0) -> "CountTokenizer":
        """Record the within-bin distribution of the counts in ``x`` (cells x genes)."""
        data = x.data if sp.issparse(x) else np.asarray(x).ravel()
        data = np.asarray(data).astype(np.int64)
        big = data[data >= 100]
        tok = encode_values(big)
        self.within_bin = {}
        binned = big[tok < _OVERFLOW]
        btok = tok[tok < _OVERFLOW]
        for t in np.unique(btok):
            offs = binned[btok == t] - _LOWER[t]
            self.within_bin[int(t)] = np.bincount(offs, minlength=int(_WIDTH[t])).tolist()
        over = big[tok == _OVERFLOW]
        if over.size > _MAX_OVERFLOW_SAMPLES:
            over = np.random.default_rng(seed).choice(over, _MAX_OVERFLOW_SAMPLES, replace=False)
        self.overflow_values = sorted(int(v) for v in over)
        return self

    # --------------------------------------------------------------- encode
    def encode(self, x: sp.spmatrix | np.ndarray) -> torch.Tensor:
        """Tokens (int64, ``(cells, genes)``) of a CSR batch or a dense count array.

        A sparse batch is converted without densifying its counts: only the stored
        values are binned and scattered into a zero (= token 0) array.
        """
        if sp.issparse(x):
            x = sp.csr_matrix(x)
            if not x.has_canonical_format:  # repeated (cell, gene) entries mean their sum
                x = x.copy()
                x.sum_duplicates()
            out = np.zeros(x.shape, dtype=np.int64)
            rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
            out[rows, x.indices] = encode_values(x.data)
            return torch.from_numpy(out)
        return torch.from_numpy(encode_values(np.asarray(x)))

    # --------------------------------------------------------------- decode
    def decode(self, tokens: torch.Tensor | np.ndarray, seed: int | np.random.Generator = 0) -> np.ndarray:
        """Integer counts (int64) for value tokens; binned tokens are drawn within their bin.

        Raises
        ------
        ValueError
            If a MASK or out-of-range token is present.
        """
        tok = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        tok = tok.astype(np.int64)
        if tok.size and (tok.min() < 0 or tok.max() >= N_VALUE_TOKENS):
            raise ValueError("decode() got MASK or out-of-range tokens; sample until every gene is revealed")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        counts = tok.copy()  # exact for < 100
        idx = np.flatnonzero(tok >= 100)
        if idx.size:
            t = tok.ravel()[idx]
            vals = np.empty(idx.size, dtype=np.int64)
            for token in np.unique(t):
                sel = t == token
                vals[sel] = self._draw(int(token), int(sel.sum()), rng)
            counts.ravel()[idx] = vals
        return counts

    def _draw(self, token: int, n: int, rng: np.random.Generator) -> np.ndarray:
        if token == _OVERFLOW:
            if self.overflow_values:
                return rng.choice(np.asarray(self.overflow_values, dtype=np.int64), n)
            return np.full(n, 10000, dtype=np.int64)
        hist = self.within_bin.get(token)
        if hist is not None and sum(hist) > 0:
            p = np.asarray(hist, dtype=np.float64)
            return _LOWER[token] + rng.choice(len(p), n, p=p / p.sum())
        return _LOWER[token] + rng.integers(0, _WIDTH[token], n)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state."""
        return {
            "scheme": "quasi-log-281",
            "within_bin": {str(k): v for k, v in self.within_bin.items()},
            "overflow_values": list(self.overflow_values),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CountTokenizer":
        """Rebuild from :meth:`state_dict`."""
        if state.get("scheme") != "quasi-log-281":
            raise ValueError(f"unknown tokenizer scheme {state.get('scheme')!r}")
        return cls(
            within_bin={int(k): list(v) for k, v in state.get("within_bin", {}).items()},
            overflow_values=[int(v) for v in state.get("overflow_values", [])],
        )
