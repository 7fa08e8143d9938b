"""Checking and lining up the inputs of :func:`lingshu.evaluate.evaluate`: genes, labels, controls."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import LingshuError
from ..metrics._data import as_counts
from ..validation import require_obs_keys

__all__ = ["EvalInputs", "prepare_inputs", "CONTROL_NAMES", "condition_name"]

log = logging.getLogger("lingshu.evaluate")

# labels recognised as the control when --control-label is not given (case-insensitive)
CONTROL_NAMES = ("control", "ctrl", "non-targeting", "nontargeting", "non_targeting", "nt", "unperturbed",
                 "untreated", "dmso", "vehicle")
PERT, CTX, COND = "_perturbation", "_context", "_condition"  # internal obs columns


def condition_name(context: str | None, perturbation: str) -> str:
    """``"B/stimulated"`` with a context, ``"stimulated"`` without."""
    return perturbation if context is None else f"{context}/{perturbation}"


@dataclass
class EvalInputs:
    """Gene-aligned count AnnData for every input, with string labels in internal obs columns.

    ``real`` and ``pred`` hold only perturbed cells (all cells when there is no
    perturbation key); ``control`` the real control cells, ``pred_control`` the predicted ones
    (the real controls when the prediction has none); ``train`` the cells baselines learn from.
    """

    genes: list[str]
    real: object
    pred: object
    control: object | None = None
    pred_control: object | None = None
    train: object | None = None
    train_is_real: bool = False
    perturbation_key: str | None = None
    context_key: str | None = None
    control_label: str | None = None
    conditions: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        log.warning(message)
        self.notes.append(message)


def _unique_genes(adata, what: str) -> None:
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][0]
        raise LingshuError(f"{what} has duplicated gene names (e.g. {dup!r}); call .var_names_make_unique() first")


def _labels(adata, key: str, what: str) -> np.ndarray:
    """``obs[key]`` as strings; missing values become ``""``."""
    try:
        require_obs_keys(adata, [key])
    except LingshuError as err:
        raise LingshuError(f"{what}: {err}") from None
    col = adata.obs[key]
    out = col.astype(str).to_numpy().astype(object)
    out[pd.isna(col).to_numpy()] = ""
    return out


def _subset(adata, genes: list[str], what: str, keys: list[str]):
    """A new AnnData: CSR float32 counts over ``genes``, obs with the string labels of ``keys``."""
    import anndata as ad

    if adata.n_obs == 0:
        raise LingshuError(f"{what} has 0 cells")
    x = as_counts(adata, what)[:, adata.var_names.get_indexer(genes)]
    obs = pd.DataFrame({k: _labels(adata, k, what) for k in keys}, index=adata.obs_names.astype(str))
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))


def _looks_log_normalised(adata, what: str, ev: EvalInputs) -> None:
    x = adata.X[: min(adata.n_obs, 500)]
    data = x.data if sp.issparse(x) else np.asarray(x).ravel()
    if data.size and np.any(data != np.round(data)) and float(np.max(data)) < 20:
        ev.note(f"{what}.X holds small non-integer values (max {float(np.max(data)):.3g}); it looks "
                "log-normalised, but evaluate expects raw counts")


def _shared_genes(named: dict[str, object], notes: list[str]) -> list[str]:
    for what, a in named.items():
        _unique_genes(a, what)
    real = named["real"]
    others = {w: set(a.var_names) for w, a in named.items() if w != "real"}
    genes = [g for g in real.var_names if all(g in s for s in others.values())]
    if len(genes) < 2:
        detail = "; ".join(f"{w} e.g. {list(a.var_names[:3])}" for w, a in named.items())
        raise LingshuError(f"the inputs share {len(genes)} gene name(s); need at least 2 ({detail})")
    for what, a in named.items():
        lost = a.n_vars - len(genes)
        if lost:
            notes.append(f"{what}: {lost:,} of its {a.n_vars:,} genes are not in every input; "
                         f"evaluating on the {len(genes):,} shared genes")
    return genes


def _find_control_label(real_labels, control, perturbation_key: str) -> str:
    if control is not None and perturbation_key in control.obs.columns:
        values = control.obs[perturbation_key].dropna().astype(str).unique()
        if len(values) == 1:
            return str(values[0])
    present = {str(v).lower(): str(v) for v in set(real_labels)}
    for name in CONTROL_NAMES:
        if name in present:
            return present[name]
    shown = ", ".join(sorted(set(map(str, real_labels)))[:15])
    raise LingshuError(f"cannot tell which {perturbation_key!r} label is the control (labels: {shown}); "
                       "pass control_label / --control-label")


def _drop_unlabelled(adata, keys: list[str], what: str, ev: EvalInputs):
    bad = np.zeros(adata.n_obs, dtype=bool)
    for k in keys:
        bad |= adata.obs[k].to_numpy() == ""
    if bad.all():
        raise LingshuError(f"{what}: every cell lacks a label in {', '.join(keys)}")
    if bad.any():
        ev.note(f"{what}: {bad.sum():,} cells without a {'/'.join(keys)} label were left out")
        return adata[~bad].copy()
    return adata


def _tag(adata, perturbation_key: str | None, context_key: str | None) -> None:
    """Internal columns: perturbation, context and condition name."""
    n = adata.n_obs
    pert = adata.obs[perturbation_key].to_numpy() if perturbation_key else np.full(n, "", dtype=object)
    ctx = adata.obs[context_key].to_numpy() if context_key else np.full(n, "", dtype=object)
    adata.obs[PERT], adata.obs[CTX] = pert, ctx
    adata.obs[COND] = [condition_name(c if context_key else None, p) if perturbation_key else (c or "all")
                       for c, p in zip(ctx, pert)]


def prepare_inputs(pred, real, *, control=None, train=None, perturbation_key=None, control_label=None,
                   context_key=None) -> EvalInputs:
    """Check the inputs and bring them to the shared genes and string labels.

    Rules (each breach raises :class:`~lingshu.errors.LingshuError` with a one-line reason):
    every input must hold non-negative counts and the keys asked for; the inputs must share at
    least 2 genes (the others are dropped, with a note); cells without a label are dropped
    (note); with a perturbation key there must be control cells: those of ``control`` when
    given (all its cells count as controls), otherwise the cells of ``real`` labelled
    ``control_label`` (guessed from common names such as ``control`` or ``non-targeting``
    when not given). ``pred`` cells labelled as control become the predicted controls.
    """
    ev = EvalInputs(genes=[], real=None, pred=None, perturbation_key=perturbation_key, context_key=context_key)
    if control is not None and perturbation_key is None:
        raise LingshuError("control cells were given but no perturbation key; pass perturbation_key / "
                           "--perturbation-key (the obs column naming the perturbation)")
    if control_label is not None and perturbation_key is None:
        raise LingshuError("control_label needs perturbation_key (the obs column it is a label of)")
    named = {"real": real, "pred": pred}
    if control is not None:
        named["control"] = control
    if train is not None:
        named["train"] = train
    ev.genes = _shared_genes(named, ev.notes)
    for message in ev.notes:
        log.warning(message)
    for what, a in named.items():
        _looks_log_normalised(a, what, ev)
    keys = [k for k in (perturbation_key, context_key) if k]
    real_a = _drop_unlabelled(_subset(real, ev.genes, "real", keys), keys, "real", ev)
    pred_a = _drop_unlabelled(_subset(pred, ev.genes, "pred", keys), keys, "pred", ev)
    for a in (real_a, pred_a):
        _tag(a, perturbation_key, context_key)
    if perturbation_key is None:
        ev.real, ev.pred = real_a, pred_a
        ev.conditions = {c: (c, None) for c in sorted(set(real_a.obs[COND]))} if context_key else {}
        return ev

    try:
        label = control_label or _find_control_label(real_a.obs[PERT], control, perturbation_key)
    except LingshuError:
        if control is None:
            raise
        label = "control"  # the controls come from their own file; the label only names them
    ev.control_label = label
    real_ctrl = (real_a.obs[PERT] == label).to_numpy()
    if control is not None:
        ctrl_keys = [context_key] if context_key else []
        ctrl_a = _drop_unlabelled(_subset(control, ev.genes, "control", ctrl_keys), ctrl_keys, "control", ev)
        ctrl_a.obs[perturbation_key] = label
        _tag(ctrl_a, perturbation_key, context_key)
        if real_ctrl.any():
            ev.note(f"real: its {real_ctrl.sum():,} {label!r} cells were set aside; "
                    "the control file's cells are the controls")
    elif real_ctrl.any():
        ctrl_a = real_a[real_ctrl].copy()
    else:
        raise LingshuError(f"no control cells: real has no {perturbation_key}={label!r} cells and no control file "
                           "was given; pass control= / --control ctrl.h5ad or include control cells in real")
    ev.control = ctrl_a
    ev.real = real_a[~real_ctrl].copy()
    if ev.real.n_obs == 0:
        raise LingshuError(f"real holds only control cells ({perturbation_key}={label!r}); nothing to evaluate")
    pred_ctrl = (pred_a.obs[PERT] == label).to_numpy()
    ev.pred = pred_a[~pred_ctrl].copy()
    ev.pred_control = pred_a[pred_ctrl].copy() if pred_ctrl.any() else ctrl_a
    ev.conditions = {c: (x or None, p) for c, x, p in sorted(set(zip(ev.real.obs[COND], ev.real.obs[CTX],
                                                                     ev.real.obs[PERT])))}
    _check_conditions(ev)
    if train is not None:
        train_a = _drop_unlabelled(_subset(train, ev.genes, "train", keys), keys, "train", ev)
        _tag(train_a, perturbation_key, context_key)
        ev.train = train_a
    else:
        import anndata as ad

        ev.train, ev.train_is_real = ad.concat([ev.real, ctrl_a], merge="same"), True
    return ev


def _check_conditions(ev: EvalInputs) -> None:
    real_conds, pred_conds = set(ev.conditions), set(ev.pred.obs[COND])
    extra = sorted(pred_conds - real_conds)
    if extra:
        ev.note(f"pred: {len(extra)} condition(s) with no real cells are ignored: {', '.join(extra[:10])}")
    missing = sorted(real_conds - pred_conds)
    if missing and len(missing) == len(real_conds):
        shown = ", ".join(sorted(pred_conds)[:10]) or "(none)"
        raise LingshuError(f"pred shares no condition with real (pred has: {shown}; real has: "
                           f"{', '.join(sorted(real_conds)[:10])}); check the perturbation and context keys")
    if missing:
        ev.note(f"pred has no cells for {len(missing)} real condition(s) (their model metrics are NaN): "
                f"{', '.join(missing[:10])}")
    if ev.context_key:
        ctrl_ctx = set(ev.control.obs[CTX])
        lacking = sorted(c for c, (x, _) in ev.conditions.items() if x not in ctrl_ctx)
        if lacking:
            ev.note(f"no control cells in the context of {len(lacking)} condition(s) (their perturbation "
                    f"metrics are NaN): {', '.join(lacking[:10])}")
