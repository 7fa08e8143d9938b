"""``lingshu evaluate``: score simulated cells beside baselines and the real-data ceiling."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, friendly, setup

BASELINES = ("control", "pert_mean", "additive", "half_split")


@friendly
def evaluate(
    pred: Annotated[Path, typer.Option(
        "--pred", help="Simulated cells (.h5ad, .h5, .h5mu), e.g. lingshu simulate output.")],
    real: Annotated[Path, typer.Option("--real", help="Real cells of the same conditions (held out from training).")],
    out: Annotated[Path, typer.Option("--out", help="Report directory: metrics.csv, summary.md, PNG plots.")],
    control: Annotated[Path | None, typer.Option(
        "--control", help="Real control cells (default: the --real cells labelled --control-label).")] = None,
    perturbation_key: Annotated[str | None, typer.Option(
        "--perturbation-key", help="obs column naming the perturbation, e.g. condition.")] = None,
    control_label: Annotated[str | None, typer.Option(
        "--control-label", help="The control label of --perturbation-key (default: guessed, e.g. control).")] = None,
    context_key: Annotated[str | None, typer.Option(
        "--context-key", help="obs column with the context, e.g. cell_type.")] = None,
    train: Annotated[Path | None, typer.Option(
        "--train", help="Training cells the pert_mean and additive baselines learn from (default: --real).")] = None,
    baseline: Annotated[list[str] | None, typer.Option(
        "--baseline", metavar="NAME",
        help="Baseline to report (repeatable): control, pert_mean, additive, half_split (default: all).")] = None,
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Score the prediction alone.")] = False,
    distribution: Annotated[str, typer.Option(
        "--distribution", help="Distribution metrics: full (per condition and pooled), pooled or none.")] = "full",
    embedding: Annotated[str, typer.Option("--embedding", help="2-D view for the plot: umap or pca.")] = "umap",
    equal_cells: Annotated[bool, typer.Option(
        "--equal-cells/--all-cells",
        help="Distribution metrics on the same number of cells per condition for the prediction and every "
             "baseline (the fewest any has), or on all cells of each.")] = True,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same result.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier report in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
) -> None:
    """Score simulated cells against real ones, beside baselines and a half-split ceiling."""
    from lingshu.errors import LingshuError
    from lingshu.evaluate import evaluate as run_evaluate
    from lingshu.evaluate.report import _check_out_dir
    from lingshu.evaluate.summary import summary_table

    setup(quiet)
    if no_baselines and baseline:
        raise LingshuError("give --baseline or --no-baselines, not both")
    names = [] if no_baselines else list(baseline or BASELINES)
    for name in names:
        if name not in BASELINES:
            raise LingshuError(f"unknown --baseline {name!r}; choose from {', '.join(BASELINES)}")
    _check_out_dir(out, overwrite)  # before reading possibly large files
    report = run_evaluate(pred, real, control=control, perturbation_key=perturbation_key, control_label=control_label,
                          context_key=context_key, baselines=names, train=train, distribution=distribution,
                          out_dir=out, overwrite=overwrite, plots=plots, embedding=embedding, seed=seed,
                          equal_cells=equal_cells)
    family = "perturbation" if (report["family"] == "perturbation").any() else "distribution"
    table = summary_table(report, family, None if family == "perturbation" else "all")
    if not quiet:
        console.print(table.to_string(float_format=lambda v: f"{v:.4g}"), markup=False, highlight=False)
    console.print(f"wrote {out / 'metrics.csv'} ({len(report):,} rows) and {out / 'summary.md'}",
                  markup=False, highlight=False)
