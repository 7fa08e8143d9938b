"""The masked-diffusion objective and the denoiser's structure."""

import pytest
import torch

from lingshu.config import ModelConfig
from lingshu.denoiser import Denoiser
from lingshu.diffusion import diffusion_loss, drop_conditions, mask_tokens, sample_t
from lingshu.tokenizer import MASK_ID


def _model(n_genes=50, vocab=(3, 2), **kw):
    torch.manual_seed(0)
    return Denoiser(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, gene_dim=4, group_size=8, **kw),
                    n_genes, list(vocab))


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_masking_rate_matches_t(t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 281, (64, 500))
    xt, mask = mask_tokens(x0, torch.full((64,), t), g)
    assert abs(mask.float().mean().item() - t) < 0.01
    assert torch.equal(xt[mask], torch.full_like(xt[mask], MASK_ID))
    assert torch.equal(xt[~mask], x0[~mask])


def test_low_discrepancy_times_cover_the_interval():
    g = torch.Generator().manual_seed(0)
    t = sample_t(100, g, torch.device("cpu"))
    assert t.min() >= 1e-3 and t.max() <= 1.0
    counts = torch.histc(t, bins=10, min=0, max=1)
    assert torch.all(counts == 10)  # one per stratum of width 1/100 -> exactly 10 per tenth


def test_loss_is_weighted_ce_on_masked_genes_only():
    m = _model()
    with torch.no_grad():  # per-gene parameters away from their zero start and large outputs: gene order matters
        for p in (m.gene_emb, m.gene_out, m.gene_bias, m.group_out.weight):
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    x0 = torch.randint(0, 281, (8, 50))
    cond = torch.randint(0, 2, (8, 2))
    t = torch.linspace(0.1, 0.9, 8)
    loss, stats = diffusion_loss(m, x0, cond, torch.Generator().manual_seed(5), t=t)
    xt, mask = mask_tokens(x0, t, torch.Generator().manual_seed(5))
    with torch.no_grad():
        logp = torch.log_softmax(m(xt, cond), -1)  # (B, G, V) over every gene
    ce = -logp.gather(-1, x0[..., None]).squeeze(-1)  # (B, G)
    expected = (ce * mask / t[:, None]).sum() / ce.numel()  # unmasked genes contribute nothing
    assert torch.isfinite(loss) and loss > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["mask_rate"].item() == pytest.approx(mask.float().mean().item())


def test_masked_positions_only_enter_the_head():
    m = _model()
    seen = []
    m.head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
    x0 = torch.randint(0, 281, (4, 50))
    t = torch.full((4,), 0.25)
    diffusion_loss(m, x0, torch.zeros(4, 2, dtype=torch.long), torch.Generator().manual_seed(1), t=t)
    _, mask = mask_tokens(x0, t, torch.Generator().manual_seed(1))
    assert seen == [int(mask.sum())] and seen[0] < 4 * 50


def test_condition_dropout_uses_null_id():
    g = torch.Generator().manual_seed(0)
    cond = torch.ones(10000, 2, dtype=torch.long)
    out = drop_conditions(cond, 0.2, g)
    assert set(out.unique().tolist()) == {0, 1}
    assert abs((out == 0).float().mean().item() - 0.2) < 0.02


def test_denoiser_groups_pads_and_unpermutes():
    m = _model(n_genes=50)  # 50 genes, groups of 8 -> 7 tokens, 6 padded slots
    assert m.n_groups == 7 and m.n_pad == 6
    assert sorted(m.perm.tolist()) == list(range(50))
    x = torch.randint(0, 281, (2, 50))
    out = m(x, torch.zeros(2, 2, dtype=torch.long))
    assert out.shape == (2, 50, 281)
    # changing one gene's input changes predictions of other genes (bidirectional attention)
    x2 = x.clone()
    x2[:, 0] = (x2[:, 0] + 7) % 281
    assert not torch.allclose(m(x2, torch.zeros(2, 2, dtype=torch.long))[:, 1:], out[:, 1:])


def test_conditions_change_predictions():
    m = _model()
    x = torch.full((1, 50), MASK_ID)
    a = m(x, torch.tensor([[1, 1]]))
    b = m(x, torch.tensor([[2, 1]]))
    assert not torch.allclose(a, b)


