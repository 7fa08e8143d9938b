"""Baseline predictors, written out in the format of ``lingshu simulate --in ctrl.h5ad --perturb ...``.

Every baseline perturbs each control cell once per requested perturbation, like
``LingshuModel.predict`` does: the output holds one cell per (control cell, perturbation)
with the control cell's context label, the perturbation label, ``obs["source_cell"]``, raw
counts in ``X`` (CSR float32) and ``uns["lingshu"]`` saying which baseline made it. So the
very code that scores a model scores the baselines.

Shifts live in log space, ``log1p(counts / total * 1e4)`` (the scale of
:mod:`lingshu.metrics`). A control cell with counts ``c`` and total ``t`` becomes
``expm1(max(log1p(c / t * 1e4) + shift, 0)) * t / 1e4``, rounded stochastically to whole
counts (``floor(v) + Bernoulli(v - floor(v))``, unbiased). The baselines:

``control``
    The control cells unchanged (shift 0): "the perturbation does nothing".
``pert_mean``
    Shift = mean over the perturbed training cells of (cell - mean of the training controls
    of its context): the average perturbation, blind to which one. Cells of the predicted
    context are used when the training set has any, otherwise those of all contexts. With one
    context, the prediction's pseudobulk is (up to clipping and rounding) the mean of all
    perturbed training cells.
``additive``
    Shift = the average over *other* contexts ``c'`` of (mean of perturbation ``p`` in
    ``c'`` - mean of the controls of ``c'``): context mean + perturbation shift. Without a
    context key, the shift of ``p`` in the training set (which must then be held out).

With ``holdout=True`` (``train`` contains the very cells being evaluated), a condition never
learns from its own cells: ``pert_mean`` leaves out the evaluated (perturbation, context)
cells and ``additive`` without contexts is skipped. A (perturbation, context) that a
baseline cannot predict is left out of its output and listed in
``uns["lingshu"]["skipped"]``.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import LingshuError
from ..metrics import log_cp10k
from ..metrics._data import TARGET_SUM, as_counts
from ..validation import require_obs_keys

__all__ = ["BASELINES", "make_baseline"]

log = logging.getLogger("lingshu.evaluate")

BASELINES = ("control", "pert_mean", "additive")
_ROW_CHUNK = 2048


def _contexts(adata, context_key: str | None) -> np.ndarray:
    if context_key is None:
        return np.full(adata.n_obs, "", dtype=object)
    require_obs_keys(adata, [context_key])
    return adata.obs[context_key].astype(str).to_numpy().astype(object)


def _group_means(train, perturbation_key: str, context_key: str | None, control_label: str):
    """Mean log1p-CP10k per (perturbation, context) and number of cells; controls under ``control_label``."""
    require_obs_keys(train, [perturbation_key])
    x = log_cp10k(as_counts(train, "train"))
    pert = train.obs[perturbation_key].astype(str).to_numpy()
    ctx = _contexts(train, context_key)
    keys = pd.MultiIndex.from_arrays([pert, ctx]).unique()
    means, sizes = {}, {}
    for p, c in keys:
        idx = np.flatnonzero((pert == p) & (ctx == c))
        means[(p, c)] = np.asarray(x[idx].mean(axis=0)).ravel().astype(np.float64)
        sizes[(p, c)] = idx.size
    return means, sizes


def _pert_mean_shift(p, c, means, sizes, control_label, holdout):
    ctrl = {k[1]: v for k, v in means.items() if k[0] == control_label}
    cand = [k for k in means if k[0] != control_label and k[1] in ctrl and not (holdout and k == (p, c))]
    same = [k for k in cand if k[1] == c]
    use = same or cand
    if not use:
        return None
    weights = np.array([sizes[k] for k in use], dtype=np.float64)
    deltas = np.vstack([means[k] - ctrl[k[1]] for k in use])  # (K, G)
    return weights @ deltas / weights.sum()


def _additive_shift(p, c, means, control_label, context_key, holdout):
    ctrl = {k[1]: v for k, v in means.items() if k[0] == control_label}
    if context_key is None:
        if holdout or (p, "") not in means or "" not in ctrl:
            return None
        return means[(p, "")] - ctrl[""]
    other = [k for k in means if k[0] == p and k[1] != c and k[1] in ctrl]
    if not other:
        return None
    return np.mean([means[k] - ctrl[k[1]] for k in other], axis=0)


def _shifted_counts(counts: sp.csr_matrix, shift: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Apply a log-space shift to every cell and round stochastically to counts."""
    blocks = []
    for start in range(0, counts.shape[0], _ROW_CHUNK):
        c = counts[start:start + _ROW_CHUNK]
        total = np.asarray(c.sum(axis=1), dtype=np.float64)  # (n, 1)
        x = log_cp10k(c).toarray().astype(np.float64)  # (n, G)
        v = np.expm1(np.maximum(x + shift[None, :], 0.0)) * total / TARGET_SUM
        low = np.floor(v)
        v = low + (rng.random(v.shape) < (v - low))
        blocks.append(sp.csr_matrix(v.astype(np.float32)))
    return sp.vstack(blocks).tocsr()


