"""Cell-state conditioning: k-means states of the training cells, per-condition draws, use in a model."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lingshu import LingshuModel
from lingshu.cellstate import CellState
from lingshu.config import ModelConfig, preset


def _two_programs(n: int = 240, genes: int = 60, seed: int = 0) -> ad.AnnData:
    """Type ``A`` cells run one of two hidden programs (genes 0-14 or 15-29 raised 6-fold); type ``B`` neither."""
    rng = np.random.default_rng(seed)
    cell_type = np.repeat(["A", "B"], [2 * n // 3, n - 2 * n // 3])
    program = np.where(cell_type == "A", rng.integers(0, 2, n), -1)
    mean = np.tile(rng.gamma(2.0, 1.0, size=genes), (n, 1))
    mean[program == 0, :15] *= 6.0
    mean[program == 1, 15:30] *= 6.0
    x = sp.csr_matrix(rng.poisson(mean).astype(np.float32))
    obs = pd.DataFrame({"cell_type": pd.Categorical(cell_type), "program": program}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(genes)]))


def _scores(x) -> tuple[np.ndarray, np.ndarray]:
    x = np.log1p(np.asarray(sp.csr_matrix(x).todense()))
    return x[:, :15].mean(1), x[:, 15:30].mean(1)


def test_states_find_hidden_programs_and_draw_per_condition():
    a = _two_programs()
    counts = sp.csr_matrix(a.X)
    cond = (a.obs["cell_type"].cat.codes.to_numpy() + 1)[:, None].astype(np.int64)  # ids 1 (A), 2 (B)
    st = CellState.fit(counts, cond, n_states=3, seed=0)
    ids = st.ids(counts)
    assert st.n_states == 3 and ids.min() >= 1 and ids.max() <= 3
    for p in (0, 1, -1):  # each program (and type B) sits in one state of its own
        own = ids[a.obs["program"].to_numpy() == p]
        assert np.mean(own == np.bincount(own).argmax()) > 0.95
    assert len({np.bincount(ids[a.obs["program"].to_numpy() == p]).argmax() for p in (0, 1, -1)}) == 3
    back = CellState.from_state(json.loads(json.dumps(st.state_dict())))
    np.testing.assert_array_equal(back.ids(counts), ids)
    rng = np.random.default_rng(1)
    drawn_b = st.draw(np.full((200, 1), 2), rng)
    assert set(drawn_b) == set(ids[cond[:, 0] == 2])  # B's states only
    drawn_a = st.draw(np.full((400, 1), 1), rng)
    assert set(drawn_a) == set(ids[cond[:, 0] == 1]) and 0.3 < np.mean(drawn_a == drawn_a[0]) < 0.7
    assert set(st.draw(np.zeros((300, 1), dtype=np.int64), rng)) == set(ids)  # null label: any state
    assert np.all(st.draw(np.full((5, 1), 3), rng) == 0)  # a label no training cell has: the null state


def test_cell_states_restore_within_type_programs_and_survive_save_load(tmp_path):
    a = _two_programs()
    cfg = preset("tiny")
    model = LingshuModel(a, context_keys=["cell_type"], config=ModelConfig(**{**vars(cfg.model), "cell_states": 4}))
    assert model.states is not None and model.denoiser.n_cond == 3  # cell type, state, library size
    model.train(max_steps=150)
    sim = model.simulate(pd.DataFrame({"cell_type": ["A"] * 300}), steps=8, seed=3)
    s0, s1 = _scores(sim.X)
    r0, r1 = _scores(a[a.obs["cell_type"] == "A"].X)
    # real A cells run one program or the other: the two scores are strongly anti-correlated
    assert np.corrcoef(r0, r1)[0, 1] < -0.8
    assert np.corrcoef(s0, s1)[0, 1] < -0.5
    model.save(tmp_path / "m")
    back = LingshuModel.load(tmp_path / "m")
    again = back.simulate(pd.DataFrame({"cell_type": ["A"] * 300}), steps=8, seed=3)
    np.testing.assert_array_equal(again.X.toarray(), sim.X.toarray())


def test_guided_and_counterfactual_draws_use_the_null_state():
    a = _two_programs(n=90)
    model = LingshuModel(a, context_keys=["cell_type"], config=ModelConfig(**{**vars(preset("tiny").model),
                                                                              "cell_states": 4}))
    cond = np.ones((6, 1), dtype=np.int64)
    plain, _ = model._with_extras(cond, None, None, seed=0)
    assert plain.shape == (6, 3) and np.all(plain[:, 1] >= 1)  # cell type, drawn state, library bin
    guided, ref = model._with_extras(cond, np.zeros_like(cond), None, seed=0)
    assert np.all(guided[:, 1] == 0) and np.all(ref[:, 1] == 0)
    start = sp.csr_matrix(a.X[:6])
    counterfactual, _ = model._with_extras(cond, None, start, seed=0)
    assert np.all(counterfactual[:, 1] == 0)
    np.testing.assert_array_equal(counterfactual[:, 2], model.library.ids(start))
