"""Lingshu's perturbation metrics equal cell-eval 0.8.2's on the same prediction/real pair.

Needs the optional ``eval`` extra (``pip install 'lingshu[eval]'``) and the shared data
folder; skips cleanly without them. The pair is drawn from the Papalexi 2021 CRISPR screen:
six perturbations (three whose target gene is measured, so PDS must leave it out; one, CD86,
with no real DE gene, so the NaN and 0 conventions are exercised), and a prediction made
of *other* cells of the same perturbations, with two perturbations' labels swapped so that
the scores are far from perfect.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

cell_eval = pytest.importorskip("cell_eval", reason="cell-eval not installed (pip install 'lingshu[eval]')")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "papalexi2021_eccite_thp1_sceptre_subset.h5ad"
PERTS = ["IFNGR2", "JAK2", "STAT1", "IRF1", "CD86", "CUL3"]
CONTROL = "non-targeting"
# cell-eval column -> Lingshu metric
NAMES = {"discrimination_score_l1": "pds", "overlap_at_N": "des", "mae": "mae", "pearson_delta": "pearson_delta",
         "de_spearman_sig": "spearman_deg", "de_spearman_lfc_sig": "spearman_lfc", "pr_auc": "auprc"}

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture(scope="module")
def pair():
    import anndata as ad

    if not DATA.exists():
        pytest.skip(f"shared data not found: {DATA}")
    adata = ad.read_h5ad(DATA)
    rng = np.random.default_rng(0)
    real_idx, pred_idx = [], []
    for p in [CONTROL, *PERTS]:
        idx = rng.permutation(np.flatnonzero(adata.obs["target_gene"] == p))
        n = 300 if p == CONTROL else 120
        real_idx.append(idx[:n])
        pred_idx.append(idx[n:2 * n])
    real = adata[np.concatenate(real_idx)].copy()
    pred = adata[np.concatenate(pred_idx)].copy()
    for a in (real, pred):
        a.obs = pd.DataFrame({"target_gene": a.obs["target_gene"].astype(str).to_numpy()}, index=a.obs_names)
    swap = {"JAK2": "IRF1", "IRF1": "JAK2"}
    pred.obs["target_gene"] = pred.obs["target_gene"].map(lambda p: swap.get(p, p))
    return real, pred


def cell_eval_scores(pred, real, outdir) -> pd.DataFrame:
    """Per-perturbation scores of cell-eval's MetricsEvaluator, renamed to Lingshu's metric names."""
    from cell_eval import MetricsEvaluator

    logging.getLogger("cell_eval").setLevel(logging.ERROR)
    ev = MetricsEvaluator(pred.copy(), real.copy(), control_pert=CONTROL, pert_col="target_gene", num_threads=1,
                          outdir=str(outdir))
    skip = ["clustering_agreement", "pearson_edistance"]
    results, _ = ev.compute(profile="full", skip_metrics=skip, write_csv=False)
    frame = results.to_pandas().set_index("perturbation")
    return frame[list(NAMES)].rename(columns=NAMES).astype(float)


def lingshu_scores(report: pd.DataFrame, method: str) -> pd.DataFrame:
    rows = report[(report["method"] == method) & (report["family"] == "perturbation")]
    table = rows[rows["condition"] != "all"].pivot(index="condition", columns="metric", values="value")
    deg = rows.loc[rows["metric"] == "spearman_deg", "value"].iloc[0]
    table["spearman_deg"] = deg
    return table


def assert_same(mine: pd.DataFrame, theirs: pd.DataFrame) -> None:
    assert sorted(mine.index) == sorted(theirs.index)
    for metric in NAMES.values():
        a = mine.loc[theirs.index, metric].to_numpy(float)
        b = theirs[metric].to_numpy(float)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=metric)
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=1e-6, atol=1e-7, err_msg=metric)


def test_model_and_baseline_match_cell_eval(pair, tmp_path):
    import anndata as ad
    import polars as pl
    from cell_eval import score_agg_metrics

    from lingshu.evaluate import evaluate, make_baseline

    real, pred = pair
    report = evaluate(pred, real, perturbation_key="target_gene", control_label=CONTROL,
                      baselines=("pert_mean",), distribution="none", seed=0)
    mine = lingshu_scores(report, "model")
    theirs = cell_eval_scores(pred, real, tmp_path / "model")
    assert_same(mine, theirs)
    # the case is informative: PDS below 1 for the swapped pair, CD86 without real DE genes
    assert mine.loc["JAK2", "pds"] < 1 and mine.loc["STAT1", "pds"] == 1
    assert mine.loc["CD86", "des"] == 0 and np.isnan(mine.loc["CD86", "spearman_lfc"])

    # the pert_mean baseline, rebuilt exactly as evaluate() builds it, scored by cell-eval
    is_ctrl = (real.obs["target_gene"] == CONTROL).to_numpy()
    control, train = real[is_ctrl].copy(), ad.concat([real[~is_ctrl], real[is_ctrl]])
    base = make_baseline("pert_mean", control, perturbations=PERTS, perturbation_key="target_gene", train=train,
                         control_label=CONTROL, holdout=True, seed=0)
    base_full = ad.concat([base, control])
    base_full.obs = base_full.obs[["target_gene"]]
    theirs_base = cell_eval_scores(base_full, real, tmp_path / "base")
    assert_same(lingshu_scores(report, "pert_mean"), theirs_base)

    # average relative gain over the baseline: cell-eval's score on the same per-metric means
    vcc = {"discrimination_score_l1": "pds", "overlap_at_N": "des", "mae": "mae"}

    def agg(frame: pd.DataFrame) -> pl.DataFrame:
        means = frame[list(vcc.values())].mean()
        return pl.DataFrame({"statistic": ["mean"], **{k: [float(means[v])] for k, v in vcc.items()}})

    expected = score_agg_metrics(agg(theirs), agg(theirs_base)).to_pandas().set_index("metric")["from_baseline"]
    gains = report[(report["method"] == "model") & (report["family"] == "score")].set_index("metric")["value"]
    assert gains["avg_relative_gain"] == pytest.approx(expected["avg_score"], rel=1e-6, abs=1e-9)
    for theirs_name, name in vcc.items():
        assert gains[f"relative_gain_{name}"] == pytest.approx(expected[theirs_name], rel=1e-6, abs=1e-9)
