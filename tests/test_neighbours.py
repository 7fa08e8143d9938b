"""Composed guidance over neighbour contexts: which contexts stand in, and how their effects combine."""

import numpy as np
import pytest
import torch

from lingshu import LingshuError, LingshuModel
from lingshu.neighbours import neighbour_pairs
from lingshu.sampler import composed_log_probs, expected_values
from tests.conftest import make_counts, record_packed_conditions

CTRL, STIM, OTHER = 1, 2, 3
# rows: context id, perturbation id, cell count; context 3 was never seen stimulated, 5 never at all
FREQ = [[1, CTRL, 10], [1, STIM, 10], [2, CTRL, 10], [2, STIM, 10], [3, CTRL, 10], [4, CTRL, 10], [4, STIM, 10],
        [1, OTHER, 10]]
PROFILES = {1: [0.0, 1.0, 3.0, 2.0], 2: [1.0, 2.0, 2.5, 3.5], 3: [1.0, 2.0, 3.0, 4.0], 4: [1.1, 2.0, 3.1, 3.9],
            5: [4.0, 3.0, 2.0, 1.0]}


def _model():
    return LingshuModel(make_counts(), context_keys=["cell_type"], perturbation_key="condition", control="control",
                        preset="tiny")


def _profiles(contexts):
    return np.array([PROFILES[int(c[0])] for c in contexts])


def _pairs(cond, k, min_similarity=None):
    cond = np.asarray(cond, dtype=np.int64)
    ref = cond.copy()
    ref[:, 1] = CTRL
    free = (cond.copy(), ref.copy())
    free[0][:, 0] = 0
    free[1][:, 0] = 0
    return neighbour_pairs(cond, ctx_cols=[0], pert_col=1, control_id=CTRL, frequencies=FREQ,
                           profiles=_profiles, k=k, fallback=free, min_similarity=min_similarity)


def test_neighbours_are_the_most_similar_contexts_seen_with_the_perturbation_and_the_control():
    # column 2 stands for an extra condition column (a library-size bin): carried over unchanged
    pairs = _pairs([[3, STIM, 7], [3, STIM, 8]], k=2)
    assert len(pairs) == 4
    (p1, c1), (p2, c2) = pairs[:2], pairs[2:]
    assert (p1[:, 0] == 4).all() and (c1[:, 0] == 4).all()  # 4 correlates best with 3 (3 itself was never stimulated)
    assert (p2[:, 0] == 2).all() and (c2[:, 0] == 2).all()
    assert (p1[:, 1] == STIM).all() and (c1[:, 1] == CTRL).all()
    assert list(p1[:, 2]) == [7, 8] and list(c2[:, 2]) == [7, 8]


def test_fewer_eligible_contexts_repeat_nearest_first_and_none_keeps_the_context_free_pair():
    pairs = _pairs([[3, STIM, 0], [5, OTHER, 0], [2, 9, 0]], k=4)
    contexts = [pairs[2 * j][0, 0] for j in range(4)]
    assert contexts == [4, 2, 1, 4]  # three contexts saw STIM and the control: ranked, then repeated
    assert all(pairs[2 * j][1, 0] == 1 for j in range(4))  # only context 1 saw OTHER
    assert all(pairs[2 * j][2, 0] == 0 for j in range(4))  # nobody saw perturbation 9: context-free
    assert all(pairs[2 * j][2, 1] == 9 and pairs[2 * j + 1][2, 1] == CTRL for j in range(4))


def test_min_similarity_leaves_out_dissimilar_neighbours_but_never_the_nearest():
    # context 3's profile correlates with 4's ~1.0, with 2's 0.99 and with 1's 0.80
    kept = _pairs([[3, STIM, 0]], k=4, min_similarity=0.9)
    assert [kept[2 * j][0, 0] for j in range(4)] == [4, 2, 4, 2]  # 1 left out; the two left take turns
    only = _pairs([[3, STIM, 0]], k=3, min_similarity=1.0)  # nobody reaches 1.0: the nearest alone
    assert [only[2 * j][0, 0] for j in range(3)] == [4, 4, 4]
    loose = _pairs([[3, STIM, 0]], k=3, min_similarity=0.5)
    assert [loose[2 * j][0, 0] for j in range(3)] == [4, 2, 1]  # the same as without a threshold
    assert [p[0, 0] for p in loose] == [p[0, 0] for p in _pairs([[3, STIM, 0]], k=3)]


def test_a_seen_combination_is_its_own_nearest_neighbour():
    pairs = _pairs([[2, STIM, 0], [1, STIM, 0]], k=1)
    assert list(pairs[0][:, 0]) == [2, 1] and list(pairs[1][:, 0]) == [2, 1]


