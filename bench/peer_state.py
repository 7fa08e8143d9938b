"""STATE (Arc Institute ``arc-state``) as a perturbation peer, run through its ``state`` CLI.

arc-state pulls packages (transformers 5, wandb, click, typing-extensions upgrades, ...) that
would change this environment, so it is meant to live in its own virtual environment that
reuses the system torch::

    python3 -m venv --system-site-packages /tmp/state-venv
    /tmp/state-venv/bin/python -m pip install arc-state -c <(echo torch==2.13.0)
    export STATE_BIN=/tmp/state-venv/bin/state

The suite uses it when ``$STATE_BIN`` (or ``state`` on PATH) exists. Procedure per holdout:

1. the training cells only (never the held-out ones), log1p(CP10k) in ``X`` over the suite's
   genes, become STATE's one data set (TOML: the whole set is ``train``);
2. ``state tx train`` (``model=state_sm``; the quick profile shrinks it to a 2-layer, width-128
   transformer for 2 CPU cores);
3. ``state tx infer`` on each context's control cells plus one placeholder per control cell
   labelled with the held-out perturbation (STATE replaces the placeholders' expression with its
   prediction from sampled controls of the same context);
4. the predicted log1p(CP10k) values become counts with library sizes drawn from that
   context's real control cells: each cell's ``expm1(x)`` profile scaled to its drawn library
   size (``expm1(x) / sum(expm1(x)) * lib``) and rounded stochastically like the ``lingshu
   evaluate`` baselines, so ``lingshu evaluate`` scores them like everything else. STATE's
   outputs are not normalised (trained on log values with a squared error, their ``expm1`` sums
   ranged 850-26,000 around a median of 4,800 per Papalexi cell instead of 10,000), so
   ``expm1(x) * lib / 1e4`` would give most predicted cells a fraction of a real cell's depth.

Workaround: arc-state 0.11.1 loads its own checkpoint with ``torch.load``'s default, which
torch >= 2.6 made ``weights_only=True``; loading then fails on a pickled numpy scalar. The
checkpoint is the one just trained here, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set for
the CLI calls.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lingshu.normalize import log_cp10k

log = logging.getLogger("bench")

SMALL = ["model.kwargs.hidden_dim=128", "model.kwargs.transformer_backbone_kwargs.intermediate_size=512",
         "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=2",
         "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
         "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
         "model.kwargs.transformer_backbone_kwargs.head_dim=32", "model.kwargs.n_encoder_layers=2",
         "model.kwargs.n_decoder_layers=2", "+model.kwargs.decoder_hidden_dims=[256,256]"]


class StateError(RuntimeError):
    """The STATE CLI failed; the message holds the tail of its log."""


def _child_peak_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_cli(cmd: list[str], log_path: Path, env: dict[str, str], timeout: float) -> dict[str, float]:
    """Run ``cmd``; return wall time and the child's peak RSS (polled ``VmHWM``). Raises StateError."""
    import resource

    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = [0.0]
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent)

        def poll():
            while proc.poll() is None:
                v = _child_peak_mb(proc.pid)
                if v:
                    peak[0] = max(peak[0], v)
                time.sleep(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise StateError(f"{' '.join(cmd[:3])} timed out after {timeout:.0f} s (log: {log_path})") from None
        th.join(timeout=1)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
    if rc != 0:
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        raise StateError(f"{' '.join(cmd[:3])} exited {rc}: " + " | ".join(t.strip()[:300] for t in tail))
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak[0] or float("nan")}


def _params(log_path: Path) -> float:
    """Parameter count from the Lightning summary line ``Total params: 4.9 M`` of the training log."""
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}
    for line in log_path.read_text(errors="replace").splitlines():
        if line.strip().startswith("Total params"):
            parts = line.split(":", 1)[1].split()
            try:
                return float(parts[0]) * scale.get(parts[1] if len(parts) > 1 else "", 1)
            except (ValueError, IndexError):
                return float("nan")
    return float("nan")


def _frame(cells, context_key: str, perturbation_key: str):
    import anndata as ad

    obs = pd.DataFrame({context_key: cells.obs[context_key].astype(str).to_numpy(),
                        perturbation_key: cells.obs[perturbation_key].astype(str).to_numpy(),
                        "bench_batch": "b0"}, index=np.asarray(cells.obs_names).astype(str))
    return ad.AnnData(X=log_cp10k(cells.X), obs=obs, var=pd.DataFrame(index=cells.var_names.astype(str)))


