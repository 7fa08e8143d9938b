"""Data-parallel training: ``lingshu train --nproc 2`` (torchrun, gloo on CPU) equals one process.

Both runs see the same global batch of cells and the same noise per step, so the
averaged DDP gradient is the single-process gradient up to float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch.distributed as dist
from safetensors.numpy import load_file

from conftest import make_counts

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def _train(tmp_path, name: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "cli.main", "train", "--in", str(tmp_path / "cells.h5ad"), "--out",
           str(tmp_path / name), "--context-key", "cell_type", "--max-steps", "8", "--device", "cpu",
           "--config", str(tmp_path / "cfg.toml"), "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_gloo_processes_match_one_process(tmp_path):
    make_counts(n_cells=160, n_genes=50).write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "cfg.toml").write_text("[train]\nbatch_size = 16\nwarmup_steps = 2\nval_every = 4\nlog_every = 1\n")
    one = _train(tmp_path, "one")
    two = _train(tmp_path, "two", "--nproc", "2")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # the weights moved: equality is not two untrained copies
    untouched = json.loads((tmp_path / "one" / "lingshu.json").read_text())["training"]
    assert untouched["step"] == 8
    ha = untouched["train_loss"]
    hb = json.loads((tmp_path / "two" / "lingshu.json").read_text())["training"]["train_loss"]
    assert [s for s, _ in ha] == [s for s, _ in hb] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in ha], [v for _, v in hb], rtol=1e-4)
    assert json.loads((tmp_path / "two" / "lingshu.json").read_text())["training"]["cells_seen"] == 8 * 16


def test_nproc_must_be_positive(tmp_path):
    make_counts(n_cells=40, n_genes=20).write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "cfg.toml").write_text("")
    r = _train(tmp_path, "bad", "--nproc", "0")
    assert r.returncode != 0
    assert "--nproc must be >= 1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()
