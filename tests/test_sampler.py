"""The reverse process: no MASK left, reproducible, guidance, prior injection, skipped steps."""

import numpy as np
import pytest
import torch

from lingshu.config import ModelConfig, SampleConfig
from lingshu.denoiser import Denoiser
from lingshu.sampler import sample_tokens
from lingshu.tokenizer import MASK_ID


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    return Denoiser(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, gene_dim=4, group_size=8), 40, [2, 3])


def _run(m, n=12, steps=5, seed=0, w=0.0, ref=True, order="random", init=None, gate=0.0):
    cond = torch.tensor([[1, 2]] * n)
    r = torch.tensor([[1, 1]] * n) if ref else None
    init = torch.full((n, 40), MASK_ID) if init is None else init
    cfg = SampleConfig(steps=steps, seed=seed, guidance_scale=w, order=order, batch_size=5, guidance_gate=gate)
    return sample_tokens(m, cond, init, cfg, ref=r)


@pytest.mark.parametrize("order", ["random", "confidence"])
def test_no_mask_left_and_reproducible(denoiser, order):
    a = _run(denoiser, order=order)
    assert not (a == MASK_ID).any() and a.min() >= 0 and a.max() < 281
    assert torch.equal(a, _run(denoiser, order=order))
    assert not torch.equal(a, _run(denoiser, seed=1, order=order))


def test_zero_guidance_equals_plain_conditional(denoiser):
    assert torch.equal(_run(denoiser, w=0.0, ref=True), _run(denoiser, w=0.0, ref=False))


def test_guidance_changes_samples(denoiser):
    assert not torch.equal(_run(denoiser, w=3.0), _run(denoiser, w=0.0))


def test_prior_injection_is_never_remasked(denoiser):
    init = torch.full((12, 40), MASK_ID)
    init[:, [3, 17]] = torch.tensor([1, 42])
    out = _run(denoiser, init=init)
    assert torch.all(out[:, 3] == 1) and torch.all(out[:, 17] == 42)


def test_steps_that_reveal_nothing_skip_the_denoiser(denoiser):
    calls = []
    h = denoiser.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    init = torch.full((5, 40), 0)
    init[:, :2] = MASK_ID  # 2 genes to reveal over 10 steps: most steps reveal nothing
    _run(denoiser, n=5, steps=10, init=init)
    h.remove()
    assert 0 < len(calls) <= 2


def test_guided_logits_follow_the_formula():
    from lingshu.sampler import guided_log_probs
    lc, lr = torch.randn(3, 281), torch.randn(3, 281)
    g = guided_log_probs(lc, lr, 2.0)
    expected = torch.log_softmax(lr.double(), -1) + 3.0 * (torch.log_softmax(lc.double(), -1) - torch.log_softmax(lr.double(), -1))
    assert g.dtype == torch.float64 and torch.allclose(g, expected)


def test_gated_guidance_guides_only_the_genes_the_condition_moves():
    from lingshu.sampler import guided_log_probs
    from lingshu.tokenizer import token_midpoints
    lr = torch.randn(2, 281) * 0.1
    lr[:, :3] += 8.0  # the reference: counts 0-2
    lc = lr.clone()
    lc[0, 0] += 0.01  # row 0: the condition barely moves the mean log1p count
    lc[1, 20] += 10.0  # row 1: it moves the mass to 20 counts
    v = torch.from_numpy(np.log1p(token_midpoints()))
    shift = torch.softmax(lc.double(), -1) @ v - torch.softmax(lr.double(), -1) @ v
    assert abs(shift[0]) < 0.01 < 0.5 < abs(shift[1])
    full, cond = guided_log_probs(lc, lr, 2.0), guided_log_probs(lc, lr, 0.0)
    gated = guided_log_probs(lc, lr, 2.0, gate=0.1)
    assert torch.equal(gated[0], cond[0]) and torch.equal(gated[1], full[1])
    assert torch.equal(guided_log_probs(lc, lr, 2.0, gate=0.0), full)  # 0: the published, every gene guided


def test_a_gate_no_gene_passes_samples_the_plain_conditional(denoiser):
    plain = _run(denoiser, w=0.0)
    assert torch.equal(_run(denoiser, w=3.0, gate=1e6), plain)
    assert not torch.equal(_run(denoiser, w=3.0, gate=1e-9), plain)


@pytest.mark.parametrize("kw, message", [({"guidance_gate": -0.1}, "finite number >= 0"),
                                         ({"guidance_gate": float("inf")}, "finite number >= 0"),
                                         ({"guidance_gate": 0.1, "guidance_reference": "composed"}, "not composed"),
                                         ({"guidance_scale": float("nan")}, "guidance_scale must be a finite"),
                                         ({"guidance_scale": float("-inf")}, "guidance_scale must be a finite")])
def test_bad_guidance_settings_are_refused(kw, message):
    """NaN guidance used to give every gene the overflow token (10,000 counts) instead of an error."""
    from lingshu.errors import LingshuError
    with pytest.raises(LingshuError, match=message):
        SampleConfig(**kw)


def test_draws_follow_the_categorical():
    from lingshu.sampler import categorical_draw
    p = torch.tensor([0.7, 0.2, 0.1, 0.0], dtype=torch.float64)
    draws = categorical_draw((p.log() + 5.0).expand(20000, 4), torch.Generator().manual_seed(0))  # unnormalised
    assert draws.max() < 3  # a zero-probability category is never drawn
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert torch.allclose(freq, p, atol=0.015)


