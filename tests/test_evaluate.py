"""``lingshu.evaluate`` and ``lingshu evaluate`` on real data (Kang 2018 IFN-beta PBMCs).

Each metric is checked where its value is known: an identical prediction scores perfectly,
shuffled labels score at chance, a deliberately shifted prediction ranks below the true
one. Bad input ends in a one-line LingshuError or a documented NaN, never a crash. Skips
when the shared data folder is absent.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from lingshu.datasets import shared_data_path
from lingshu.errors import LingshuError
from lingshu.evaluate import (DETable, auprc, discrimination_scores, evaluate, log_normalize, make_baseline,
                              pearson_delta, summarize_side)

KANG_FILE = "kang2018_ifnb_pbmc_scgen_valid.h5ad"
KANG = shared_data_path(KANG_FILE)  # $LINGSHU_DATA_DIR, else ../shared/data
FAST = {"perturbation_key": "condition", "context_key": "cell_type", "distribution": "pooled", "plots": False}

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def kang() -> ad.AnnData:
    """All 1,975 cells, the 300 genes with most counts; obs: cell_type, condition."""
    if KANG is None:
        pytest.skip(f"shared data not found: {KANG_FILE} (set LINGSHU_DATA_DIR, or put ../shared/data beside the repository)")
    a = ad.read_h5ad(KANG)
    top = np.sort(np.argsort(-np.asarray(a.X.sum(axis=0)).ravel())[:300])
    a = a[:, top].copy()
    a.obs = a.obs[["cell_type", "condition"]].astype(str)
    return a


def values(report: pd.DataFrame, method: str = "model", family: str | None = None, condition=None) -> pd.DataFrame:
    rows = report[report["method"] == method]
    if family:
        rows = rows[rows["family"] == family]
    if condition:
        rows = rows[rows["condition"] == condition]
    return rows


def mean_of(report, metric, method="model") -> float:
    rows = report[(report["method"] == method) & (report["metric"] == metric)]
    return float(rows["value"].mean())


def halves(adata, seed=0):
    """Two halves of the cells, split within every cell type x condition."""
    rng = np.random.default_rng(seed)
    first = np.zeros(adata.n_obs, dtype=bool)
    for _, idx in adata.obs.groupby(["cell_type", "condition"], observed=True).indices.items():
        first[rng.permutation(idx)[: len(idx) // 2]] = True
    return adata[first].copy(), adata[~first].copy()


def test_identical_prediction_scores_perfectly(kang):
    report = evaluate(kang, kang, baselines=(), **FAST)
    per = values(report, family="perturbation")
    for metric, perfect in {"pds": 1.0, "des": 1.0, "mae": 0.0, "pearson_delta": 1.0, "spearman_lfc": 1.0,
                            "auprc": 1.0, "spearman_deg": 1.0}.items():
        got = per.loc[per["metric"] == metric, "value"].to_numpy()
        assert len(got) and np.allclose(got, perfect, atol=1e-6), (metric, got)
    dist = values(report, family="distribution", condition="all").set_index("metric")["value"]
    for metric, perfect in {"mmd": 0.0, "energy_distance": 0.0, "mean_wasserstein": 0.0, "pearson_mean": 1.0,
                            "zero_fraction_mae": 0.0, "library_size_ks": 0.0, "marker_overlap": 1.0}.items():
        assert dist[metric] == pytest.approx(perfect, abs=1e-6), metric
    assert dist["classifier_auc"] <= 0.5  # exact copies cannot be told apart


def test_distribution_metrics_compare_equal_numbers_of_cells(kang):
    """A prediction with 4 cells per source is scored on as many cells as the baselines (one per source)."""
    real = kang[kang.obs["cell_type"].isin(["B", "NK"]).to_numpy()].copy()
    stim = real[(real.obs["condition"] == "stimulated").to_numpy()]
    pred = ad.concat([stim] * 4, index_unique="-")  # the true cells, each 4 times
    kw = FAST | {"baselines": ["control"]}
    every, equal = evaluate(pred, real, equal_cells=False, **kw), evaluate(pred, real, **kw)

    def dist(report, method="model"):
        return values(report, method, family="distribution", condition="all").set_index("metric")["value"]

    assert dist(every)["energy_distance"] == pytest.approx(0.0, abs=1e-6)  # 4 x the truth: the same distribution
    assert dist(equal)["energy_distance"] > 0.05  # cut to the control baseline's cell count: some repeated, some not
    assert dist(equal, "control").equals(dist(every, "control"))  # the baseline with the fewest is not cut
    assert any("fewest" in n for n in equal.attrs["notes"]) and not any("fewest" in n for n in every.attrs["notes"])


def test_shuffled_labels_score_at_chance(kang):
    is_ctrl = (kang.obs["condition"] == "control").to_numpy()
    x = log_normalize(kang.X)
    cond = kang.obs["cell_type"].to_numpy()
    groups = {c: np.flatnonzero(~is_ctrl & (cond == c)) for c in sorted(set(cond))}
    controls = {c: np.flatnonzero(is_ctrl & (cond == c)) for c in groups}
    side = summarize_side(x, groups, controls)
    conds = list(groups)
    eff = np.vstack([side.means[c] - side.control_means[c] for c in conds])  # (K, G)
    k = len(conds)
    targets = ["stimulated"] * k
    assert np.all(discrimination_scores(eff, eff, kang.var_names, targets) == 1.0)
    # every cyclic relabelling of the predictions: each condition meets every effect once -> exact chance
    cyclic = [discrimination_scores(eff, np.roll(eff, s, axis=0), kang.var_names, targets).mean() for s in range(k)]
    assert np.mean(cyclic) == pytest.approx(0.5 + 1 / (2 * k), abs=1e-12)
    # gene labels shuffled: no correlation, AUPRC at the share of DE genes
    rng = np.random.default_rng(0)
    de = side.de["CD14+Mono"]
    prevalence = de.significant.mean()
    assert 0.05 < prevalence < 0.95
    shuffled = [rng.permutation(x.shape[1]) for _ in range(100)]
    ap = [auprc(de, DETable(lfc=de.lfc[p], pvalue=de.pvalue[p], fdr=de.fdr[p])) for p in shuffled]
    assert np.mean(ap) == pytest.approx(prevalence, abs=0.03)
    r = [pearson_delta(eff[1], eff[1][p]) for p in shuffled]
    assert abs(np.mean(r)) < 0.03
    assert auprc(de, de) == pytest.approx(1.0)


def test_shifted_prediction_ranks_below_true(kang):
    ref, other = halves(kang)
    true = other[other.obs["condition"] != "control"].copy()  # effects measured against ref's controls
    shifted = true.copy()
    genes = np.random.default_rng(1).choice(kang.n_vars, size=60, replace=False)
    x = shifted.X.toarray()
    x[:, genes] = np.round(x[:, genes] * 3.0)
    shifted.X = sp.csr_matrix(x)
    good = evaluate(true, ref, baselines=("control", "half_split"), seed=0, **FAST)
    bad = evaluate(shifted, ref, baselines=(), seed=0, **FAST)
    for metric in ("des", "pearson_delta", "spearman_lfc", "auprc", "pearson_mean", "ilisi"):
        assert mean_of(good, metric) > mean_of(bad, metric), metric
    for metric in ("mae", "mmd", "energy_distance", "mean_wasserstein", "classifier_auc"):
        assert mean_of(good, metric) < mean_of(bad, metric), metric
    assert mean_of(good, "pds") >= mean_of(bad, "pds")
    # a real half beats "nothing happens", and sits near the half-split ceiling
    assert mean_of(good, "pds") > mean_of(good, "pds", "control")
    assert mean_of(good, "des") > mean_of(good, "des", "control")
    auc = values(good, "half_split", "distribution", "all").set_index("metric")["value"]["classifier_auc"]
    assert 0.35 < auc < 0.65


def test_report_layout_and_files(kang, tmp_path):
    small = kang[kang.obs["cell_type"].isin(["B", "NK", "CD14+Mono"])].copy()
    ref, pred = halves(small)
    report = evaluate(pred, ref, perturbation_key="condition", context_key="cell_type", distribution="full",
                      out_dir=tmp_path / "rep", embedding="pca", seed=0)
    assert list(report.columns) == ["method", "condition", "context", "perturbation", "family", "metric", "value",
                                    "better"]
    assert set(report["method"]) == {"model", "control", "pert_mean", "additive", "half_split"}
    assert set(report["condition"]) == {"B/stimulated", "NK/stimulated", "CD14+Mono/stimulated", "all"}
    assert not report.duplicated(["method", "condition", "metric"]).any()
    gains = values(report, "model", "score").set_index("metric")["value"]
    assert 0.0 <= gains["avg_relative_gain"] <= 1.0
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"metrics.csv", "summary.md", "embedding.png", "gene_means.png", "lfc.png", "proportions.png"} <= files
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "half_split (ceiling)" in summary and "| pds ↑ |" in summary and "![lfc.png](lfc.png)" in summary
    assert pd.read_csv(tmp_path / "rep" / "metrics.csv").shape == report.shape
    with pytest.raises(LingshuError, match="already holds a report"):
        evaluate(pred, ref, perturbation_key="condition", out_dir=tmp_path / "rep")


def test_without_perturbation_key_only_distribution(kang):
    ref, pred = halves(kang[kang.obs["condition"] == "control"].copy())
    report = evaluate(pred, ref, context_key="cell_type", distribution="pooled", plots=False)
    assert set(report["family"]) == {"distribution"} and set(report["method"]) == {"model", "half_split"}
    assert any("need a perturbation key" in n for n in report.attrs["notes"])


def test_baselines_have_simulate_format_and_no_leak(kang):
    ctrl = kang[kang.obs["condition"] == "control"].copy()
    base = make_baseline("control", ctrl, perturbations=["stimulated"], perturbation_key="condition",
                         context_key="cell_type")
    assert isinstance(base.X, sp.csr_matrix) and base.X.dtype == np.float32
    assert list(base.obs.columns) == ["cell_type", "condition", "source_cell"]
    assert base.uns["lingshu"]["baseline"] == "control"
    src = ctrl[base.obs["source_cell"].to_numpy()]
    assert (base.X != src.X).nnz == 0 and (base.obs["cell_type"].to_numpy() == src.obs["cell_type"].to_numpy()).all()

    opts = {"perturbations": ["stimulated"], "perturbation_key": "condition", "context_key": "cell_type",
            "holdout": True, "seed": 3}
    add = make_baseline("additive", ctrl, train=kang, **opts)
    assert np.all(add.X.data == np.round(add.X.data)) and add.uns["lingshu"]["skipped"] == []
    # B's prediction never sees B's stimulated cells, but does learn from other cell types
    def louder(cell_type):
        out = kang.copy()
        m = ((out.obs["cell_type"] == cell_type) & (out.obs["condition"] == "stimulated")).to_numpy()
        x = out.X.toarray()
        x[np.ix_(m, np.arange(50))] *= 5.0  # not all genes: the log1p-CP10k scale ignores uniform factors
        out.X = sp.csr_matrix(x)
        return make_baseline("additive", ctrl, train=out, **opts)

    b = (add.obs["cell_type"] == "B").to_numpy()
    assert (add.X[b] != louder("B").X[b]).nnz == 0
    assert (add.X[b] != louder("NK").X[b]).nnz > 0


def test_pert_mean_is_mean_of_perturbed_cells_and_additive_needs_contexts(counts_adata):
    from lingshu.metrics import log_cp10k

    ctrl = counts_adata[counts_adata.obs["condition"] == "control"].copy()
    stim = counts_adata[counts_adata.obs["condition"] == "stim"]
    opts = {"perturbations": ["stim"], "perturbation_key": "condition", "train": counts_adata}
    pm = make_baseline("pert_mean", ctrl, **opts)
    got = np.asarray(log_cp10k(pm.X).mean(axis=0)).ravel()
    want = np.asarray(log_cp10k(stim.X).mean(axis=0)).ravel()
    assert np.corrcoef(got, want)[0, 1] > 0.97
    skipped = make_baseline("additive", ctrl, holdout=True, **opts)
    assert skipped.n_obs == 0 and skipped.uns["lingshu"]["skipped"] == ["stim"]
    with pytest.raises(LingshuError, match="unknown baseline"):
        make_baseline("median", ctrl, **opts)


def test_bad_input_is_refused_or_documented(kang):
    small = kang[kang.obs["cell_type"].isin(["B", "NK"])].copy()
    renamed = small.copy()
    renamed.var_names = [f"x{g}" for g in small.var_names]
    with pytest.raises(LingshuError, match="share 0 gene"):
        evaluate(renamed, small, **FAST)
    fewer = small[:, 50:].copy()
    report = evaluate(fewer, small, baselines=(), **FAST)
    assert any("shared genes" in n for n in report.attrs["notes"])

    unlabelled = small.copy()
    del unlabelled.obs["condition"]
    with pytest.raises(LingshuError, match="pred: obs column 'condition' not found"):
        evaluate(unlabelled, small, **FAST)
    partly = small.copy()
    partly.obs["condition"] = partly.obs["condition"].where(np.arange(partly.n_obs) % 10 != 0, None)
    report = evaluate(small, partly, baselines=(), **FAST)
    assert any("without a condition/cell_type label" in n for n in report.attrs["notes"])

    stim_only = small[small.obs["condition"] == "stimulated"].copy()
    with pytest.raises(LingshuError, match="no control cells"):
        evaluate(small, stim_only, control_label="control", **FAST)
    with pytest.raises(LingshuError, match="cannot tell which 'condition' label is the control"):
        evaluate(small, stim_only, **FAST)
    ctrl = small[small.obs["condition"] == "control"].copy()
    report = evaluate(small, stim_only, control=ctrl, baselines=(), **FAST)  # controls from their own file
    assert mean_of(report, "pds") == 1.0
    other = small.copy()
    other.obs["condition"] = "IFNG"
    with pytest.raises(LingshuError, match="pred shares no condition with real"):
        evaluate(other, small, **FAST)


def test_single_cell_groups_give_nan_not_crash(kang):
    small = kang[kang.obs["cell_type"].isin(["B", "NK"])].copy()
    nk_stim = np.flatnonzero(((small.obs["cell_type"] == "NK") & (small.obs["condition"] == "stimulated")).to_numpy())
    keep = np.ones(small.n_obs, dtype=bool)
    keep[nk_stim[1:]] = False  # one real NK/stimulated cell
    real = small[keep].copy()
    report = evaluate(small, real, perturbation_key="condition", context_key="cell_type",
                      baselines=("control", "half_split"), distribution="full", plots=False)
    nk = report[report["condition"] == "NK/stimulated"]
    dist = nk[(nk["method"] == "model") & (nk["family"] == "distribution")]
    assert len(dist) and dist["value"].isna().all()  # one real cell: no distribution to compare
    pert = nk[(nk["method"] == "model") & (nk["family"] == "perturbation")].set_index("metric")["value"]
    assert np.isfinite(pert["pds"]) and np.isfinite(pert["mae"])
    ceiling = nk[(nk["method"] == "half_split") & (nk["metric"] == "pds")]["value"]
    assert ceiling.isna().all()  # a single cell cannot be split


def test_cli_writes_report_and_refuses_bad_input(kang, tmp_path):
    from cli.main import app

    small = kang[kang.obs["cell_type"].isin(["B", "NK"])].copy()
    ref, pred = halves(small)
    ref.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    runner = CliRunner()
    args = ["evaluate", "--pred", tmp_path / "pred.h5ad", "--real", tmp_path / "real.h5ad", "--perturbation-key",
            "condition", "--context-key", "cell_type", "--out", tmp_path / "rep", "--distribution", "pooled",
            "--embedding", "pca", "--baseline", "control", "--baseline", "half_split", "--quiet"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == ""
    table = pd.read_csv(tmp_path / "rep" / "metrics.csv")
    assert set(table["method"]) == {"model", "control", "half_split"}
    assert (tmp_path / "rep" / "lfc.png").stat().st_size > 1000

    def error_line(extra):
        res = runner.invoke(app, [str(a) for a in args + extra])
        assert res.exit_code == 1, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in res.output
        return lines[0]

    assert "already holds a report" in error_line([])
    assert "unknown --baseline 'median'" in error_line(["--overwrite", "--baseline", "median"])
    assert "obs column 'donor' not found" in error_line(["--overwrite", "--context-key", "donor"])
