"""``evaluate``: score a prediction beside the baselines and the half-split ceiling of the real data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import LingshuError
from ..metrics import METRICS as DISTRIBUTION_METRICS
from ..metrics import compare, half_split
from ..metrics.distribution import MAX_CELLS
from ._inputs import COND, CTX, EvalInputs, prepare_inputs, _tag
from .baselines import BASELINES, make_baseline
from .perturbation import (PERTURBATION_METRICS, VCC_METRICS, PerturbationSide, log_normalize,
                           perturbation_scores, relative_gain, summarize_side)

__all__ = ["evaluate", "METHODS", "COLUMNS"]

log = logging.getLogger("lingshu.evaluate")

METHODS = ("model", *BASELINES, "half_split")
COLUMNS = ["method", "condition", "context", "perturbation", "family", "metric", "value", "better"]
OUTPUTS = ("metrics.csv", "summary.md")


@dataclass
class Evaluation:
    """Everything computed along the way; the plots and summary read from it."""

    inputs: EvalInputs
    methods: dict[str, tuple[object, object]]  # name -> (perturbed cells, their control cells)
    rows: list[dict] = field(default_factory=list)
    real_side: PerturbationSide | None = None
    sides: dict[str, PerturbationSide] = field(default_factory=dict)
    seed: int = 0

    def add(self, method: str, condition: str, family: str, values: dict[str, float], better: dict[str, str]):
        ctx, pert = self.inputs.conditions.get(condition, (None, None))
        for metric, value in values.items():
            self.rows.append({"method": method, "condition": condition, "context": ctx, "perturbation": pert,
                              "family": family, "metric": metric, "value": float(value),
                              "better": better.get(metric, "")})


def _read(obj, what: str):
    if obj is None or not isinstance(obj, (str, Path)):
        return obj
    from ..io import read_cells

    log.info("reading %s cells from %s", what, obj)
    return read_cells(obj)


def _check_out_dir(out_dir, overwrite: bool) -> Path | None:
    if out_dir is None:
        return None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LingshuError(f"--out {out} is a file; give a directory")
    present = [n for n in OUTPUTS if (out / n).exists()]
    if present and not overwrite:
        raise LingshuError(f"{out} already holds a report ({', '.join(present)}); "
                           "pass --overwrite or choose another --out")
    return out


def _baselines(ev: EvalInputs, names: list[str], seed: int) -> dict[str, tuple[object, object]]:
    out = {}
    perturbations = sorted({p for _, p in ev.conditions.values()})
    for name in names:
        if name == "half_split":
            continue
        try:
            sim = make_baseline(name, ev.control, perturbations=perturbations, perturbation_key=ev.perturbation_key,
                                context_key=ev.context_key, train=ev.train, control_label=ev.control_label,
                                holdout=ev.train_is_real, seed=seed)
        except LingshuError as err:
            ev.note(f"baseline {name} skipped: {err}")
            continue
        skipped = sim.uns["lingshu"]["skipped"]
        wanted = [s for s in skipped if s in ev.conditions]
        if wanted:
            ev.note(f"baseline {name}: no prediction for {len(wanted)} condition(s) (NaN): {', '.join(wanted[:10])}")
        if sim.n_obs == 0:
            continue
        _tag(sim, ev.perturbation_key, ev.context_key)
        out[name] = (sim, ev.control)
    return out


def _side(cells, controls, conditions) -> PerturbationSide:
    """Log-normalise perturbed cells + their controls together and summarise each condition.

    Cells of conditions not evaluated are left out first, so they cannot move the median
    total count that the side is normalised to.
    """
    cells = cells[np.isin(cells.obs[COND].to_numpy(), list(conditions))]
    x_log = log_normalize(sp.vstack([cells.X, controls.X]).tocsr())
    cond = cells.obs[COND].to_numpy()
    ctrl_ctx = controls.obs[CTX].to_numpy()
    groups, ctrls = {}, {}
    for c, (ctx, _) in conditions.items():
        idx = np.flatnonzero(cond == c)
        ctrl = cells.n_obs + np.flatnonzero(ctrl_ctx == (ctx or ""))
        if idx.size and ctrl.size:
            groups[c], ctrls[c] = idx, ctrl
    return summarize_side(x_log, groups, ctrls)


def _halves(cells, seed: int):
    """Row indices of the two halves of ``cells``, split within each condition (and context)."""
    key = cells.obs[COND].astype(str).to_numpy() + "|" + cells.obs[CTX].astype(str).to_numpy()
    return half_split(cells.n_obs, key, seed) if cells.n_obs >= 4 else (np.arange(0), np.arange(0))


def _perturbation_metrics(e: Evaluation, names: list[str]) -> None:
    ev = e.inputs
    targets = {c: p for c, (_, p) in ev.conditions.items()}
    e.real_side = _side(ev.real, ev.control, ev.conditions)
    tables = {}
    for name, (cells, ctrls) in e.methods.items():
        e.sides[name] = _side(cells, ctrls, ev.conditions)
        tables[name] = perturbation_scores(e.real_side, e.sides[name], ev.genes, targets)
    if "half_split" in names:
        (ra, rb), (ca, cb) = _halves(ev.real, e.seed), _halves(ev.control, e.seed)
        if ra.size and ca.size:
            half_real = _side(ev.real[ra], ev.control[ca], ev.conditions)
            half_pred = _side(ev.real[rb], ev.control[cb], ev.conditions)
            tables["half_split"] = perturbation_scores(half_real, half_pred, ev.genes, targets)
        else:
            ev.note("half_split: too few real or control cells to split (need 4 of each)")
    for name, table in tables.items():
        for cond, row in table.drop(columns="spearman_deg").iterrows():
            e.add(name, cond, "perturbation", row.to_dict(), PERTURBATION_METRICS)
        e.add(name, "all", "perturbation", {"spearman_deg": table["spearman_deg"].iloc[0]}, PERTURBATION_METRICS)
    reference = "pert_mean" if "pert_mean" in tables else ("control" if "control" in tables else None)
    if reference is None:
        return
    base = tables[reference].mean(numeric_only=True).to_dict()
    for name, table in tables.items():
        if name == reference:
            continue
        gains, _ = relative_gain(table.mean(numeric_only=True).to_dict(), base, metrics=list(PERTURBATION_METRICS))
        vcc = float(np.mean([gains[m] for m in VCC_METRICS]))
        values = {f"relative_gain_{m}": g for m, g in gains.items()} | {"avg_relative_gain": vcc}
        e.add(name, "all", "score", values, {k: "higher" for k in values})
    e.inputs.notes.append(f"relative gains are over the {reference} baseline; avg_relative_gain averages "
                          f"{', '.join(VCC_METRICS)} (the Virtual Cell Challenge score)")


def _compare(real, sim, genes, opts, labels=None) -> dict[str, float]:
    """:func:`lingshu.metrics.compare`, or NaN for every metric when a side has fewer than 2 cells."""
    if real.n_obs < 2 or sim.n_obs < 2:
        return {m: np.nan for m in DISTRIBUTION_METRICS}
    lab = {} if labels is None else {"real_labels": labels[0], "sim_labels": labels[1]}
    return compare(sp.csr_matrix(real.X), sp.csr_matrix(sim.X), genes, **lab, **opts)


def _equal_cells(methods: dict, ev: EvalInputs, seed: int) -> dict:
    """Every method's simulated cells cut to the same number per condition: the fewest any method has.

    MMD and energy distance are V-statistics whose value grows as samples shrink (for two samples
    of one distribution, by about ``1/n + 1/m`` times a constant), and a classifier's AUC is
    noisier on fewer cells; a model simulating 4 cells per source cell would otherwise be scored
    on 4x the cells of the baselines (one per source). Cells are drawn without replacement, seeded.
    """
    names = [k for k, v in methods.items() if v is not None]
    if len(names) < 2:
        return methods
    rng = np.random.default_rng([seed, 8191])
    labels = {k: methods[k].obs[COND].to_numpy() for k in names}
    keep = {k: [] for k in names}
    cut = 0
    for c in ev.conditions:
        idx = {k: np.flatnonzero(labels[k] == c) for k in names}
        sizes = [len(i) for i in idx.values() if len(i)]
        n = min(sizes) if sizes else 0
        for k, i in idx.items():
            if len(i) > n:
                i, cut = np.sort(rng.choice(i, n, replace=False)), cut + 1
            keep[k].append(i)
    if cut:
        msg = ("distribution metrics: each method scored on as many simulated cells per condition as the method "
               "with the fewest (randomly chosen; MMD and energy distance depend on sample size)")
        log.info(msg)
        ev.notes.append(msg)
    return methods | {k: methods[k][np.sort(np.concatenate(keep[k]))] for k in names}


def _distribution_metrics(e: Evaluation, names: list[str], opts: dict, per_condition: bool,
                          equal_cells: bool = True) -> None:
    ev = e.inputs
    conds = (list(ev.conditions) if per_condition else []) + ["all"]
    methods = {k: v[0] for k, v in e.methods.items()}
    if equal_cells and ev.perturbation_key:
        methods = _equal_cells(methods, ev, e.seed)
    if "half_split" in names:
        first, second = _halves(ev.real, e.seed)
        if first.size:
            methods["half_split"] = None
    for cond in conds:
        for name, cells in methods.items():
            if name == "half_split":
                ref, sim = ev.real[first], ev.real[second]
            else:
                ref, sim = ev.real, cells
                if ev.perturbation_key:  # only the conditions real has
                    sim = cells[np.isin(cells.obs[COND].to_numpy(), list(ev.conditions))]
            if cond != "all":
                ref, sim = ref[ref.obs[COND].to_numpy() == cond], sim[sim.obs[COND].to_numpy() == cond]
            labels = None
            if cond == "all" and ev.context_key:
                labels = (ref.obs[CTX].to_numpy().astype(str), sim.obs[CTX].to_numpy().astype(str))
            try:
                values = _compare(ref, sim, ev.genes, opts, labels)
            except LingshuError as err:  # e.g. too few cells for a PCA
                log.info("distribution metrics of %s on %s: %s", name, cond, err)
                values = {m: np.nan for m in DISTRIBUTION_METRICS}
            e.add(name, cond, "distribution", values, DISTRIBUTION_METRICS)


def evaluate(pred, real, *, control=None, perturbation_key: str | None = None, control_label: str | None = None,
             context_key: str | None = None, baselines=("control", "pert_mean", "additive", "half_split"),
             train=None, distribution: str = "full", out_dir=None, overwrite: bool = False, plots: bool = True,
             embedding: str = "umap", seed: int = 0, n_pcs: int = 50,
             max_cells: int | None = MAX_CELLS, equal_cells: bool = True) -> pd.DataFrame:
    """Score simulated cells against real ones, beside simple baselines and the real-data ceiling.

    Two families of metrics, every one computed for the prediction (``model``), for each
    baseline and for ``half_split`` (one random half of the real cells scored against the
    other: what a perfect simulator would get at half the cells, i.e. the ceiling):

    * distribution metrics (:func:`lingshu.metrics.compare`: MMD, energy distance, per-gene
      Wasserstein, gene mean/variance correlations, zero fraction, library size, classifier
      AUC, iLISI; with ``context_key`` also cell-type accuracy, proportions and markers on
      ``"all"``) for each condition and for all perturbed cells pooled (condition ``"all"``);
    * with ``perturbation_key``, the Virtual Cell Challenge metrics of cell-eval 0.8.2 for
      each condition (:mod:`lingshu.evaluate.perturbation`: ``pds``, ``des``, ``mae``,
      ``pearson_delta``, ``spearman_lfc``, ``auprc``; ``spearman_deg`` once on ``"all"``),
      and the relative gain of every method over the ``pert_mean`` baseline (``score``
      rows; ``avg_relative_gain`` averages PDS, DES and MAE as the challenge did).

    A *condition* is one perturbation label within one context (``"B/stimulated"``), or the
    context alone when there is no perturbation key. Effects are always measured against the
    control cells of the same context: the real controls for the real cells and the
    baselines, and the prediction's own control-labelled cells when it has any.

    Parameters
    ----------
    pred
        Simulated cells (AnnData or path), e.g. ``lingshu simulate`` output; raw counts.
    real
        Real cells of the same conditions (held out from training for an honest score).
    control
        Real control cells (AnnData or path). Default: the ``real`` cells labelled
        ``control_label``. All its cells count as controls.
    perturbation_key
        obs column with the perturbation; without it only distribution metrics are computed.
    control_label
        The control label of ``perturbation_key``; guessed from common names when not given.
    context_key
        obs column with the context (e.g. cell type), present in ``pred`` and ``real``.
    baselines
        Any of ``"control"``, ``"pert_mean"``, ``"additive"`` (see
        :mod:`lingshu.evaluate.baselines`) and ``"half_split"``.
    train
        Cells the ``pert_mean`` and ``additive`` baselines learn from (with control cells).
        Default: the real and control cells themselves, with every condition learned
        without its own cells (so ``additive`` needs contexts, and is skipped without them).
    distribution
        ``"full"``: distribution metrics for every condition and for all cells pooled;
        ``"pooled"``: only pooled (much faster with many conditions); ``"none"``: skip them.
    out_dir
        If given, write ``metrics.csv``, ``summary.md`` and (``plots=True``) PNG plots here.
    overwrite
        Replace an earlier report in ``out_dir``.
    embedding
        ``"umap"`` or ``"pca"``: the 2-D view of the embedding plot.
    seed
        Seed of the half split, the baselines' rounding, PCA, classifiers and subsampling.
    n_pcs, max_cells
        Passed to :func:`lingshu.metrics.compare`.
    equal_cells
        Score the distribution metrics of the prediction and of every baseline on the same
        number of simulated cells per condition (the fewest any of them has; the baselines
        make one cell per control cell). ``False``: each on all its cells. MMD and energy
        distance shrink as samples grow, so unequal sizes favour the larger one.
        ``half_split`` always compares two halves of the real cells.

    Returns
    -------
    Long DataFrame, one row per method x condition x metric, with columns ``method``,
    ``condition``, ``context``, ``perturbation``, ``family`` (``perturbation``,
    ``distribution`` or ``score``), ``metric``, ``value`` and ``better``. ``attrs["notes"]``
    lists what was skipped or dropped and why.
    """
    if distribution not in ("full", "pooled", "none"):
        raise LingshuError(f"distribution must be 'full', 'pooled' or 'none', got {distribution!r}")
    if embedding not in ("umap", "pca"):
        raise LingshuError(f"embedding must be 'umap' or 'pca', got {embedding!r}")
    if distribution == "none" and not perturbation_key:
        raise LingshuError("nothing to compute: without a perturbation key only distribution metrics apply")
    names = list(dict.fromkeys(baselines or ()))
    unknown = [n for n in names if n not in METHODS or n == "model"]
    if unknown:
        raise LingshuError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(METHODS[1:])}")
    out = _check_out_dir(out_dir, overwrite)
    pred, real, control, train = (_read(pred, "pred"), _read(real, "real"), _read(control, "control"),
                                  _read(train, "train"))
    ev = prepare_inputs(pred, real, control=control, train=train, perturbation_key=perturbation_key,
                        control_label=control_label, context_key=context_key)
    methods = {"model": (ev.pred, ev.pred_control)}
    if perturbation_key:
        methods |= _baselines(ev, names, seed)
    elif any(n != "half_split" for n in names):
        ev.note("the control, pert_mean and additive baselines need a perturbation key; only half_split is reported")
    e = Evaluation(inputs=ev, methods=methods, seed=seed)
    if perturbation_key:
        _perturbation_metrics(e, names)
    if distribution != "none":
        opts = {"n_pcs": n_pcs, "seed": seed, "max_cells": max_cells}
        _distribution_metrics(e, names, opts, per_condition=distribution == "full", equal_cells=equal_cells)
    report = pd.DataFrame(e.rows, columns=COLUMNS)
    report.attrs["notes"] = list(ev.notes)
    if out is not None:
        from .summary import write_report

        write_report(e, report, out, plots=plots, embedding=embedding)
    return report
