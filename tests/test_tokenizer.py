"""Counts <-> tokens: bin edges, exact round trip below 100, unbiased decoding, JSON state."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lingshu.tokenizer import MASK_ID, N_VALUE_TOKENS, CountTokenizer, encode_values, token_frequencies


@pytest.mark.parametrize("count,token", [(0, 0), (1, 1), (99, 99), (100, 100), (109, 100), (110, 101),
                                         (999, 189), (1000, 190), (1099, 190), (1100, 191), (9999, 279),
                                         (10000, 280), (10 ** 7, 280)])
def test_bin_edges(count, token):
    assert encode_values(np.array([count]))[0] == token


def test_vocabulary_layout():
    assert N_VALUE_TOKENS == 281 and MASK_ID == 281
    assert encode_values(np.arange(20000)).max() == 280


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 50000), min_size=1, max_size=200), st.integers(0, 2 ** 31 - 1))
def test_decode_lands_in_the_encoded_bin(counts, seed):
    c = np.array(counts)
    tok = CountTokenizer().fit(sp.csr_matrix(c[None, :])).encode(c)
    back = CountTokenizer().decode(tok, seed)
    assert np.array_equal(encode_values(back), tok.numpy())  # same bin
    small = c < 100
    assert np.array_equal(back[small], c[small])  # exact below 100
    assert back.dtype == np.int64


def test_sparse_encode_matches_dense_without_densifying_input():
    rng = np.random.default_rng(0)
    dense = rng.poisson(rng.gamma(0.3, 50, size=(50, 40))).astype(np.float32)
    x = sp.csr_matrix(dense)
    assert torch.equal(CountTokenizer().encode(x), CountTokenizer().encode(dense))


def test_fitted_decoder_keeps_pseudobulk_unbiased():
    rng = np.random.default_rng(1)
    # heavy-tailed counts: within a bin, small values are more frequent than large ones
    counts = np.floor(rng.pareto(1.2, size=200000) * 60).astype(np.int64)
    tok = CountTokenizer().fit(sp.csr_matrix(counts[None, :])).encode(counts)
    fitted = CountTokenizer().fit(sp.csr_matrix(counts[None, :]))
    uniform = CountTokenizer()
    big = (counts >= 100) & (counts < 10000)  # the binned range (overflow is a sampled tail)
    true_sum = counts[big].sum()
    fit_sum = fitted.decode(tok, 0)[big].sum()
    uni_sum = uniform.decode(tok, 0)[big].sum()
    assert abs(fit_sum / true_sum - 1) < 0.01
    assert abs(fit_sum / true_sum - 1) < abs(uni_sum / true_sum - 1)


def test_state_is_json_and_round_trips():
    x = sp.csr_matrix(np.array([[0, 150, 2000, 30000, 5]]))
    t = CountTokenizer().fit(x)
    state = json.loads(json.dumps(t.state_dict()))
    t2 = CountTokenizer.from_state(state)
    tok = t.encode(x)
    assert np.array_equal(t.decode(tok, 3), t2.decode(tok, 3))


def test_decode_refuses_mask():
    with pytest.raises(ValueError, match="MASK"):
        CountTokenizer().decode(torch.tensor([[1, MASK_ID]]))


def test_token_frequencies_count_implicit_zeros():
    x = sp.csr_matrix(np.array([[0, 0, 3], [0, 120, 0]], dtype=np.float32))
    f = token_frequencies(x)
    assert f[0] == pytest.approx(4 / 6) and f[3] == pytest.approx(1 / 6) and f[102] == pytest.approx(1 / 6)
