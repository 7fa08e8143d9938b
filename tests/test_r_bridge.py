"""The R bridge: AnnData -> Seurat / SingleCellExperiment (rpy2), and the reticulate hand-off.

Tests marked ``r`` need rpy2 and R with SeuratObject; they skip with the reason otherwise.
The hand-off helpers used by the R package are plain Python and always run.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import make_counts

from lingshu import r as lr
from lingshu.errors import LingshuError


# ----------------------------------------------------------------------------- no R needed
def test_seurat_feature_names_rewrites_underscores_and_pipes():
    assert lr.seurat_feature_names(["HLA_A", "KIR|x", "CD3E"]) == ["HLA-A", "KIR-x", "CD3E"]


def test_seurat_feature_names_refuses_collisions():
    with pytest.raises(LingshuError, match="'A-B' and 'A_B' would both be named 'A-B'"):
        lr.seurat_feature_names(["A-B", "A_B"])


def test_model_gene_names_undoes_the_seurat_rewrite():
    assert lr.model_gene_names(["HLA-A", "G3", "NEW-1"], ["G3", "HLA_A"]) == ["HLA_A", "G3", "NEW-1"]
    assert lr.model_gene_names(["A-B"], ["A-B", "A_B"]) == ["A-B"]  # verbatim match wins


def test_hand_off_round_trip_is_exact():
    a = make_counts(30, 20)
    payload = lr.cells_to_r(a)
    assert all(isinstance(payload[k], bytearray) for k in ("i", "p", "x"))
    obs = {k: v["values"] for k, v in payload["obs"].items()}
    back = lr.cells_from_r(obs, payload["cells"], payload["genes"], i=payload["i"], p=payload["p"], x=payload["x"])
    assert back.shape == a.shape
    assert (back.X != a.X).nnz == 0
    assert list(back.obs["cell_type"]) == list(a.obs["cell_type"].astype(str))
    assert payload["obs"]["cell_type"]["levels"] == ["A", "B"]


def test_hand_off_column_kinds():
    a = make_counts(4, 3)
    a.obs["n"] = np.arange(4)
    a.obs["score"] = [0.5, np.nan, 1.0, 2.0]
    a.obs["flag"] = [True, False, True, True]
    a.obs["s"] = ["x", None, "y", "z"]
    obs = lr.cells_to_r(a)["obs"]
    assert obs["n"]["values"] == [0, 1, 2, 3]
    assert obs["score"]["values"][0] == 0.5 and np.isnan(obs["score"]["values"][1])
    assert obs["flag"]["values"] == [True, False, True, True]
    assert obs["s"]["values"] == ["x", None, "y", "z"]


def test_hand_off_checks_lengths():
    with pytest.raises(LingshuError, match="metadata column 'cell_type' has 1 values for 2 cells"):
        lr.cells_from_r({"cell_type": ["A"]}, ["c1", "c2"])
    with pytest.raises(LingshuError, match="p has 2 values, expected 3"):
        lr.cells_from_r({}, ["c1", "c2"], ["g"], i=b"", p=np.zeros(2, "<i4").tobytes(), x=b"")


def test_hand_off_without_counts_is_enough_for_predict(model_dir):
    from lingshu import LingshuModel

    model = LingshuModel.load(model_dir)
    cells = lr.cells_from_r({"cell_type": ["A", "B", "B"]}, ["c1", "c2", "c3"])
    sim = model.predict(cells, ["stim"], steps=2, seed=0, device="cpu", progress=False)
    assert sim.n_obs == 3 and list(sim.obs["source_cell"]) == ["c1", "c2", "c3"]
    payload = lr.cells_to_r(sim)
    assert payload["n_cells"] == 3 and payload["genes"] == model.genes
    assert '"seed": 0' in payload["provenance"]


def test_train_from_r_trains_and_saves(tmp_path):
    a = make_counts(40, 16)
    model = lr.train_from_r(a, context_keys="cell_type", perturbation_key="condition", control="control",
                            max_steps=3, device="cpu", seed=1, out_dir=str(tmp_path / "m"))
    assert model.history.get("steps", model.history.get("step")) == 3  # engine writes 'step'; contract 'steps'
    assert model.train_config.seed == 1
    assert (tmp_path / "m" / "lingshu.json").exists()


def test_rds_without_rpy2_is_a_clear_error(monkeypatch, tmp_path):
    from lingshu.io import write_cells

    monkeypatch.setitem(sys.modules, "rpy2", None)  # import rpy2 -> ImportError
    monkeypatch.setitem(sys.modules, "rpy2.rinterface", None)
    monkeypatch.setitem(sys.modules, "rpy2.robjects", None)
    with pytest.raises(LingshuError, match=r"pip install 'lingshu\[r\]'"):
        write_cells(make_counts(4, 3), tmp_path / "x.rds")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- with R
@pytest.fixture(scope="module")
def ro():
    """rpy2's robjects with SeuratObject loadable, or a skip that says what is missing."""
    try:
        import rpy2.robjects as robjects
    except Exception as exc:  # ImportError, or R missing / broken
        pytest.skip(f"rpy2 not usable (pip install 'lingshu[r]'): {type(exc).__name__}: {exc}")
    for pkg in ("SeuratObject", "Matrix"):
        if not robjects.r(f'isTRUE(requireNamespace("{pkg}", quietly = TRUE))')[0]:
            pytest.skip(f"R package {pkg} not installed")
    return robjects