def test_composed_log_probs_average_the_neighbour_effects():
    ctrl, p1, b1, p2, b2 = torch.randn(5, 4, 281)

    def lsm(z):
        return torch.log_softmax(z.double(), -1)

    got = composed_log_probs(ctrl, [p1, p2], [b1, b2], 0.5)
    want = lsm(ctrl) + 1.5 * ((lsm(p1) - lsm(b1)) + (lsm(p2) - lsm(b2))) / 2
    assert torch.allclose(got, want)
    assert torch.equal(composed_log_probs(ctrl, [p1], [b1], 0.5), composed_log_probs(ctrl, p1, b1, 0.5))
    weighted = composed_log_probs(ctrl, [p1, p2], [b1, b2], 0.5, weights=[0.75, 0.25])
    assert torch.allclose(weighted, lsm(ctrl) + 1.5 * (0.75 * (lsm(p1) - lsm(b1)) + 0.25 * (lsm(p2) - lsm(b2))))
    assert torch.allclose(composed_log_probs(ctrl, [p1, p2], [b1, b2], 0.5, weights=[0.5, 0.5]), got)
    assert torch.allclose(composed_log_probs(ctrl, [p1, p2], [b1, b2], 0.5, weights=[0.0, 1.0]),
                          composed_log_probs(ctrl, p2, b2, 0.5))


def test_expected_values_are_the_mean_of_the_predicted_values():
    m = _model()
    m.train(max_steps=30, device="cpu")
    cond = torch.tensor([[1, 1, 0], [2, 1, 0]])  # A and B at the control, library bin null
    ones = expected_values(m.denoiser, cond, torch.ones(281, dtype=torch.float64))
    assert ones.shape == (2, 60) and torch.allclose(ones, torch.ones_like(ones))
    mean = expected_values(m.denoiser, cond, torch.arange(281, dtype=torch.float64))
    assert (mean[1, :15].mean() > 1.5 * mean[0, :15].mean())  # type B raises genes 0-14 four-fold


def test_predict_with_neighbours_takes_each_seen_context_s_own_effect():
    m = _model()
    src = make_counts(n_cells=6, seed=3)
    seen = record_packed_conditions(m)
    out = m.predict(src, ["stim"], steps=2, seed=0, guidance_scale=0.0, guidance_reference="composed", neighbours=1)
    assert out.uns["lingshu"]["neighbours"] == 1
    cond = [c for c in seen if len(c) == 3 * src.n_obs][0]  # (context at control, neighbour at stim, at control)
    ctrl, pert1, base1 = cond.chunk(3)
    stim_id = m.vocab.labels["condition"].index("stim") + 1
    assert torch.equal(pert1[:, 0], ctrl[:, 0]) and torch.equal(base1[:, 0], ctrl[:, 0])  # A and B both seen
    assert (pert1[:, 1] == stim_id).all() and torch.equal(base1[:, 1], ctrl[:, 1])
    with pytest.raises(LingshuError, match="neighbours"):
        m.predict(src, ["stim"], steps=1, guidance_reference="control", neighbours=2)
    for bad in ({"min_similarity": 0.8}, {"neighbours": 2, "min_similarity": 1.5}):
        with pytest.raises(LingshuError, match="min_similarity"):
            m.predict(src, ["stim"], steps=1, guidance_reference="composed", **bad)
    out = m.predict(src, ["stim"], steps=1, seed=0, guidance_scale=0.0, guidance_reference="composed", neighbours=2,
                    min_similarity=0.5)
    assert out.uns["lingshu"]["min_similarity"] == 0.5 and "min_similarity" not in m.predict(
        src, ["stim"], steps=1, guidance_reference="composed", neighbours=2).uns["lingshu"]


def test_global_weight_mixes_the_context_free_effect_into_the_neighbours():
    m = _model()
    m.train(max_steps=30, device="cpu")
    src = make_counts(n_cells=12, seed=3)
    src = src[src.obs["condition"] == "control"].copy()
    kw = dict(steps=2, seed=0, guidance_scale=0.0, guidance_reference="composed", mask_fraction=1.0,
              coupling="quantile")
    pooled = m.predict(src, ["stim"], **kw)
    own = m.predict(src, ["stim"], neighbours=1, **kw)
    assert (own.X != pooled.X).nnz > 0  # each cell type's own effect differs from the pooled one
    seen = record_packed_conditions(m)
    mixed = m.predict(src, ["stim"], neighbours=1, global_weight=0.25, **kw)
    assert mixed.uns["lingshu"]["global_weight"] == 0.25 and "global_weight" not in own.uns["lingshu"]
    cond = [c for c in seen if len(c) == 5 * src.n_obs][-1]  # context at control, neighbour pair, free pair
    _, pert1, base1, pert_free, base_free = cond.chunk(5)
    assert (pert_free[:, 0] == 0).all() and (base_free[:, 0] == 0).all()  # context key null
    assert torch.equal(pert_free[:, 1], pert1[:, 1]) and torch.equal(base_free[:, 1], base1[:, 1])
    # weight 1: the context-free effect alone, as without neighbours; weight 0: the neighbours alone
    only_free = m.predict(src, ["stim"], neighbours=1, global_weight=1.0, **kw)
    assert (only_free.X != pooled.X).nnz <= 0.01 * np.prod(pooled.shape)
    assert (m.predict(src, ["stim"], neighbours=1, global_weight=0.0, **kw).X != own.X).nnz == 0
    for bad in ({"global_weight": 0.5}, {"neighbours": 1, "global_weight": 1.5}):
        with pytest.raises(LingshuError, match="global_weight"):
            m.predict(src, ["stim"], steps=1, guidance_reference="composed", **bad)