def make_baseline(name: str, control, *, perturbations, perturbation_key: str, context_key: str | None = None,
                  train=None, control_label: str = "control", holdout: bool = False, seed: int = 0):
    """Predict perturbed cells with a simple baseline, in ``lingshu simulate`` output format.

    Parameters
    ----------
    name
        ``"control"``, ``"pert_mean"`` or ``"additive"`` (see the module docstring for exact
        definitions; the half-split ceiling is not a prediction and is done by
        :func:`lingshu.evaluate.evaluate`).
    control
        AnnData of control cells (raw counts) to perturb, with ``obs[context_key]`` when given.
    perturbations
        Perturbation labels to predict for every control cell.
    perturbation_key
        Name of the perturbation column written to ``obs`` (and read from ``train``).
    context_key
        obs column with the context (e.g. cell type), copied from each control cell.
    train
        AnnData with raw counts, ``obs[perturbation_key]`` (control cells labelled
        ``control_label``) and ``obs[context_key]``: what ``pert_mean`` and ``additive``
        learn their shifts from. Same genes, in the same order, as ``control``.
    control_label
        The control label in ``train``.
    holdout
        ``train`` holds the evaluated cells themselves: never learn a condition from itself.
    seed
        Seed of the stochastic rounding; each (context, perturbation) draws from its own stream,
        so a condition's cells do not depend on which other perturbations are requested.

    Returns
    -------
    AnnData: counts in ``X``, ``obs`` with ``perturbation_key``, ``context_key`` and
    ``source_cell``; ``uns["lingshu"] = {"baseline": name, "seed": seed, "skipped": [...]}``.
    """
    import anndata as ad

    if name not in BASELINES:
        raise LingshuError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    if control.n_obs == 0:
        raise LingshuError("the control baseline needs at least 1 control cell")
    perturbations = [str(p) for p in perturbations]
    if not perturbations:
        raise LingshuError("no perturbations to predict")
    counts = as_counts(control, "control")
    ctx = _contexts(control, context_key)
    if name != "control":
        if train is None:
            raise LingshuError(f"the {name} baseline needs training cells (train=...) to learn shifts from")
        if list(train.var_names) != list(control.var_names):
            raise LingshuError("train and control must have the same genes in the same order")
        means, sizes = _group_means(train, perturbation_key, context_key, control_label)
    blocks, obs, skipped = [], [], []
    for c in dict.fromkeys(ctx.tolist()):
        rows = np.flatnonzero(ctx == c)
        for p in perturbations:
            if name == "control":
                x = counts[rows]
            else:
                shift = (_pert_mean_shift(p, c, means, sizes, control_label, holdout) if name == "pert_mean"
                         else _additive_shift(p, c, means, control_label, context_key, holdout))
                if shift is None:
                    skipped.append(p if context_key is None else f"{c}/{p}")
                    continue
                rng = np.random.default_rng([int(seed), zlib.crc32(str(c).encode()), zlib.crc32(p.encode())])
                x = _shifted_counts(counts[rows], shift, rng)
            blocks.append(x)
            frame = pd.DataFrame({perturbation_key: p, "source_cell": np.asarray(control.obs_names)[rows]})
            if context_key is not None:
                frame.insert(0, context_key, c)
            obs.append(frame)
    if skipped:
        log.info("%s baseline: cannot predict %d condition(s): %s", name, len(skipped), ", ".join(skipped[:10]))
    var = pd.DataFrame(index=pd.Index(control.var_names))
    if not blocks:
        out = ad.AnnData(X=sp.csr_matrix((0, control.n_vars), dtype=np.float32), var=var)
    else:
        frame = pd.concat(obs, ignore_index=True)
        frame.index = (frame["source_cell"].astype(str) + "-" + frame[perturbation_key].astype(str)).to_numpy()
        if not frame.index.is_unique:
            frame.index = [f"{i}-{k}" for k, i in enumerate(frame.index)]
        out = ad.AnnData(X=sp.vstack(blocks).tocsr().astype(np.float32), obs=frame, var=var)
    out.uns["lingshu"] = {"baseline": name, "seed": int(seed), "skipped": skipped}
    return out
