"""Reading and writing cells: formats, damaged files, gene alignment, atomic writes."""

from __future__ import annotations

import logging

import anndata as ad
import h5py
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lingshu.errors import LingshuError
from lingshu.io import align_genes, read_cells, write_cells
from tests.conftest import recorded_logs

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:mudata")


def write_10x_h5(path, x: sp.csr_matrix, genes, barcodes, feature_types=None) -> None:
    """A Cell Ranger v3 feature-barcode matrix: genes x cells CSC under group ``matrix``."""
    csc = sp.csc_matrix(x.T.astype(np.int32))  # (genes, cells)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices, csc.indptr
        g["shape"] = np.array(csc.shape, dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        feats = g.create_group("features")
        feats["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        feats["name"] = np.array(genes, dtype="S")
        feats["feature_type"] = np.array(feature_types or ["Gene Expression"] * len(genes), dtype="S")
        feats["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


# --- reading -----------------------------------------------------------------------------------

def test_10x_h5_round_trip(tmp_path, counts_adata):
    x = counts_adata.X.tocsr()
    genes = list(counts_adata.var_names)
    genes[1] = genes[0]  # Cell Ranger files can repeat gene symbols
    types = ["Gene Expression"] * (len(genes) - 1) + ["Antibody Capture"]
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    write_10x_h5(path, x, genes, list(counts_adata.obs_names), types)

    got = read_cells(path)
    assert got.shape == (counts_adata.n_obs, counts_adata.n_vars - 1)  # antibody feature dropped
    assert sp.isspmatrix_csr(got.X) and got.X.dtype == np.float32
    np.testing.assert_array_equal(got.X.toarray(), x[:, :-1].toarray())
    assert list(got.obs_names) == list(counts_adata.obs_names)
    assert got.var_names.is_unique and got.var_names[0] == "G0" and got.var_names[1] != "G0"
    assert got.var["gene_ids"].iloc[2] == "ENSG00002"


def test_h5mu_output_and_input(tmp_path, counts_adata):
    path = tmp_path / "cells.h5mu"
    write_cells(counts_adata, path)
    assert list(md.read_h5mu(path).mod) == ["rna"]
    got = read_cells(path)
    np.testing.assert_array_equal(got.X.toarray(), counts_adata.X.toarray())
    assert list(got.obs["cell_type"].astype(str)) == list(counts_adata.obs["cell_type"].astype(str))


def test_h5mu_picks_gex_modality_and_lists_modalities(tmp_path, counts_adata):
    def other(prefix):
        return ad.AnnData(X=np.ones((counts_adata.n_obs, 3), dtype=np.float32), obs=counts_adata.obs[[]].copy(),
                          var=pd.DataFrame(index=[f"{prefix}{i}" for i in range(3)]))

    path = tmp_path / "multi.h5mu"
    md.MuData({"prot": other("CD"), "GEX": counts_adata}).write_h5mu(path)
    assert read_cells(path).n_vars == counts_adata.n_vars

    only_prot = tmp_path / "prot.h5mu"
    md.MuData({"prot": other("CD"), "atac": other("chr1:")}).write_h5mu(only_prot)
    with pytest.raises(LingshuError, match=r"no modality 'rna'; modalities: prot, atac"):
        read_cells(only_prot)


def test_h5ad_backed_and_layer_check(counts_h5ad):
    got = read_cells(counts_h5ad, backed=True)
    assert got.isbacked and got.shape == (120, 60)
    got.file.close()
    with pytest.raises(LingshuError, match=r"layer 'counts' not found .* available: \(none\)"):
        read_cells(counts_h5ad, layer="counts")


@pytest.mark.parametrize("content, suffix", [(b"", ".h5ad"), (b"cell,gene\n1,2\n", ".h5ad"), (b"", ".h5"),
                                             (b"not hdf5 at all", ".h5mu")])
def test_empty_or_non_hdf5_file(tmp_path, content, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(LingshuError, match="is not an HDF5 file") as err:
        read_cells(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_h5ad(tmp_path, counts_h5ad):
    data = counts_h5ad.read_bytes()
    path = tmp_path / "truncated.h5ad"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LingshuError, match=r"could not read .*truncated\.h5ad") as err:
        read_cells(path)
    assert "\n" not in str(err.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(LingshuError, match="no such file"):
        read_cells(tmp_path / "absent.h5ad")
    csv = tmp_path / "cells.csv"
    csv.write_text("a,b\n")
    with pytest.raises(LingshuError, match=r"unknown extension '.csv'; supported: .h5ad, .h5, .h5mu"):
        read_cells(csv)


# --- gene alignment ----------------------------------------------------------------------------

@pytest.fixture
def io_warnings():
    """Warnings of ``lingshu.io`` (captured directly: the CLI may stop propagation to root)."""
    with recorded_logs("lingshu.io", logging.WARNING) as records:
        yield records


def test_align_genes_reorders_and_zero_fills(counts_adata, io_warnings):
    model_genes = ["G5", "NEW1", "G0", "G59", "NEW2", "NEW3"]
    x, n_missing = align_genes(counts_adata, list(counts_adata.var_names), model_genes)
    assert n_missing == 3
    assert sp.isspmatrix_csr(x) and x.shape == (counts_adata.n_obs, 6) and x.dtype == np.float32
    dense = counts_adata.X.toarray()
    np.testing.assert_array_equal(x[:, [0, 2, 3]].toarray(), dense[:, [5, 0, 59]])
    assert x[:, [1, 4, 5]].nnz == 0
    messages = [r.getMessage() for r in io_warnings]
    assert len(messages) == 1 and messages[0].startswith("3 of the model's 6 genes are missing")


def test_align_genes_plain_matrix_no_warning_when_complete(io_warnings):
    dense = np.arange(12, dtype=np.float32).reshape(3, 4)
    x, n_missing = align_genes(dense, ["a", "b", "c", "d"], ["d", "a"])
    assert n_missing == 0 and not io_warnings
    np.testing.assert_array_equal(x.toarray(), dense[:, [3, 0]])


def test_align_genes_refuses_duplicates_and_disjoint_names():
    with pytest.raises(LingshuError, match=r"duplicated gene name.*e\.g\. b"):
        align_genes(np.ones((2, 3)), ["a", "b", "b"], ["a"])
    with pytest.raises(LingshuError, match="none of the model's 2 genes"):
        align_genes(np.ones((2, 2)), ["ENSG1", "ENSG2"], ["CD3E", "MS4A1"])


# --- writing -----------------------------------------------------------------------------------

def test_write_refuses_existing_file_and_leaves_it_untouched(tmp_path, counts_adata):
    path = tmp_path / "out.h5ad"
    path.write_bytes(b"precious")
    with pytest.raises(LingshuError, match=r"out\.h5ad exists; pass --overwrite"):
        write_cells(counts_adata, path)
    assert path.read_bytes() == b"precious"
    write_cells(counts_adata, path, overwrite=True)
    assert read_cells(path).shape == counts_adata.shape
    assert leftovers(tmp_path) == []


def test_write_creates_parent_dirs_and_refuses_unknown_extension(tmp_path, counts_adata):
    path = write_cells(counts_adata, tmp_path / "a" / "b" / "out.h5ad")
    assert path.is_file()
    with pytest.raises(LingshuError, match="supported: .h5ad, .h5mu, .rds"):
        write_cells(counts_adata, tmp_path / "out.loom")


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_no_temp_file(tmp_path, counts_adata, monkeypatch, exc):
    def broken_write(self, filename, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"\x89HDF\r\n\x1a\npartial")
        raise exc

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken_write)
    with pytest.raises(type(exc)):
        write_cells(counts_adata, tmp_path / "out.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- bundled data ------------------------------------------------------------------------------

def test_pbmc68k_counts_match_shared_copy():
    from lingshu.datasets import pbmc68k_counts, shared_data_path

    adata = pbmc68k_counts()
    assert adata.shape == (700, 765) and sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert np.all(adata.X.data == np.round(adata.X.data)) and adata.X.data.min() >= 1
    assert adata.obs["cell_type"].value_counts()["Dendritic"] == 240
    assert {"louvain", "phase"} <= set(adata.obs.columns)
    shared = shared_data_path("pbmc68k_reduced_10x_subset.h5ad")
    if shared is None:
        pytest.skip("shared data folder not available")
    ref = ad.read_h5ad(shared)
    assert list(ref.var_names) == list(adata.var_names) and list(ref.obs_names) == list(adata.obs_names)
    assert abs(ref.X - adata.X).max() == 0
    pd.testing.assert_series_equal(ref.obs["cell_type"].astype(str), adata.obs["cell_type"].astype(str))
