"""Distribution metrics: exact definitions, perfect values on identical inputs, and rankings
that put a true sample ahead of a deliberately wrong one."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.spatial.distance import cdist

from lingshu.errors import LingshuError
from lingshu.metrics import (celltype_proportions, classifier_auc, compare, distribution_report, energy_distance,
                             half_split, ilisi, marker_recovery, mean_wasserstein, mmd)

TYPES = ["A", "B", "C"]


def data_dir() -> Path:
    env = os.environ.get("LINGSHU_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def type_means(n_genes: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-type Poisson means: shared gamma base, 10 marker genes per type raised 6-fold."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 2.0, size=n_genes)  # (G,)
    means = {}
    for i, t in enumerate(TYPES):
        mu = base.copy()
        mu[10 * i:10 * (i + 1)] = 6.0 * mu[10 * i:10 * (i + 1)] + 2.0
        means[t] = mu
    return means


def draw(n_cells: int, seed: int, means: dict[str, np.ndarray] | None = None,
         proportions=(0.5, 0.3, 0.2), gene_scale: np.ndarray | None = None) -> ad.AnnData:
    """Poisson counts with a per-cell depth factor; ``gene_scale`` multiplies the means."""
    means = means or type_means()
    rng = np.random.default_rng(seed)
    labels = rng.choice(TYPES, size=n_cells, p=proportions)
    mu = np.stack([means[t] for t in labels])  # (N, G)
    mu *= rng.lognormal(0.0, 0.3, size=(n_cells, 1))
    if gene_scale is not None:
        mu *= gene_scale
    x = rng.poisson(mu).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels, categories=TYPES)}, index=[f"c{seed}_{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(mu.shape[1])])
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)


def shifted_scale(n_genes: int = 200) -> np.ndarray:
    """A wrong prediction: 20 non-marker genes three times too high."""
    scale = np.ones(n_genes)
    scale[100:120] = 3.0
    return scale


def as_dict(report: pd.DataFrame, column: str = "model") -> dict[str, float]:
    return dict(zip(report["metric"], report[column]))


# --- exact definitions -------------------------------------------------------------------

def test_mean_wasserstein_equals_scipy_per_gene_mean():
    rng = np.random.default_rng(1)
    x = rng.poisson(1.0, (31, 40)) * rng.random((31, 40))
    y = rng.poisson(1.5, (57, 40)).astype(float)
    want = np.mean([stats.wasserstein_distance(x[:, j], y[:, j]) for j in range(40)])
    assert mean_wasserstein(x, y) == pytest.approx(want, rel=1e-12)
    assert mean_wasserstein(sp.csr_matrix(x), sp.csr_matrix(y)) == pytest.approx(want, rel=1e-12)


def test_mmd_equals_five_scale_gaussian_v_statistic():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 5)), rng.normal(0.5, 1.2, size=(30, 5))
    z = np.vstack([x, y])
    d2 = cdist(z, z, "sqeuclidean")
    sigma0 = d2.sum() / (len(z) ** 2 - len(z))
    k = np.mean([np.exp(-d2 / (sigma0 * 2.0 ** (s - 3))) for s in range(5)], axis=0)
    want = k[:40, :40].mean() + k[40:, 40:].mean() - 2 * k[:40, 40:].mean()
    assert mmd(x, y) == pytest.approx(want, rel=1e-10)
    assert mmd(x, y) == pytest.approx(mmd(y, x), rel=1e-10)


def test_energy_distance_definition_and_zero_on_identical():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(25, 4)), rng.normal(1.0, 1.0, size=(35, 4))
    want = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    assert energy_distance(x, y) == pytest.approx(want, rel=1e-10)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-12)


def test_classifier_auc_catches_a_spread_only_difference():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(600, 10))
    same = rng.normal(size=(600, 10))
    wider = rng.normal(size=(600, 10)) * np.r_[1.6, np.ones(9)]  # same mean, wider along one axis
    assert abs(classifier_auc(x, same) - 0.5) < 0.06
    assert classifier_auc(x, wider) > 0.6


def test_ilisi_scale_from_separated_to_mixed():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 5))
    assert ilisi(x, rng.normal(size=(300, 5))) > 0.85
    assert ilisi(x, rng.normal(size=(300, 5)) + 20.0) == pytest.approx(0.0, abs=1e-12)
    assert ilisi(x, rng.normal(size=(100, 5))) > 0.85  # unequal sizes are balanced first


def test_half_split_is_stratified_disjoint_and_complete():
    labels = np.array(["a"] * 7 + ["b"] * 5 + ["c"] * 10)
    first, second = half_split(len(labels), labels, seed=0)
    assert np.array_equal(np.sort(np.r_[first, second]), np.arange(len(labels)))
    for lab in "abc":
        n_first, n_second = np.sum(labels[first] == lab), np.sum(labels[second] == lab)
        assert abs(n_first - n_second) <= 1
    assert abs(len(first) - len(second)) <= 1


# --- reports on synthetic Poisson data -----------------------------------------------------

@pytest.fixture(scope="module")
def synthetic():
    real = draw(500, seed=0)
    true = draw(500, seed=1)
    wrong = draw(500, seed=2, gene_scale=shifted_scale())
    return real, true, wrong


def test_identical_inputs_give_perfect_values(synthetic):
    real = synthetic[0]
    r = as_dict(distribution_report(real, real.copy(), label_key="cell_type"))
    for name in ("mmd", "energy_distance", "mean_wasserstein", "zero_fraction_mae", "library_size_ks", "celltype_tvd"):
        assert r[name] == pytest.approx(0.0, abs=1e-6), name
    for name in ("pearson_mean", "spearman_mean", "pearson_var", "spearman_var", "zero_fraction_pearson",
                 "library_size_median_ratio", "marker_overlap"):
        assert r[name] == pytest.approx(1.0, abs=1e-9), name
    # exact twins read as "not separable"; each held-out cell's twin with the other label sits in
    # the training folds, which pulls the AUC under 0.5 (a memorisation hint, documented)
    assert r["classifier_auc"] < 0.55
    assert r["ilisi"] > 0.9


def test_true_sample_ranks_ahead_of_shifted_prediction(synthetic):
    real, true, wrong = synthetic
    good = distribution_report(real, true, label_key="cell_type")
    bad = as_dict(distribution_report(real, wrong, label_key="cell_type"))
    assert list(good.columns) == ["metric", "model", "half_split", "better"]
    good_d = as_dict(good)
    for name, better in zip(good["metric"], good["better"]):
        if name in ("celltype_accuracy", "celltype_tvd", "marker_overlap"):
            continue  # the shift spares the marker genes: these need not move
        g, b = good_d[name], bad[name]
        if better == "lower":
            assert g < b, name
        elif better == "higher":
            assert g > b, name
        else:
            assert abs(g - 1) < abs(b - 1), name
    assert good_d["classifier_auc"] < 0.6 and bad["classifier_auc"] > 0.9
    # a true sample scores like a second real sample (the half split), within noise
    assert good_d["mmd"] < 3 * good.set_index("metric").loc["mmd", "half_split"] + 1e-3


def test_depth_change_alone_moves_only_library_metrics(synthetic):
    real, true, _ = synthetic
    deeper = true.copy()
    deeper.X = deeper.X * 2
    a, b = as_dict(distribution_report(real, true)), as_dict(distribution_report(real, deeper))
    assert b["mmd"] == pytest.approx(a["mmd"], rel=1e-6)  # normalised to 1e4 per cell
    assert b["library_size_median_ratio"] == pytest.approx(2 * a["library_size_median_ratio"], rel=0.05)
    assert b["library_size_ks"] > 0.5 > a["library_size_ks"]


def test_celltype_assignment_right_labels_vs_shuffled(synthetic):
    real, true, _ = synthetic
    right = celltype_proportions(real, true, "cell_type")
    assert right.accuracy > 0.95
    table = right.table  # the two draws differ in proportions by chance; assignment should track the labels
    assert right.tvd == pytest.approx(0.5 * np.abs(table["real_fraction"] - table["sim_conditioned_fraction"]).sum(),
                                      abs=0.02)
    assert list(right.table.columns) == ["real_fraction", "sim_conditioned_fraction", "sim_assigned_fraction",
                                         "assigned_accuracy"]
    shuffled = true.copy()
    shuffled.obs["cell_type"] = np.random.default_rng(0).permutation(shuffled.obs["cell_type"].to_numpy())
    wrong = celltype_proportions(real, shuffled, "cell_type")
    chance = float(np.sum(right.table["sim_conditioned_fraction"] ** 2))  # ~0.38 for (0.5, 0.3, 0.2)
    assert abs(wrong.accuracy - chance) < 0.08
    assert wrong.tvd == pytest.approx(right.tvd, abs=1e-12)  # assignment ignores the labels


def test_marker_recovery_finds_markers_and_notices_swapped_types(synthetic):
    real, true, _ = synthetic
    good = marker_recovery(real, true, "cell_type", n=10)
    assert good.mean_overlap > 0.9
    assert set(good.table["real_markers"]["A"]) == {f"g{j}" for j in range(10)}
    swapped = true.copy()
    swapped.obs["cell_type"] = swapped.obs["cell_type"].map({"A": "B", "B": "C", "C": "A"}).astype(str)
    assert marker_recovery(real, swapped, "cell_type", n=10).mean_overlap < 0.1


def test_only_shared_genes_are_compared(synthetic):
    real, true, _ = synthetic
    extra = ad.AnnData(X=sp.csr_matrix(np.ones((true.n_obs, 3), dtype=np.float32)), obs=true.obs,
                       var=pd.DataFrame(index=["x1", "x2", "x3"]))
    padded = ad.concat([true, extra], axis=1, merge="first")
    a, b = distribution_report(real, true), distribution_report(real, padded[:, ::-1].copy())
    assert b.attrs["n_genes"] == real.n_vars
    assert np.allclose(a["model"], b["model"], rtol=1e-6, equal_nan=True)


def test_bad_inputs_raise_one_line_errors(synthetic):
    real, true, _ = synthetic
    other = true.copy()
    other.var_names = [f"h{j}" for j in range(other.n_vars)]
    with pytest.raises(LingshuError, match="share no gene"):
        distribution_report(real, other)
    with pytest.raises(LingshuError, match="donor"):
        distribution_report(real, true, label_key="donor")
    neg = true.copy()
    neg.X = -neg.X
    with pytest.raises(LingshuError, match="negative"):
        distribution_report(real, neg)


# --- real data -----------------------------------------------------------------------------

def test_pbmc3k_half_vs_half_is_indistinguishable_and_a_shift_is_not():
    path = data_dir() / "pbmc3k_10x_seurat_labels.h5ad"
    if not path.exists():
        pytest.skip(f"real data not found at {path}; set LINGSHU_DATA_DIR to the folder holding it")
    cells = ad.read_h5ad(path)
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    first, second = half_split(cells.n_obs, labels, seed=0)
    xa, xb = sp.csr_matrix(cells.X[first]), sp.csr_matrix(cells.X[second])
    genes = list(cells.var_names)
    true = compare(xa, xb, genes, real_labels=labels[first], sim_labels=labels[second])
    scale = np.ones(len(genes))
    scale[np.random.default_rng(0).choice(len(genes), 500, replace=False)] = 3.0
    shifted = np.random.default_rng(1).poisson(xb.toarray() * scale).astype(np.float32)  # thins nothing, triples 500 genes
    wrong = compare(xa, sp.csr_matrix(shifted), genes, real_labels=labels[first], sim_labels=labels[second])
    assert true["classifier_auc"] < 0.56
    assert true["ilisi"] > 0.9
    assert true["celltype_accuracy"] > 0.85
    assert wrong["mmd"] > 2 * true["mmd"]
    assert wrong["classifier_auc"] > true["classifier_auc"] + 0.1
    assert wrong["mean_wasserstein"] > true["mean_wasserstein"]
