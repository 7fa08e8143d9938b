"""Data larger than memory: sharded, block-shuffled training from disk, and streamed output."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import make_counts
from lingshu import LingshuModel
from lingshu.data import block_shuffle, split_indices
from lingshu.errors import LingshuError
from lingshu.shards import ShardedCounts
from test_cli import assert_user_error, run
from test_io import write_10x_h5


@pytest.fixture
def shards(tmp_path):
    """The same 120 cells cut into three files: two .h5ad (genes in other orders, one extra gene
    each) and a 10x .h5 (with an antibody-capture feature)."""
    full = make_counts(n_cells=120, n_genes=40)
    genes = list(full.var_names)
    a = full[:50].copy()
    a = ad.AnnData(sp.hstack([a.X, sp.csr_matrix(np.ones((50, 1), np.float32))]).tocsr(), obs=a.obs,
                   var=pd.DataFrame(index=genes + ["only_in_a"]))
    b = full[50:90, genes[::-1]].copy()
    b = ad.AnnData(sp.hstack([sp.csr_matrix(np.full((40, 1), 2, np.float32)), b.X]).tocsr(), obs=b.obs,
                   var=pd.DataFrame(index=["only_in_b"] + genes[::-1]))
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    c = full[90:]
    x10 = sp.hstack([c.X, sp.csr_matrix(np.full((30, 1), 7, np.float32))]).tocsr()
    write_10x_h5(tmp_path / "c.h5", x10, genes + ["CD3_TotalSeqB"], list(c.obs_names),
                 ["Gene Expression"] * 40 + ["Antibody Capture"])
    return full, [tmp_path / "a.h5ad", tmp_path / "b.h5ad", tmp_path / "c.h5"]


def test_shards_are_aligned_by_gene_name(shards):
    full, paths = shards
    x = ShardedCounts(paths, block=16, cache_blocks=2)
    assert x.genes == list(full.var_names)  # genes all shards share, first shard's order
    assert x.shape == (120, 40)
    rows = np.array([119, 3, 64, 50, 49, 90, 0])
    assert np.array_equal(x[rows].toarray(), full.X[rows].toarray())
    assert np.array_equal(x[0:120].toarray(), full.X.toarray())
    assert list(x.obs.index[:50]) == list(full.obs_names[:50])
    assert x.obs["cell_type"].isna().sum() == 30  # the 10x file carries no labels
    assert len(x._cache) <= 2


def test_bad_counts_in_a_shard_are_reported_with_the_file(tmp_path):
    bad = make_counts(n_cells=30, n_genes=10)
    bad.X = bad.X.astype(np.float32)
    bad.X.data[5] = 0.5
    bad.write_h5ad(tmp_path / "bad.h5ad")
    x = ShardedCounts([tmp_path / "bad.h5ad"], block=8)
    with pytest.raises(LingshuError, match=r"bad.h5ad: rows 0..7 hold non-integer values"):
        x[np.arange(8)]


def test_streaming_refuses_csc_and_missing_genes_overlap(tmp_path):
    a = make_counts(n_cells=20, n_genes=10)
    csc = ad.AnnData(sp.csc_matrix(a.X), obs=a.obs, var=a.var)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(LingshuError, match="csc_matrix; streaming needs row-major CSR"):
        ShardedCounts([tmp_path / "csc.h5ad"])
    other = a.copy()
    other.var_names = [f"X{i}" for i in range(10)]
    a.write_h5ad(tmp_path / "a.h5ad")
    other.write_h5ad(tmp_path / "o.h5ad")
    with pytest.raises(LingshuError, match="share no gene names"):
        ShardedCounts([tmp_path / "a.h5ad", tmp_path / "o.h5ad"])


def test_block_shuffle_is_a_local_permutation():
    idx = np.arange(1000)
    order = block_shuffle(idx, np.random.default_rng(0), block=50, buffer=4)
    assert np.array_equal(np.sort(order), idx)
    assert not np.array_equal(order, idx)
    # each run of buffer x block cells comes from at most `buffer` blocks
    for start in range(0, 1000, 200):
        assert len(np.unique(order[start:start + 200] // 50)) <= 4
    assert np.array_equal(order, block_shuffle(idx, np.random.default_rng(0), block=50, buffer=4))
    train, val = split_indices(1000, 0.05, seed=0, block=50)
    assert len(val) == 50 and len(np.unique(val // 50)) == 1
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 1000


def test_model_trains_from_shards_and_cli_streams(tmp_path, shards):
    full, paths = shards
    m = LingshuModel.from_files(paths[:2], context_keys=["cell_type"], block=16, buffer=2)
    hist = m.train(max_steps=3, device="cpu")
    assert hist["step"] == 3 and np.isfinite(hist["train_loss"][-1][1] if hist["train_loss"] else 0.0)
    assert m.genes == list(full.var_names)
    sim = m.generate(5, {"cell_type": "B"}, steps=2)
    assert sim.shape == (5, 40) and set(sim.obs["cell_type"]) == {"B"}

    out = tmp_path / "run"
    result = run("train", "--in", paths[0], "--in", paths[1], "--in", paths[2], "--out", out, "--max-steps", "2",
                 "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert LingshuModel.load(out).genes == list(full.var_names)
    labelled = run("train", "--in", paths[0], "--in", paths[2], "--out", tmp_path / "run2",
                   "--context-key", "cell_type", "--max-steps", "2", "--device", "cpu")
    assert_user_error(labelled, "obs column 'cell_type' has 30 missing labels")
    assert not (tmp_path / "run2" / "lingshu.json").exists()


def test_streamed_simulate_equals_in_memory(tmp_path, model_dir, monkeypatch):
    from lingshu import model as model_module

    m = LingshuModel.load(model_dir)
    whole = m.generate(7, steps=2, seed=3)
    monkeypatch.setattr(model_module, "_CHUNK_CELLS", 3)  # three chunks of at most 3 cells
    chunks = list(m.iter_simulate(m.generation_table(7, seed=3), steps=2, seed=3))
    assert [c.n_obs for c in chunks] == [3, 3, 1]
    out = tmp_path / "sim.h5ad"
    result = run("simulate", "--model", model_dir, "--n-cells", "7", "--steps", "2", "--seed", "3", "--out", out)
    assert result.exit_code == 0, result.output
    back = ad.read_h5ad(out)
    assert back.shape == (7, len(m.genes))
    assert list(back.obs_names) == [f"sim_{i}" for i in range(7)]
    assert np.array_equal(back.X.toarray(), ad.concat(chunks).X.toarray())
    assert back.uns["lingshu"]["steps"] == 2
    assert list(back.obs.columns) == list(whole.obs.columns)
    assert back.obs["cell_type"].dtype == "category"
    ctrl = make_counts()[:4].copy()
    ctrl.write_h5ad(tmp_path / "ctrl.h5ad")
    pert = run("simulate", "--model", model_dir, "--in", tmp_path / "ctrl.h5ad", "--perturb", "stim", "--perturb",
               "control", "--out", tmp_path / "pert.h5ad")
    assert pert.exit_code == 0, pert.output
    p = ad.read_h5ad(tmp_path / "pert.h5ad")
    assert p.n_obs == 8 and list(p.obs["source_cell"]) == list(ctrl.obs_names) * 2
    assert list(p.obs["condition"]) == ["stim"] * 4 + ["control"] * 4