def _r_counts(ro, obj, kind="seurat"):
    """The R object's counts as a cells x genes CSR matrix, via its dgCMatrix slots."""
    get = ("function(o) SeuratObject::GetAssayData(o, slot = 'counts')" if kind == "seurat"
           else "function(o) SummarizedExperiment::assay(o, 'counts')")
    m = ro.r(get)(obj)
    i, p, x = (np.asarray(ro.r(f"function(m) m@{s}")(m)) for s in ("i", "p", "x"))
    n_genes, n_cells = ro.r("dim")(m)
    return sp.csr_matrix((x, i, p), shape=(n_cells, n_genes))


@pytest.mark.r
def test_to_seurat_carries_counts_metadata_reductions(ro):
    a = make_counts(30, 20)
    a.var_names = ["HLA_A"] + list(a.var_names[1:])
    a.obs["score"] = np.linspace(0, 1, 30)
    a.obsm["X_pca"] = np.arange(60, dtype=float).reshape(30, 2)
    a.uns["lingshu"] = {"seed": 5}
    obj = lr.to_seurat(a)
    assert list(ro.r("class")(obj)) == ["Seurat"]
    assert (_r_counts(ro, obj) != a.X).nnz == 0
    assert list(ro.r("rownames")(obj))[:2] == ["HLA-A", "G1"]
    assert list(ro.r("function(o) o[['RNA']][['original_name']][[1]]")(obj))[:2] == ["HLA_A", "G1"]
    assert list(ro.r("function(o) levels(o$cell_type)")(obj)) == ["A", "B"]
    assert list(ro.r("function(o) as.character(o$condition)")(obj)) == list(a.obs["condition"].astype(str))
    assert np.allclose(ro.r("function(o) o$score")(obj), a.obs["score"])
    emb = np.asarray(ro.r("function(o) SeuratObject::Embeddings(o, 'pca')")(obj))
    assert np.array_equal(emb, a.obsm["X_pca"])
    assert list(ro.r("function(o) colnames(SeuratObject::Embeddings(o, 'pca'))")(obj)) == ["PC_1", "PC_2"]
    assert ro.r("function(o) SeuratObject::Misc(o, 'lingshu')$seed")(obj)[0] == 5
    assert list(ro.r("function(o) unique(as.character(o$orig.ident))")(obj)) == ["lingshu"]


@pytest.mark.r
def test_to_sce_keeps_gene_names(ro):
    if not ro.r('isTRUE(requireNamespace("SingleCellExperiment", quietly = TRUE))')[0]:
        pytest.skip("R package SingleCellExperiment not installed")
    a = make_counts(10, 6)
    a.var_names = ["A_1"] + list(a.var_names[1:])
    a.obsm["X_umap"] = np.ones((10, 2))
    sce = lr.to_sce(a)
    assert list(ro.r("class")(sce)) == ["SingleCellExperiment"]
    assert list(ro.r("rownames")(sce))[0] == "A_1"
    assert list(ro.r("SingleCellExperiment::reducedDimNames")(sce)) == ["UMAP"]
    assert (_r_counts(ro, sce, "sce") != a.X).nnz == 0


@pytest.mark.r
def test_to_seurat_refuses_non_counts(ro):
    a = make_counts(10, 6)
    a.X = a.X * 0.5
    with pytest.raises(LingshuError, match="non-integer values"):
        lr.to_seurat(a)


@pytest.mark.r
def test_write_rds_round_trip(ro, tmp_path):
    a = make_counts(12, 8)
    path = lr.write_rds(a, tmp_path / "cells.rds")
    assert list(ro.r(f"function() class(readRDS('{path}'))")()) == ["Seurat"]
    with pytest.raises(LingshuError, match="kind must be"):
        lr.write_rds(a, tmp_path / "x.rds", kind="loom")


@pytest.mark.r
def test_cli_simulate_writes_a_seurat_rds(ro, model_dir, counts_h5ad, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "sim.rds"
    result = CliRunner().invoke(app, ["simulate", "--model", str(model_dir), "--in", str(counts_h5ad),
                                      "--perturb", "stim", "--steps", "2", "--device", "cpu", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "reticulate" not in result.output  # rpy2's stale reticulate warning is silenced
    obj = ro.r(f"readRDS('{out}')")
    assert list(ro.r("class")(obj)) == ["Seurat"]
    x = _r_counts(ro, obj)
    assert x.shape == (120, 60)
    assert np.all(x.data == np.round(x.data))
    assert set(ro.r("function(o) as.character(o$condition)")(obj)) == {"stim"}


@pytest.mark.slow
def test_python_vignette_runs(tmp_path, monkeypatch, capsys):
    """The code blocks of vignettes/lingshu-python.md run in order (about a minute on a CPU)."""
    import os
    import re
    from pathlib import Path

    from lingshu.datasets import shared_data_path

    default = shared_data_path("kang2018_ifnb_pbmc_scgen_valid.h5ad") or Path("kang2018_ifnb_pbmc_scgen_valid.h5ad")
    data = Path(os.environ.get("LINGSHU_KANG_H5AD", str(default)))
    if not data.exists():
        pytest.skip(f"{data} not found; set LINGSHU_KANG_H5AD to kang2018_ifnb_pbmc_scgen_valid.h5ad")
    text = (Path(__file__).parent.parent / "vignettes" / "lingshu-python.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 6
    monkeypatch.setenv("LINGSHU_KANG_H5AD", str(data))
    monkeypatch.chdir(tmp_path)
    import matplotlib

    matplotlib.use("Agg")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "lingshu-python.md", "exec"), namespace)
    assert namespace["sim"].n_obs == 300
    assert set(namespace["sim"].obs["condition"]) == {"stimulated"}
    assert (tmp_path / "pbmc-model" / "lingshu.json").exists()
    printed = capsys.readouterr().out
    assert (tmp_path / "sim.rds").exists() or "skipping the .rds export" in printed