def test_paper_preset_size():
    from lingshu.config import PRESETS
    m = Denoiser(PRESETS["paper"].model, 18080, [10, 50])
    n_block = sum(p.numel() for p in m.blocks.parameters())
    assert 80e6 < n_block < 90e6  # the published ~85M parameters in the blocks
    assert m.n_groups == 565  # 18,080 genes / 32


def test_subsampled_loss_is_unbiased_and_bounded():
    from lingshu.diffusion import subsample_mask
    m = _model(n_genes=200)
    x0 = torch.randint(0, 5, (6, 200))
    cond = torch.zeros(6, 2, dtype=torch.long)
    t = torch.full((6,), 0.6)
    full, _ = diffusion_loss(m, x0, cond, torch.Generator().manual_seed(0), t=t)
    seen = []
    h = m.head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
    est = torch.stack([diffusion_loss(m, x0, cond, torch.Generator().manual_seed(0), t=t, loss_genes=20)[0]
                       for _ in range(1)])
    h.remove()
    assert seen == [6 * 20]  # the head ran on exactly the budget
    # averaged over subsamples (same masks, different subsets) the estimate matches the full loss
    g = torch.Generator().manual_seed(0)
    _, mask = mask_tokens(x0, t, torch.Generator().manual_seed(0))
    ests = []
    for _ in range(300):
        kept, ratio = subsample_mask(mask, 20, g)
        assert torch.all(kept.sum(1) == 20) and torch.all(kept <= mask)
        ests.append(kept.float() * ratio[:, None])  # (B, G) weight each gene gets in this draw
    mean_w = torch.stack(ests).mean(0)
    # every masked gene is scored with expected weight 1 (uniform inclusion), unmasked never
    assert torch.all(mean_w[~mask] == 0)
    assert torch.allclose(mean_w[mask], torch.ones_like(mean_w[mask]), atol=0.6)
    assert abs(mean_w[mask].mean().item() - 1) < 0.02
    assert torch.isfinite(est).all() and abs(est.item() - full.item()) / full.item() < 0.5


def test_nonzero_favoured_subsample_scores_expressed_genes_and_stays_unbiased():
    from lingshu.diffusion import subsample_mask_nonzero
    g = torch.Generator().manual_seed(0)
    # sparse cells: ~8% of 3,000 genes expressed, as in a whole-transcriptome profile
    x0 = (torch.rand(5, 3000, generator=g) < 0.08).long() * torch.randint(1, 40, (5, 3000), generator=g)
    mask = torch.rand(5, 3000, generator=g) < torch.tensor([0.1, 0.3, 0.5, 0.8, 1.0])[:, None]
    expressed = mask & (x0 != 0)
    weights, counts = [], []
    for _ in range(400):
        kept, w = subsample_mask_nonzero(mask, x0, 256, 0.75, generator=g)
        assert torch.all(kept <= mask) and torch.all((w > 0) == kept)
        weights.append(w)
        counts.append(kept.sum(1).float())
    mean_w = torch.stack(weights).mean(0)
    # Horvitz-Thompson: every masked gene has expected weight 1, so any loss sum is unbiased
    assert torch.all(mean_w[~mask] == 0)
    assert abs(mean_w[mask].mean().item() - 1) < 0.02
    assert abs(mean_w[mask & (x0 == 0)].mean().item() - 1) < 0.03 and abs(mean_w[expressed].mean().item() - 1) < 0.02
    # about the budget per cell; in cells with fewer expressed masked genes than 3/4 of it, every one is scored
    assert torch.all((torch.stack(counts).mean(0) - 256).abs() < 8)
    kept, w = subsample_mask_nonzero(mask, x0, 256, 0.75, generator=g)
    few = expressed.sum(1) <= 192
    assert 0 < few.sum() < 5
    assert torch.all(kept[few][expressed[few]]) and torch.all(w[few][expressed[few]] == 1)
    assert not torch.all(kept[~few][expressed[~few]])  # above 3/4 of the budget they are subsampled too
    # under the budget: every masked gene, weight 1
    small = mask & (torch.arange(3000) < 200)
    kept, w = subsample_mask_nonzero(small, x0, 256, 0.75, generator=g)
    assert torch.equal(kept, small) and torch.equal(w, small.float())
