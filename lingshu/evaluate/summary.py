"""Writing an evaluation to disk: ``metrics.csv``, ``summary.md`` and the plots."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics import METRICS as DISTRIBUTION_METRICS
from .perturbation import PERTURBATION_METRICS

__all__ = ["write_report", "summary_table", "format_summary"]

log = logging.getLogger("lingshu.evaluate")

ORDER = ("model", "control", "pert_mean", "additive", "half_split")
PER_CONDITION = ("pds", "des", "pearson_delta", "mae", "energy_distance", "mmd")
SYMBOL = {"higher": "↑", "lower": "↓", "closer to 1": "→1"}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.4g}"


def summary_table(report: pd.DataFrame, family: str, condition: str | None = None) -> pd.DataFrame:
    """Metric x method table: the value on ``condition``, or the mean over conditions when None.

    The mean skips NaN and the ``"all"`` rows; a metric only stored on ``"all"`` (``spearman_deg``,
    the scores) is shown as is.
    """
    rows = report[report["family"] == family]
    if condition is not None:
        rows = rows[rows["condition"] == condition]
    else:
        per = rows[rows["condition"] != "all"]
        rows = pd.concat([per, rows[(rows["condition"] == "all") & ~rows["metric"].isin(per["metric"])]])
    table = rows.pivot_table(index="metric", columns="method", values="value", aggfunc="mean", dropna=False,
                             sort=False)
    methods = [m for m in ORDER if m in table.columns] + [m for m in table.columns if m not in ORDER]
    return table[methods]


def _markdown(table: pd.DataFrame, better: dict[str, str], label: str) -> list[str]:
    cols = list(table.columns)
    head = [label, *[("half_split (ceiling)" if c == "half_split" else c) for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, row in table.iterrows():
        direction = better.get(metric, "higher" if "relative_gain" in str(metric) else "")
        contenders = {c: row[c] for c in cols if c != "half_split" and pd.notna(row[c])}
        best = None
        if contenders and direction in ("higher", "lower", "closer to 1") and len(contenders) > 1:
            key = {"higher": lambda c: -contenders[c], "lower": lambda c: contenders[c],
                   "closer to 1": lambda c: abs(contenders[c] - 1)}[direction]
            best = min(contenders, key=key)
        cells = [f"**{_fmt(row[c])}**" if c == best else _fmt(row[c]) for c in cols]
        lines.append(f"| {metric} {SYMBOL.get(direction, '')} | " + " | ".join(cells) + " |")
    return lines


def _per_condition(report: pd.DataFrame) -> list[str]:
    rows = report[(report["method"] == "model") & (report["condition"] != "all")]
    if rows.empty:
        return []
    table = rows.pivot_table(index="condition", columns="metric", values="value", aggfunc="first", sort=True)
    cols = [m for m in PER_CONDITION if m in table.columns]
    ceiling = report[(report["method"] == "half_split") & (report["metric"] == "pearson_delta")]
    extra = ceiling.set_index("condition")["value"] if not ceiling.empty else None
    head = ["condition", *cols] + (["pearson_delta ceiling"] if extra is not None else [])
    lines = ["## Per condition (model)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cond, row in table.iterrows():
        cells = [_fmt(row[c]) for c in cols] + ([_fmt(extra.get(cond))] if extra is not None else [])
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    return lines + [""]


DEFINITIONS = """## How to read this

* **model** is the prediction; **control** predicts the control cells unchanged, **pert_mean** the
  average perturbation, **additive** the context mean plus the perturbation's shift in other
  contexts; **half_split (ceiling)** scores one random half of the real cells against the other,
  what a perfect simulator would reach (at half the cells, so a slightly pessimistic ceiling).
  The best of model and baselines is in bold. A model that does not beat the baselines has not
  learned the perturbation.
* Perturbation metrics follow cell-eval 0.8.2 (Virtual Cell Challenge), on log1p of counts scaled to
  each side's median total: **pds** perturbation discrimination score (signed L1 effects, target
  gene excluded; 1 best, about 0.5 chance), **des** overlap of the top DE genes (Mann-Whitney U,
  Benjamini-Hochberg FDR < 0.05, ranked by |log2 fold change|), **mae** of pseudobulk means,
  **pearson_delta** correlation of the effects (mean minus control mean), **spearman_deg**
  Spearman of DE gene counts across conditions, **spearman_lfc** Spearman of fold changes on the
  real DE genes, **auprc** recovery of the real DE genes from predicted FDRs. **avg_relative_gain**
  averages the gains of PDS, DES and MAE over the reference baseline (0 = no better).
* Distribution metrics (lingshu.metrics) compare cells on log1p(CP10k) and a joint PCA: lower **mmd**,
  **energy_distance**, **mean_wasserstein**, **classifier_auc** (0.5 ideal) is better; higher
  correlations and **ilisi** (1 ideal) are better.
"""


def format_summary(e, report: pd.DataFrame, plots: list[str]) -> str:
    """The ``summary.md`` text."""
    ev = e.inputs
    lines = ["# Lingshu evaluation", ""]
    facts = [f"real: {ev.real.n_obs:,} cells", f"pred: {ev.pred.n_obs:,} cells", f"{len(ev.genes):,} genes"]
    if ev.perturbation_key:
        facts += [f"{ev.control.n_obs:,} control cells ({ev.perturbation_key} = {ev.control_label!r})",
                  f"{len(ev.conditions)} condition(s)"]
    if ev.context_key:
        facts.append(f"context: {ev.context_key}")
    lines += ["; ".join(facts) + ".", ""]
    better = PERTURBATION_METRICS | DISTRIBUTION_METRICS
    if (report["family"] == "perturbation").any():
        score = summary_table(report, "score")
        table = pd.concat([summary_table(report, "perturbation"), score.loc[score.index == "avg_relative_gain"]])
        lines += [f"## Perturbation metrics (mean over {len(ev.conditions)} condition(s))", ""]
        lines += _markdown(table, better, "metric") + [""]
    dist = summary_table(report, "distribution", "all")
    if not dist.empty:
        what = "all perturbed cells pooled" if ev.perturbation_key else "all cells"
        lines += [f"## Distribution metrics ({what})", ""] + _markdown(dist, better, "metric") + [""]
    lines += _per_condition(report)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if ev.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in ev.notes] + [""]
    lines.append(DEFINITIONS)
    return "\n".join(lines)


def write_report(e, report: pd.DataFrame, out: Path, *, plots: bool = True, embedding: str = "umap") -> None:
    """Write ``metrics.csv``, the plots and ``summary.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".metrics.csv.tmp-{os.getpid()}"
    try:
        report.to_csv(tmp, index=False)
        os.replace(tmp, out / "metrics.csv")
    finally:
        tmp.unlink(missing_ok=True)
    written = []
    if plots:
        from .plots import write_plots

        written = write_plots(e, out, embedding=embedding)
    _write_text(out / "summary.md", format_summary(e, report, written))
    log.info("wrote %s (metrics.csv, summary.md%s)", out, ", " + ", ".join(written) if written else "")
