"""Shared fixtures: a small synthetic count data set with real structure, and a tiny trained model."""

from __future__ import annotations

import contextlib
import logging
import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

# Test models are tiny: one intra-op thread is faster than several, and on a busy machine
# extra threads make training many times slower (oversubscription).
torch.set_num_threads(int(os.environ.get("LINGSHU_TEST_THREADS", "1")))


def make_counts(n_cells: int = 120, n_genes: int = 60, seed: int = 0) -> ad.AnnData:
    """Poisson counts of two cell types x control/stim, each with its own gene means.

    Type ``B`` raises genes 0-14 four-fold; ``stim`` raises genes 15-29 five-fold and
    lowers genes 30-39 to a fifth, so both labels leave a clear signal in the counts.
    """
    rng = np.random.default_rng(seed)
    cell_type = np.repeat(["A", "B"], n_cells // 2)
    condition = np.tile(["control", "stim"], n_cells // 2)
    base = rng.gamma(2.0, 1.0, size=n_genes)  # (G,)
    mean = np.tile(base, (n_cells, 1))  # (N, G)
    mean[cell_type == "B", :15] *= 4.0
    mean[condition == "stim", 15:30] *= 5.0
    mean[condition == "stim", 30:40] /= 5.0
    x = rng.poisson(mean).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(cell_type), "condition": pd.Categorical(condition)},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"G{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)



@contextlib.contextmanager
def recorded_logs(name: str, level: int = logging.INFO):
    """Collect the records of logger ``name`` at ``level`` or above in a list.

    The handler sits on the logger itself: the CLI's rich handler turns propagation to root off, and whether
    ``caplog`` still sees such a logger differs between pytest releases (9.x attaches to it, so re-enabling
    propagation there would show every record twice).
    """
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append
    logger = logging.getLogger(name)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def record_packed_conditions(model) -> list:
    """Spy on ``model.denoiser.packed``: the returned list receives the condition ids of every pass."""
    seen = []
    real_packed = model.denoiser.packed

    def spy(xt, cond):
        seen.append(cond.clone())
        return real_packed(xt, cond)

    model.denoiser.packed = spy
    return seen

@pytest.fixture
def counts_adata() -> ad.AnnData:
    return make_counts()


@pytest.fixture
def counts_h5ad(tmp_path, counts_adata):
    path = tmp_path / "cells.h5ad"
    counts_adata.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A ``tiny`` model (30 steps) trained on :func:`make_counts`, saved to a run directory."""
    from lingshu import LingshuModel

    model = LingshuModel(make_counts(), context_keys=["cell_type"], perturbation_key="condition",
                         control="control", preset="tiny", seed=0)
    model.train(max_steps=30, device="cpu", progress=False)
    path = tmp_path_factory.mktemp("model") / "run"
    model.save(path)
    return path