def test_composed_guidance_follows_the_formula_and_reduces_to_the_control_for_the_control():
    from lingshu.sampler import composed_log_probs
    lctrl, lp, lb = torch.randn(3, 281), torch.randn(3, 281), torch.randn(3, 281)
    g = composed_log_probs(lctrl, lp, lb, 1.0)

    def lsm(z):
        return torch.log_softmax(z.double(), -1)

    assert g.dtype == torch.float64 and torch.allclose(g, lsm(lctrl) + 2.0 * (lsm(lp) - lsm(lb)))
    # perturbation = control in the context-free pair: the context's own control cells, whatever w
    assert torch.allclose(composed_log_probs(lctrl, lb, lb, 3.0), lsm(lctrl))


def test_composed_sampling_uses_the_context_free_pair(denoiser):
    n = 12
    init = torch.full((n, 40), MASK_ID)
    ref = torch.tensor([[1, 1]] * n)  # same context, control
    pert0, base0 = torch.tensor([[0, 2]] * n), torch.tensor([[0, 1]] * n)  # context null
    cfg = SampleConfig(steps=5, seed=0, guidance_scale=0.0, guidance_reference="composed", batch_size=5)
    composed = sample_tokens(denoiser, ref, init, cfg, ref=ref, pooled=(pert0, base0))
    assert not (composed == MASK_ID).any()
    # with the pair equal, composed sampling is plain sampling of the context at the control
    same = sample_tokens(denoiser, ref, init, cfg, ref=ref, pooled=(base0, base0))
    plain = sample_tokens(denoiser, ref, init, SampleConfig(steps=5, seed=0, batch_size=5))
    assert torch.equal(same, plain) and not torch.equal(composed, plain)
    with pytest.raises(ValueError, match="needs ref"):
        sample_tokens(denoiser, ref, init, cfg, pooled=(pert0, base0))


@pytest.mark.parametrize("w", [0.0, 1.5])
def test_step_log_probs_are_the_denoisers_at_every_position(w):
    """The sampler reads features at the drawn positions only; they must be the full forward's."""
    from lingshu.sampler import _log_prob_fn, guided_log_probs

    torch.manual_seed(1)
    m = Denoiser(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, gene_dim=4, group_size=8), 40, [2, 3])
    with torch.no_grad():  # per-gene parameters off their zero start so a wrong gene order shows
        for p in (m.gene_emb, m.gene_out, m.gene_bias, m.group_out.weight):
            p.normal_(0.0, 0.5)
    x = torch.randint(0, 281, (3, 40)).masked_fill(torch.rand(3, 40) < 0.5, MASK_ID)
    cond, ref = torch.tensor([[1, 2]] * 3), torch.tensor([[1, 1]] * 3)
    rows, cols = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 39, 17, 5, 38])
    with torch.no_grad():
        got = _log_prob_fn(m, x, cond, ref, w, None)(rows, cols)
        want = guided_log_probs(m(x, cond)[rows, cols], m(x, ref)[rows, cols], w)
    norm = lambda z: torch.log_softmax(z.double(), -1)  # noqa: E731  (draws normalise; w = 0 returns logits)
    assert torch.allclose(norm(got), norm(want), atol=1e-5)


def test_quantile_transport_carries_the_source_distribution_to_the_target():
    from lingshu.sampler import _transport_at
    src_p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    tgt_p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    observed = torch.multinomial(src_p, n, replacement=True, generator=gen)
    rows, cols = torch.arange(n), torch.zeros(n, dtype=torch.long)
    out = _transport_at(lambda r, c: tgt_p.log().expand(len(r), 4), lambda r, c: src_p.log().expand(len(r), 4),
                        observed, rows, cols, gen, chunk=4096)
    freq = torch.bincount(out, minlength=4).double() / n
    assert torch.allclose(freq, tgt_p, atol=0.015)  # observed ~ source -> new values ~ target
    # monotone: a higher observed value never maps below a lower one
    for lo_v, hi_v in [(0, 1), (1, 2)]:
        assert out[observed == lo_v].max() <= out[observed == hi_v].min()


def test_quantile_transport_to_the_source_itself_returns_the_observed_cells(denoiser):
    from lingshu.sampler import transport_tokens
    gen = torch.Generator().manual_seed(1)
    observed = torch.randint(0, 281, (12, 40), generator=gen)
    regen = torch.rand((12, 40), generator=gen) < 0.7
    init = observed.masked_fill(regen, MASK_ID)
    cond = torch.tensor([[1, 2]] * 12)
    out = transport_tokens(denoiser, cond, cond, init, observed, SampleConfig(seed=0, batch_size=5))
    assert torch.equal(out, observed)
    other = transport_tokens(denoiser, torch.tensor([[2, 1]] * 12), cond, init, observed,
                             SampleConfig(seed=0, batch_size=5))
    assert torch.equal(other[~regen], observed[~regen]) and not torch.equal(other[regen], observed[regen])
    init[:, 3] = 0  # a prior-injected gene stays at its value
    assert torch.all(transport_tokens(denoiser, cond, cond, init, observed, SampleConfig(seed=0))[:, 3] == 0)
