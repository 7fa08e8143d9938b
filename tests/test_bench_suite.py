"""The benchmark suite's process handling: killing the suite must not leave its task processes running."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_task_process_exits_when_the_suite_process_is_killed(tmp_path):
    pid_file = tmp_path / "worker.pid"
    suite = textwrap.dedent(f"""
        import multiprocessing, os, sys, time
        sys.path.insert(0, {str(BENCH)!r})

        def task(path):
            from common import exit_with_parent
            exit_with_parent(interval=0.1)
            open(path, "w").write(str(os.getpid()))
            time.sleep(120)  # a long task

        if __name__ == "__main__":
            multiprocessing.get_context("spawn").Process(target=task, args=({str(pid_file)!r},)).start()
            time.sleep(120)
    """)
    script = tmp_path / "suite.py"
    script.write_text(suite)
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the task process outlived the killed suite"
    finally:
        proc.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_quick_papalexi_targets_leave_out_the_development_folds(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from common import make_profile
    from task_papalexi import pick_targets

    targets = [f"T{i:02d}" for i in range(25)]
    groups = [pick_targets(targets, 5, [o]) for o in range(5)]
    assert sorted(t for g in groups for t in g) == targets  # the five offsets partition the targets
    quick = make_profile("quick")
    reported = pick_targets(targets, quick.papalexi_targets, quick.papalexi_offsets)
    development = set(groups[1]) | set(groups[4])  # the folds sampling settings were chosen on
    assert len(reported) == 15 and not development & set(reported)
    assert pick_targets(targets, 5, [0, 0]) == groups[0]


@pytest.mark.parametrize("argv, message", [
    (["--sample-steps", "0"], "--sample-steps must be >= 1, got 0"),
    (["--cell-states", "-1"], "--cell-states must be >= 0 (0: off), got -1"),
    (["--papalexi-guidance-gate", "nan"], "--papalexi-guidance-gate must be >= 0 (0: off), got nan"),
    (["--papalexi-max-ctrl", "-5"], "--papalexi-max-ctrl must be >= 0 (0: every control cell), got -5"),
    (["--papalexi-offsets", "1,x"], "--papalexi-offsets must be integers separated by commas, got '1,x'"),
    (["--tasks", "kang,foo"], "unknown task(s) foo; choose from kang, papalexi, generation"),
])
def test_suite_refuses_bad_options_in_one_line_before_any_work(tmp_path, argv, message):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--out", str(out), *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in proc.stderr and not out.exists()


def test_issue2_bench_tiers_locate_where_generated_cells_differ(monkeypatch):
    """The per-gene-tier table of ``bench/pbmc3k_generation.py`` blames the tier that was corrupted, not the others."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    monkeypatch.syspath_prepend(str(BENCH))
    from pbmc3k_generation import tier_table

    rng = np.random.default_rng(0)
    mean = np.r_[5.0 + rng.gamma(5.0, 1.0, 500), 0.3 + rng.gamma(2.0, 0.25, 2500), np.full(600, 0.05)]  # 3 tiers

    def cells(m, n=200):
        obs = pd.DataFrame({"cell_type": ["T"] * n}, index=[f"c{i}" for i in range(n)])
        return ad.AnnData(X=sp.csr_matrix(rng.poisson(m, size=(n, len(m))).astype(np.float32)), obs=obs,
                          var=pd.DataFrame(index=[f"G{j}" for j in range(len(m))]))

    train, held = cells(mean), cells(mean)
    wrong = mean.copy()
    wrong[3000:] *= rng.choice([1.0, 10.0], 600)  # the generator over-expresses half of the rarest genes
    tiers = tier_table(held, cells(wrong), train, seed=0).set_index("genes")
    assert list(tiers.index) == ["1,000 HVGs", "mean rank 1-500", "mean rank 501-3,000", "mean rank > 3,000"]
    assert tiers.loc["mean rank > 3,000", "n_genes"] == 600
    assert tiers.loc["mean rank > 3,000", "auc"] > 0.9 and tiers.loc["mean rank > 3,000", "mmd_ratio"] > 3
    for other in ("mean rank 1-500", "mean rank 501-3,000"):  # a little of the change shows through normalisation
        assert tiers.loc[other, "auc"] < 0.7 and tiers.loc[other, "mmd_ratio"] < 2
