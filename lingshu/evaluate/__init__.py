"""Evaluate simulated cells: distribution and perturbation metrics, baselines, ceilings, plots.

Start with :func:`evaluate` (``lingshu evaluate`` on the command line). The perturbation
metrics (:mod:`lingshu.evaluate.perturbation`) follow cell-eval 0.8.2 definition by
definition; the baselines (:func:`make_baseline`) write AnnData in ``lingshu simulate``
format so one code path scores everything.
"""

from __future__ import annotations

from .baselines import BASELINES, make_baseline
from .perturbation import (PERTURBATION_METRICS, VCC_METRICS, DETable, auprc, de_overlap, differential_expression,
                           discrimination_scores, log_normalize, mann_whitney_u, mean_absolute_error, pearson_delta,
                           perturbation_scores, relative_gain, spearman_deg, spearman_lfc, summarize_side)
from .report import COLUMNS, METHODS, evaluate

__all__ = [
    "evaluate",
    "make_baseline",
    "BASELINES",
    "METHODS",
    "COLUMNS",
    "PERTURBATION_METRICS",
    "VCC_METRICS",
    "log_normalize",
    "differential_expression",
    "mann_whitney_u",
    "DETable",
    "summarize_side",
    "perturbation_scores",
    "discrimination_scores",
    "de_overlap",
    "pearson_delta",
    "mean_absolute_error",
    "spearman_deg",
    "spearman_lfc",
    "auprc",
    "relative_gain",
]
