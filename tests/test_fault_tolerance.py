"""A run that survives faults: SIGKILL mid-training then ``--resume``, interrupted checkpoint
writes, damaged or hostile files in a model directory."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import make_counts
from lingshu import LingshuModel
from lingshu import checkpoint as ckpt
from lingshu.errors import LingshuError

CFG = "[train]\nbatch_size = 16\nwarmup_steps = 2\ncheckpoint_every = 5\nval_every = 10\n"


def _cmd(tmp_path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "train", "--in", str(tmp_path / "cells.h5ad"), "--out",
            str(tmp_path / out), "--context-key", "cell_type", "--max-steps", "60", "--device", "cpu",
            "--config", str(tmp_path / "cfg.toml"), "--quiet", *extra]


def _step(run) -> int:
    try:
        return json.loads((run / "lingshu.json").read_text())["training"]["step"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_then_resume_reaches_the_uninterrupted_weights(tmp_path):
    make_counts(n_cells=160, n_genes=50).write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "cfg.toml").write_text(CFG)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = subprocess.run(_cmd(tmp_path, "full"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tmp_path, "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _step(run) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _step(run)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 10 <= killed_at < 60

    resumed = subprocess.run(_cmd(tmp_path, "killed", "--resume"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _step(run) == 60
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    sa = load_file(str(tmp_path / "full" / ckpt.TRAINER_STATE))
    sb = load_file(str(run / ckpt.TRAINER_STATE))
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k


@pytest.fixture
def saved(tmp_path):
    m = LingshuModel(make_counts(n_cells=40, n_genes=20), context_keys=["cell_type"], seed=0)
    m.train(max_steps=2, device="cpu")
    m.save(tmp_path / "run")
    return m, tmp_path / "run"


def _write_staged(run, model, step: int) -> dict:
    """A complete new checkpoint in .next (as a writer killed right before moving it in would leave)."""
    weights = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.denoiser.state_dict().items()}
    stage_parent = run.parent / "staged"
    ckpt.write_checkpoint(stage_parent, dict(model._manifest(None), training={"step": step}), weights)
    (run / ckpt.STAGING).mkdir()
    for f in (ckpt.WEIGHTS, ckpt.MANIFEST):
        (stage_parent / f).rename(run / ckpt.STAGING / f)
    return weights


def test_interrupted_commit_rolls_forward(saved):
    model, run = saved
    weights = _write_staged(run, model, step=99)
    # killed after moving the weights but before the manifest: the directory is inconsistent
    os.replace(run / ckpt.STAGING / ckpt.WEIGHTS, run / ckpt.WEIGHTS)
    loaded = LingshuModel.load(run)
    assert loaded.history["step"] == 99
    for k, v in loaded.denoiser.state_dict().items():
        assert np.array_equal(v.numpy(), weights[k].numpy()), k
    assert not (run / ckpt.STAGING).exists()


def test_incomplete_staging_is_discarded(saved):
    model, run = saved
    (run / ckpt.STAGING).mkdir()
    (run / ckpt.STAGING / ckpt.WEIGHTS).write_bytes(b"half a file")
    loaded = LingshuModel.load(run)
    assert loaded.history["step"] == 2
    assert not (run / ckpt.STAGING).exists()


def test_truncated_weights_are_reported_not_loaded(saved):
    _, run = saved
    data = (run / ckpt.WEIGHTS).read_bytes()
    (run / ckpt.WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(LingshuError, match="truncated or modified"):
        LingshuModel.load(run)


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_never_unpickled(saved, tmp_path):
    _, run = saved
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    for name in ("model.pt", "trainer_state.pt", "optimizer.pkl"):
        (run / name).write_bytes(payload)
    loaded = LingshuModel.load(run)  # works, ignores the pickles
    assert loaded.genes
    evil = tmp_path / "evil.pt"
    evil.write_bytes(payload)
    with pytest.raises(LingshuError, match="never unpickles"):
        LingshuModel.load(evil)
    assert not marker.exists()


def test_manifest_cannot_point_outside_the_run_directory(saved, tmp_path):
    _, run = saved
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    m = json.loads((run / ckpt.MANIFEST).read_text())
    m["files"]["../secret.safetensors"] = {"bytes": 1, "sha256": "0"}
    (run / ckpt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(LingshuError, match="unexpected files"):
        LingshuModel.load(run)
    with pytest.raises(LingshuError, match="not a Lingshu tensor file"):
        ckpt.read_tensors(run, "../secret.safetensors")