def state_predict(exe: str, train, sources: dict[tuple[str, str], object], *, context_key: str,
                  perturbation_key: str, control: str, workdir: Path, steps: int, small: bool = True,
                  set_len: int = 32, batch_size: int = 4, seed: int = 0, device: str = "cpu",
                  threads: int | None = None, timeout: float = 1800):
    """Train STATE on ``train`` and predict each ``(context, perturbation) -> control cells`` of ``sources``.

    Returns ``(pred AnnData of counts in lingshu simulate format, train cost, infer cost)``.
    """
    import anndata as ad

    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "data").mkdir(parents=True)
    frame = _frame(train, context_key, perturbation_key)
    # dense rows: cell-load caches 10,000 cells and reads the others from the file each time they are drawn; it
    # rebuilds a CSR row from three HDF5 datasets and a torch sparse tensor, a dense row is one read (Papalexi,
    # 15,872 training cells, 40 steps: 68.8 s -> 12.9 s)
    frame.X = frame.X.toarray()
    frame.write_h5ad(workdir / "data" / "train.h5ad")
    (workdir / "exp.toml").write_text(f'[datasets]\nbench = "{workdir / "data"}/"\n\n[training]\nbench = "train"\n\n'
                                      "[zeroshot]\n\n[fewshot]\n")
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [exe, "tx", "train", f"data.kwargs.toml_config_path={workdir / 'exp.toml'}", "data.kwargs.embed_key=null",
           "data.kwargs.output_space=gene", f"data.kwargs.pert_col={perturbation_key}",
           f"data.kwargs.cell_type_key={context_key}", f"data.kwargs.control_pert={control}",
           "data.kwargs.batch_col=bench_batch", "data.kwargs.num_workers=0", "data.kwargs.pin_memory=false",
           f"training.max_steps={steps}", f"training.batch_size={batch_size}", f"training.train_seed={seed}",
           f"training.val_freq={10 * steps + 1}", f"training.ckpt_every_n_steps={10 * steps + 1}",
           "model=state_sm", f"model.kwargs.cell_set_len={set_len}",
           f"model.device={'cuda' if device.startswith('cuda') else 'cpu'}", "use_wandb=false",
           f"output_dir={workdir / 'run'}", "name=m", "overwrite=true", *(SMALL if small else [])]
    train_cost = run_cli(cmd, workdir / "train.log", env, timeout)
    train_cost["params"] = _params(workdir / "train.log")

    rng = np.random.default_rng(seed)
    parts, lib_of = [], {}
    for (ctx, pert), src in sources.items():
        ctrl = _frame(src, context_key, perturbation_key)
        ctrl.obs[perturbation_key] = control
        place = ctrl.copy()
        place.obs[perturbation_key] = pert
        place.obs_names = [f"{n}|{pert}" for n in ctrl.obs_names]
        place.obs["source_cell"] = np.asarray(src.obs_names)
        ctrl.obs["source_cell"] = np.asarray(src.obs_names)
        parts += [ctrl, place]
        lib_of[ctx] = np.asarray(sp.csr_matrix(src.X).sum(axis=1)).ravel()
    inp = ad.concat(parts, merge="same")
    inp = inp[~inp.obs_names.duplicated()].copy()  # a context's controls appear once
    inp.write_h5ad(workdir / "infer_in.h5ad")
    out_path = workdir / "infer_out.h5ad"
    cmd = [exe, "tx", "infer", "--model-dir", str(workdir / "run" / "m"), "--adata", str(workdir / "infer_in.h5ad"),
           "--pert-col", perturbation_key, "--celltype-col", context_key, "--batch-col", "bench_batch",
           "--control-pert", control, "--output", str(out_path), "--seed", str(seed)]
    infer_cost = run_cli(cmd, workdir / "infer.log", env, timeout)
    res = ad.read_h5ad(out_path)
    res = res[(res.obs[perturbation_key].astype(str) != control).to_numpy()].copy()
    x = np.asarray(res.X.todense() if sp.issparse(res.X) else res.X, dtype=np.float64)
    x = np.expm1(np.maximum(x, 0.0))
    ctx = res.obs[context_key].astype(str).to_numpy()
    lib = np.empty(len(ctx))
    for c in np.unique(ctx):
        idx = np.flatnonzero(ctx == c)
        lib[idx] = rng.choice(lib_of[c], size=len(idx), replace=True)
    total = x.sum(axis=1, keepdims=True)
    v = x / np.where(total > 0, total, 1.0) * lib[:, None]  # each predicted profile at a real control depth
    low = np.floor(v)
    counts = (low + (rng.random(v.shape) < (v - low))).astype(np.float32)
    obs = res.obs[[context_key, perturbation_key]].astype(str).copy()
    obs["source_cell"] = res.obs["source_cell"].astype(str).to_numpy() if "source_cell" in res.obs else ""
    obs.index = [f"state_{i}" for i in range(len(obs))]
    pred = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=res.var_names.copy()))
    pred.uns["lingshu"] = {"baseline": "state", "seed": seed}
    return pred, train_cost, infer_cost
