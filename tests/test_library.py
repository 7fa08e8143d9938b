"""Library-size conditioning: bins, per-condition draws with fallback, and use in training and sampling."""

import json

import numpy as np
import scipy.sparse as sp

from lingshu import LingshuModel
from lingshu.library import LibrarySize
from tests.conftest import make_counts


def _cells(rng, n, scale):
    return rng.poisson(scale * np.array([0.5, 1.0, 2.0, 4.0]), size=(n, 4))


def test_bins_follow_each_conditions_library_sizes():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(np.vstack([_cells(rng, 200, 5), _cells(rng, 200, 200)]))  # type 1 small, type 2 large
    cond = np.array([[1, 1]] * 100 + [[1, 2]] * 100 + [[2, 1]] * 200)  # (cell type, perturbation)
    lib = LibrarySize.fit(counts, cond, n_bins=8)
    assert lib.n_bins == 8 and np.all(np.diff(lib.edges) > 0)
    ids = lib.ids(counts)
    assert ids.min() >= 1 and ids.max() <= 8
    assert np.all(ids[:200] < ids[200:].min())  # every small cell in a lower bin than every large one
    draws = lib.draw(np.array([[1, 1]] * 300 + [[2, 1]] * 300), np.random.default_rng(1))
    assert draws[:300].max() < draws[300:].min()
    # a combination never seen (type 2 x perturbation 2) takes the bins of its cell type
    unseen = lib.draw(np.array([[2, 2]] * 200), np.random.default_rng(2))
    assert set(unseen) <= set(ids[200:])
    # a null label matches every label; nothing known at all falls back to every cell
    assert set(lib.draw(np.array([[0, 0]] * 500), np.random.default_rng(3))) == set(ids)


def test_state_round_trips_through_json():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(_cells(rng, 50, 10))
    lib = LibrarySize.fit(counts, np.zeros((50, 0), dtype=np.int64), n_bins=5)  # no condition keys
    back = LibrarySize.from_state(json.loads(json.dumps(lib.state_dict())))
    np.testing.assert_array_equal(back.ids(counts), lib.ids(counts))
    np.testing.assert_array_equal(back.counts, lib.counts)
    assert back.draw(np.zeros((10, 0), dtype=np.int64), np.random.default_rng(0)).shape == (10,)


def test_training_batches_carry_each_cells_own_bin_and_prediction_keeps_the_source_bin():
    a = make_counts()
    m = LingshuModel(a, context_keys=["cell_type"], perturbation_key="condition", control="control", preset="tiny")
    assert m.library is not None and m.denoiser.n_cond == 3  # cell type, condition, library size
    from lingshu.data import BatchStream
    stream = BatchStream(m._x, m._cond, np.arange(a.n_obs), 16, m.tokenizer, library=m.library)
    rows = stream.rows(0)
    _, cond = stream.take(rows)
    np.testing.assert_array_equal(cond[:, -1].numpy(), m.library.ids(sp.csr_matrix(a.X)[np.sort(rows)]))
    src = np.zeros((4, 0), dtype=np.int64)
    start = sp.csr_matrix(a.X[:4])
    cond, _ = m._with_extras(src, None, start, seed=0)
    np.testing.assert_array_equal(cond[:, -1], m.library.ids(start))
