"""The LingshuModel facade: simulate, save/load, resume, format versions, bad input."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from lingshu import LingshuError, LingshuModel
from lingshu.config import preset
from tests.conftest import make_counts, record_packed_conditions, recorded_logs


def _model(**kw):
    return LingshuModel(make_counts(), context_keys=["cell_type"], perturbation_key="condition",
                        control="control", preset="tiny", **kw)


def test_simulate_returns_integer_counts_and_conditions():
    m = _model()
    m.train(max_steps=5, device="cpu")
    out = m.generate(10, {"cell_type": "B", "condition": "stim"}, steps=4, seed=0)
    assert out.shape == (10, 60) and list(out.var_names) == m.genes
    assert sp.issparse(out.X) and np.all(out.X.data == np.round(out.X.data)) and out.X.data.min() >= 0
    assert set(out.obs["cell_type"]) == {"B"} and set(out.obs["condition"]) == {"stim"}
    assert out.uns["lingshu"]["steps"] == 4


def test_sampling_an_untrained_model_warns(tmp_path):
    m = _model()
    with recorded_logs("lingshu") as records:
        m.generate(2)
    assert ["not been trained" in r.getMessage() for r in records] == [True]
    m.train(max_steps=2, device="cpu")
    m.save(tmp_path / "m")
    with recorded_logs("lingshu") as records:
        m.generate(2)
        LingshuModel.load(tmp_path / "m").generate(2)
    assert not [r for r in records if "not been trained" in r.getMessage()]


@pytest.mark.parametrize("call, message", [
    (lambda m, a: m.generate(2, steps=2.5), "steps must be a whole number >= 1"),
    (lambda m, a: m.generate(2, seed=-1), "seed must be a whole number in"),
    (lambda m, a: m.generate(2, seed=2**70), "seed must be a whole number in"),
    (lambda m, a: m.generate(2, chunk_cells=-1), "chunk_cells must be a whole number >= 1"),
    (lambda m, a: m.generate(2, prior={"G0": -4}), "prior count of 'G0' must be a whole number >= 0"),
    (lambda m, a: m.generate(2, prior={"G0": 2.7}), "prior count of 'G0' must be a whole number >= 0"),
    (lambda m, a: m.generate(2, device="tpu"), "--device must be auto, cpu, cuda or cuda:N"),
    (lambda m, a: m.predict(a[:3], ["stim"], n_per_cell=2.5), "--n-per-cell must be a whole number >= 1"),
])
def test_bad_sampling_arguments_are_one_clear_error(call, message):
    """Each of these used to raise a numpy/torch error, return no cells, or silently round."""
    m = _model()
    m.train(max_steps=2, device="cpu")
    with pytest.raises(LingshuError, match=message.replace("*", r"\*")):
        call(m, make_counts())


def test_predict_takes_one_perturbation_label_as_a_string():
    m = _model()
    m.train(max_steps=2, device="cpu")
    cells = make_counts()[:4]
    one = m.predict(cells, "stim", steps=2, seed=3)
    assert one.obs["condition"].tolist() == ["stim"] * 4
    assert (one.X != m.predict(cells, ["stim"], steps=2, seed=3).X).nnz == 0


@pytest.mark.parametrize("n", [-1, 2.5])
def test_generate_refuses_a_bad_number_of_cells(n):
    m = _model()
    with pytest.raises(LingshuError, match="whole number >= 0"):
        m.generate(n)


def test_a_learning_rate_below_the_default_floor_stays_constant_after_warmup():
    from lingshu import TrainConfig
    from lingshu.trainer import lr_at

    cfg = TrainConfig(max_steps=100, lr=1e-5, warmup_steps=10)  # min_lr keeps its default 2e-5
    rates = [lr_at(s, cfg, 100) for s in range(100)]
    assert max(rates) == pytest.approx(1e-5) and all(r == pytest.approx(1e-5) for r in rates[10:])
    assert lr_at(99, TrainConfig(max_steps=100, lr=1e-3), 100) < 1e-4  # the usual cosine decay is unchanged


def test_training_without_a_progress_bar_logs_progress_lines():
    """Redirected to a log file (no bar), a run still says how far it is, every 5% of the steps."""
    with recorded_logs("lingshu") as records:
        _model().train(max_steps=40, device="cpu", progress=False)
    lines = [r.getMessage() for r in records if "/40 " in r.getMessage()]
    assert [ln.split()[1] for ln in lines] == [f"{k}/40" for k in range(2, 41, 2)]
    assert "loss" in lines[-1] and "cells/s" in lines[-1] and lines[-1].endswith("0:00:00 left")


def test_generate_reproduces_training_proportions():
    m = _model()
    out = m.generate(400, steps=1, seed=0)
    frac_b = (out.obs["cell_type"] == "B").mean()
    assert 0.4 < frac_b < 0.6  # make_counts holds half A, half B


def test_predict_keeps_context_and_source_cells():
    m = _model()
    src = make_counts(n_cells=6, seed=3)
    out = m.predict(src, ["stim"], n_per_cell=2, steps=2, guidance_scale=2.0, seed=0)
    assert out.n_obs == 12
    assert list(out.obs["source_cell"]) == list(np.repeat(src.obs_names, 2))
    assert list(out.obs["cell_type"].astype(str)) == list(np.repeat(src.obs["cell_type"].astype(str), 2))
    assert set(out.obs["condition"]) == {"stim"}
    cf = m.predict(src, ["stim"], steps=2, seed=0, mask_fraction=0.3)
    assert cf.n_obs == 6 and cf.uns["lingshu"]["mask_fraction"] == 0.3


def test_composed_guidance_nulls_only_the_context_keys():
    m = _model()
    src = make_counts(n_cells=6, seed=3)
    seen = record_packed_conditions(m)
    out = m.predict(src, ["stim"], steps=2, seed=0, guidance_scale=1.0, guidance_reference="composed")
    assert out.n_obs == 6 and set(out.obs["condition"]) == {"stim"}
    cond = seen[0]  # one pass over (same context at control, context-free stim, context-free control)
    ctx, pert = m.vocab.keys.index("cell_type"), m.vocab.keys.index("condition")
    ctrl_id, stim_id = (m.vocab.labels["condition"].index(v) + 1 for v in ("control", "stim"))
    ctrl, pert0, base0 = cond.chunk(3)
    assert (ctrl[:, ctx] > 0).all() and (ctrl[:, pert] == ctrl_id).all()
    assert (pert0[:, ctx] == 0).all() and (pert0[:, pert] == stim_id).all()
    assert (base0[:, ctx] == 0).all() and (base0[:, pert] == ctrl_id).all()
    assert torch.equal(ctrl[:, -1], pert0[:, -1])  # the library-size bin is kept in every pass
    unconditioned = LingshuModel(make_counts(), context_keys=["cell_type"], preset="tiny")
    with pytest.raises(LingshuError, match="perturbation key"):
        unconditioned.simulate(src.obs[["cell_type"]], steps=1, guidance_reference="composed")


def test_save_load_gives_identical_samples(tmp_path):
    m = _model()
    m.train(max_steps=5, device="cpu")
    m.save(tmp_path / "run")
    m2 = LingshuModel.load(tmp_path / "run")
    a = m.generate(20, steps=3, seed=7)
    b = m2.generate(20, steps=3, seed=7)
    assert (a.X != b.X).nnz == 0
    assert list(a.obs["cell_type"]) == list(b.obs["cell_type"])


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    from lingshu import TrainConfig
    from lingshu import checkpoint as ckpt

    cfg = TrainConfig(max_steps=8, batch_size=16, checkpoint_every=4, warmup_steps=2, device="cpu")
    full = _model()
    full.train(cfg)
    write = ckpt.write_checkpoint

    def write_then_die(path, manifest, *a, **k):  # the process is killed right after the step-4 checkpoint
        write(path, manifest, *a, **k)
        if manifest["training"]["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_checkpoint", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _model().train(cfg, out_dir=tmp_path / "run")
    monkeypatch.setattr(ckpt, "write_checkpoint", write)
    resumed = _model()
    resumed.train(out_dir=tmp_path / "run", resume=True, device="cpu")
    for (k, a), b in zip(full.denoiser.state_dict().items(), resumed.denoiser.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), k
    assert resumed.history["step"] == 8
    assert resumed.history["train_loss"] == full.history["train_loss"]


def test_training_again_continues_the_run_as_resume_does(tmp_path):
    """``train()`` twice on one model (say, to train longer) is ``--resume --max-steps`` in memory."""
    from lingshu import TrainConfig

    cfg = TrainConfig(max_steps=4, batch_size=16, warmup_steps=2, device="cpu")
    on_disk = _model()
    on_disk.train(cfg, out_dir=tmp_path / "run")
    on_disk.train(out_dir=tmp_path / "run", resume=True, max_steps=8, device="cpu")
    in_memory = _model()
    in_memory.train(cfg)
    before = {k: v.clone() for k, v in in_memory.denoiser.state_dict().items()}
    in_memory.train(max_steps=8)
    assert in_memory.history["step"] == 8 and in_memory.history["train_loss"] == on_disk.history["train_loss"]
    for (k, a), b in zip(on_disk.denoiser.state_dict().items(), in_memory.denoiser.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), k
    assert any(not torch.equal(before[k], v) for k, v in in_memory.denoiser.state_dict().items())
    in_memory.train()  # already at its max_steps: nothing to do, weights unchanged
    assert in_memory.history["step"] == 8
    for (k, a), b in zip(on_disk.denoiser.state_dict().items(), in_memory.denoiser.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), k


def test_training_again_with_a_config_starts_a_new_run_from_the_trained_weights():
    from lingshu import TrainConfig

    trained = _model()
    trained.train(TrainConfig(max_steps=20, batch_size=16, warmup_steps=5, device="cpu"))
    weights = {k: v.clone() for k, v in trained.denoiser.state_dict().items()}
    tiny_step = TrainConfig(max_steps=2, batch_size=16, warmup_steps=1, lr=1e-9, min_lr=0.0, device="cpu", seed=7)
    trained.train(tiny_step)
    assert trained.history["step"] == 2  # a new run: its own history
    after = trained.denoiser.state_dict()
    assert max(float((after[k] - w).abs().max()) for k, w in weights.items()) < 1e-6  # it started from them
    scratch = _model()
    scratch.train(tiny_step)
    assert max(float((scratch.denoiser.state_dict()[k] - w).abs().max()) for k, w in weights.items()) > 1e-2


def test_save_onto_a_file_is_refused_and_leaves_it(tmp_path):
    m = _model()
    m.train(max_steps=2, device="cpu")
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(LingshuError, match="it is a file; give a directory"):
        m.save(target)
    assert target.read_text() == "mine"


def test_load_refuses_other_format_version(tmp_path):
    m = _model()
    m.save(tmp_path / "run")
    manifest = tmp_path / "run" / "lingshu.json"
    d = json.loads(manifest.read_text())
    d["format_version"] = 99
    manifest.write_text(json.dumps(d))
    with pytest.raises(LingshuError, match="format_version 99"):
        LingshuModel.load(tmp_path / "run")


def test_gene_bias_starts_at_the_shared_head_and_is_trained_without_decay():
    cfg = preset("tiny").model
    with_bias = LingshuModel(make_counts(), context_keys=["cell_type"], preset="tiny", config=cfg, seed=0)
    cfg.gene_bias = False
    shared = LingshuModel(make_counts(), context_keys=["cell_type"], preset="tiny", config=cfg, seed=0)
    # step 0: the same cells as the published shared head
    assert (with_bias.generate(20, steps=2, seed=0).X != shared.generate(20, steps=2, seed=0).X).nnz == 0
    with_bias.train(max_steps=5, device="cpu")
    assert with_bias.denoiser.gene_bias.abs().max() > 0  # it learns
    opt = with_bias._trainer.optimizer
    assert any(g["weight_decay"] == 0 and any(p is with_bias._trainer.model.gene_bias for p in g["params"])
               for g in opt.param_groups)


def test_checkpoint_written_before_gene_bias_and_library_size_still_loads(tmp_path):
    cfg = preset("tiny").model
    cfg.gene_bias, cfg.library_bins = False, 0
    m = LingshuModel(make_counts(), context_keys=["cell_type"], preset="tiny", config=cfg)
    m.save(tmp_path / "run")
    manifest = tmp_path / "run" / "lingshu.json"
    d = json.loads(manifest.read_text())
    del d["model_config"]["gene_bias"], d["model_config"]["library_bins"], d["conditions"]["library_size"]
    manifest.write_text(json.dumps(d))  # as written by Lingshu before either existed
    back = LingshuModel.load(tmp_path / "run")
    assert back.model_config.gene_bias is False and back.library is None
    assert (back.generate(5, steps=2, seed=0).X != m.generate(5, steps=2, seed=0).X).nnz == 0


def test_load_detects_truncated_weights(tmp_path):
    m = _model()
    m.save(tmp_path / "run")
    w = tmp_path / "run" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(LingshuError, match="does not match its manifest"):
        LingshuModel.load(tmp_path / "run")


def test_bad_input_messages():
    a = make_counts()
    with pytest.raises(LingshuError, match="available: cell_type, condition"):
        LingshuModel(a, context_keys=["donor"])
    with pytest.raises(LingshuError, match="needs --control"):
        LingshuModel(a, perturbation_key="condition")
    with pytest.raises(LingshuError, match="closest: control"):
        LingshuModel(a, perturbation_key="condition", control="contrl")
    b = a.copy()
    b.layers["counts"] = b.X.copy()
    b.X = b.X.log1p()
    with pytest.raises(LingshuError, match="--layer counts"):
        LingshuModel(b, context_keys=["cell_type"])
    m = _model()
    with pytest.raises(LingshuError, match="never seen in training.*closest: stim"):
        m.predict(make_counts(n_cells=4), ["stimm"])


def test_quantile_counterfactual_keeps_the_source_cells_under_their_own_condition():
    m = _model()
    m.train(max_steps=5, device="cpu")
    src = make_counts(n_cells=8, seed=3)
    src = src[src.obs["condition"] == "control"].copy()
    same = m.predict(src, ["control"], guidance_scale=0.0, mask_fraction=1.0, coupling="quantile", seed=0)
    assert np.array_equal(same.X.toarray(), src.X.toarray())  # counts < 100 decode exactly
    assert same.uns["lingshu"]["coupling"] == "quantile"
    stim = m.predict(src, ["stim"], guidance_scale=0.0, mask_fraction=1.0, coupling="quantile", seed=0, n_per_cell=2)
    assert stim.n_obs == 8 and not np.array_equal(stim.X.toarray()[::2], src.X.toarray())
    with pytest.raises(LingshuError, match="quantile coupling needs start cells"):
        m.predict(src, ["stim"], coupling="quantile")
    with pytest.raises(LingshuError, match="coupling must be one of"):
        m.predict(src, ["stim"], mask_fraction=0.5, coupling="optimal")
