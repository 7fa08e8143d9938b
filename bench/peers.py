"""Peer methods scored beside Lingshu on the same data with the same metrics.

* ``scvi``: scVI (scvi-tools) as the generative peer: posterior predictive samples of training
  cells of the asked cell type (one per generated cell, training cells drawn at random within
  the type), i.e. encode -> sample z from q(z|x) -> decode -> sample NB/ZINB counts.
* ``scgen_scvi``: scGen-style latent arithmetic in scVI's latent space: the latent mean shift of
  the perturbation (perturbed minus control, averaged over the contexts where the training set
  has both, each context weighted equally as scGen balances cell types) is added to each
  source control cell's latent mean, decoded with that cell's observed library size (and its
  batch, when scVI was given one), and counts are drawn from the decoder's distribution.
* STATE (``arc-state``): run through its CLI from a separate venv (``bench/peer_state.py``).
* CPA (``cpa-tools``): probed only; its releases pin torch < 2 (see :func:`install_report`).

All peers are optional: if scvi-tools is not importable the scVI rows are absent and the
report says why.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from common import Meter

log = logging.getLogger("bench")

TORCH_PIN = "torch==2.13.0"
PEER_PACKAGES = {"scvi-tools": "scvi", "cpa-tools": "cpa", "arc-state": "state"}


# ---------------------------------------------------------------- probes
def scvi_status() -> tuple[bool, str]:
    try:
        import scvi  # noqa: F401
    except Exception as err:  # noqa: BLE001 - report any import failure verbatim
        return False, f"import scvi failed: {err.__class__.__name__}: {err}"
    return True, f"scvi-tools {importlib.metadata.version('scvi-tools')}"


def _pip_dry_run(spec: str, cons_arg: list[str], timeout: int) -> tuple[int, list[str]]:
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", spec, *cons_arg],
                         capture_output=True, text=True, timeout=timeout)
    return res.returncode, (res.stdout + "\n" + res.stderr).splitlines()


def _latest_version(package: str) -> str | None:
    try:
        res = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package], capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    for line in res.stdout.splitlines():
        if line.startswith(f"{package} (") and line.rstrip().endswith(")"):
            return line.split("(", 1)[1].rstrip(")").strip()
    return None


def _dry_run(package: str, timeout: int = 240) -> str:
    """``pip install --dry-run`` with torch pinned: what would happen, in one or two lines.

    When the resolution fails, the newest release is tried alone, so the verdict names the
    requirement that conflicts (pip otherwise backtracks to old releases and reports whatever
    breaks there).
    """
    import tempfile

    try:
        import torch

        pin = f"torch=={torch.__version__.split('+')[0]}"
    except ImportError:
        pin = TORCH_PIN
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(pin + "\n")
        cons_arg = ["-c", f.name]
    try:
        rc, text = _pip_dry_run(package, cons_arg, timeout)
        would = next((ln.strip() for ln in text if ln.strip().startswith("Would install")), None)
        if rc == 0 and would:
            pulls_torch = any(tok.lower().startswith("torch-") for tok in would.split())
            return (f"pip install --dry-run {package} ({pin}): resolves; "
                    + ("WOULD REPLACE torch" if pulls_torch else "torch untouched")
                    + f"; {len(would.split()) - 2} packages to add or upgrade")
        latest = _latest_version(package)
        if latest:
            rc2, text2 = _pip_dry_run(f"{package}=={latest}", cons_arg, timeout)
            why = [ln.strip() for ln in text2 if " depends on " in ln or ln.startswith("ERROR: Cannot install")]
            if rc2 != 0 and why:
                return f"pip install --dry-run {package}=={latest} ({pin}) fails: " + "; ".join(why[:3])
        errs = [ln.strip() for ln in text if ln.strip().startswith("ERROR") or "error:" in ln]
        return f"pip install --dry-run {package} ({pin}) fails: " + " | ".join((errs or text)[-3:])
    except subprocess.TimeoutExpired:
        return f"pip install --dry-run {package} ({pin}): timed out after {timeout} s"
    finally:
        Path(cons_arg[1]).unlink(missing_ok=True)


def install_report(probe_missing: bool = True, cache: Path | None = None) -> list[dict[str, str]]:
    """One row per peer package: importable?, version, and a pip dry-run verdict when it is not.

    The dry-run needs the package index; results are cached in ``cache`` (JSON) so reruns
    do not repeat them.
    """
    cached = {}
    if cache is not None and cache.exists():
        try:
            cached = json.loads(cache.read_text())
        except ValueError:
            cached = {}
    rows = []
    for pkg, mod in PEER_PACKAGES.items():
        try:
            version = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            version = ""
        status, detail = "not installed", ""
        if version:
            try:
                importlib.import_module(mod)
                status = "importable"
            except Exception as err:  # noqa: BLE001
                status, detail = "import fails", f"{err.__class__.__name__}: {str(err)[:300]}"
        if pkg == "arc-state" and not version:
            exe = state_executable()
            if exe:
                version = _venv_version(exe, pkg)
                status, detail = "separate venv", (
                    f"`state` CLI at {exe}: `pip install arc-state` with torch pinned resolves without touching torch "
                    "but upgrades shared packages (click, typing-extensions, ...), so it lives in a venv with "
                    "--system-site-packages; `state tx infer` needs TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 under "
                    "torch >= 2.6 (bench/peer_state.py)")
        if status == "not installed" and probe_missing:
            detail = cached.get(pkg) or _dry_run(pkg)
            cached[pkg] = detail
        rows.append({"package": pkg, "version": version, "status": status, "detail": detail})
    if cache is not None and cached:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(cached, indent=1))
    return rows


def _venv_version(exe: str, pkg: str) -> str:
    """Version of ``pkg`` in the virtual environment of the console script ``exe`` ('' if it cannot be read)."""
    python = Path(exe).with_name("python")
    if not python.exists():
        return ""
    try:
        res = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({pkg!r}))"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def state_executable() -> str | None:
    """The ``state`` CLI of arc-state: ``$STATE_BIN``, then PATH."""
    import os

    env = os.environ.get("STATE_BIN")
    if env and Path(env).exists():
        return env
    return shutil.which("state")


def run_state(profile, out: Path, tag: str, train, sources: dict, *, context_key: str, perturbation_key: str,
              control: str, device: str):
    """STATE predictions for ``sources`` (see ``bench/peer_state.py``), or None with a note on failure."""
    import tempfile

    from common import THREADS, note
    from peer_state import StateError, state_predict

    exe = state_executable()
    if not (profile.peers and profile.state_steps):
        return None
    if exe is None:
        note(out, f"{tag}: STATE skipped: no `state` CLI (set STATE_BIN; see bench/peer_state.py)")
        return None
    with tempfile.TemporaryDirectory(prefix="bench-state-") as tmp:
        try:
            return state_predict(exe, train, sources, context_key=context_key, perturbation_key=perturbation_key,
                                 control=control, workdir=Path(tmp) / "w", steps=profile.state_steps,
                                 small=profile.state_small, set_len=profile.state_set_len,
                                 batch_size=profile.state_batch, seed=profile.seed, device=device,
                                 threads=THREADS[0])
        except (StateError, OSError, ValueError, KeyError) as err:
            note(out, f"{tag}: STATE failed: {err}")
            return None


def state_cost(c_train: dict, c_pred: dict, steps) -> dict:
    """The timing columns of a STATE row from the two CLI calls."""
    return {"train_s": c_train["wall_s"], "sample_s": c_pred["wall_s"], "wall_s": c_train["wall_s"] + c_pred["wall_s"],
            "cpu_s": c_train["cpu_s"] + c_pred["cpu_s"],
            "peak_rss_mb": max(c_train["peak_rss_mb"], c_pred["peak_rss_mb"]), "steps": steps,
            "params": c_train.get("params", float("nan"))}


def scvi_cost(model, m_train, m_sample) -> dict:
    """The timing columns of an scVI row."""
    from common import combine

    return combine(m_train, m_sample) | {"train_s": m_train.wall_s, "sample_s": m_sample.wall_s,
                                         "epochs": model.epochs_,
                                         "params": sum(p.numel() for p in model.module.parameters())}


def fit_scvi(train, profile, device: str, batch_key: str | None = None):
    """:func:`train_scvi` with the profile's epoch caps."""
    return train_scvi(train, batch_key=batch_key, max_epochs=profile.scvi_max_epochs,
                      max_updates=profile.scvi_max_updates, n_latent=profile.scvi_latent, seed=profile.seed,
                      device=device)


# ------------------------------------------------------------------ scVI
def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)


def train_scvi(adata, *, batch_key: str | None = None, max_epochs: int | None = None,
               max_updates: int | None = None, n_latent: int = 10, seed: int = 0, device: str = "cpu"):
    """Train scVI (default architecture, ``n_latent`` latent dims) on the raw counts of ``adata``.

    Epochs: scvi-tools' default (``min(400, 20000 / n * 400)``), capped at ``max_epochs`` and at
    the epochs that make about ``max_updates`` gradient updates of 128 cells (at least 1).
    Returns ``(model, Meter)``; ``model.epochs_`` is the number of epochs run.
    """
    from scvi.model._utils import get_max_epochs_heuristic

    import scvi
    import torch

    _quiet_lightning()
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    from common import pin_threads

    a = adata.copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    scvi.model.SCVI.setup_anndata(a, batch_key=batch_key)
    pin_threads()  # keep the suite's thread count whatever scanpy / scvi did to it
    model = scvi.model.SCVI(a, n_latent=n_latent)
    epochs = get_max_epochs_heuristic(a.n_obs)
    if max_epochs:
        epochs = min(epochs, int(max_epochs))
    if max_updates:
        epochs = min(epochs, max(1, int(np.ceil(max_updates * 128 / (0.9 * a.n_obs)))))
    with Meter() as meter:
        model.train(max_epochs=epochs, batch_size=128, accelerator="gpu" if device.startswith("cuda") else "cpu",
                    devices=1, enable_progress_bar=False, logger=False, enable_checkpointing=False)
    model.epochs_ = int(epochs)
    return model, meter


def scvi_generate(model, train, labels: pd.Series, label_key: str, seed: int = 0, chunk: int = 2048):
    """Posterior predictive samples: per requested label, training cells of that label drawn with
    replacement, each encoded, decoded and sampled once (a cell drawn twice gets two independent
    draws). Returns AnnData with ``obs[label_key]``."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    want = labels.astype(str).to_numpy()
    train_labels = train.obs[label_key].astype(str).to_numpy()
    src = np.empty(len(want), dtype=np.int64)
    for t in np.unique(want):
        pool = np.flatnonzero(train_labels == t)
        dest = np.flatnonzero(want == t)
        src[dest] = rng.choice(pool if len(pool) else np.arange(len(train_labels)), size=len(dest), replace=True)
    a = model.adata
    blocks = []
    for start in range(0, len(src), chunk):
        draw = model.posterior_predictive_sample(a, indices=src[start:start + chunk], n_samples=1)
        draw = draw.to_scipy_sparse() if hasattr(draw, "to_scipy_sparse") else sp.csr_matrix(np.asarray(draw))
        blocks.append(sp.csr_matrix(draw, dtype=np.float32))
    obs = pd.DataFrame({label_key: want}, index=[f"scvi_{i}" for i in range(len(want))])
    return ad.AnnData(X=sp.vstack(blocks).tocsr(), obs=obs, var=pd.DataFrame(index=a.var_names.copy()))


def scgen_latent_shift(model, train, source, *, perturbation_key: str, control: str, perturbations: list[str],
                       context_key: str, batch_key: str | None = None, seed: int = 0):
    """scGen-style prediction with an scVI latent space (see the module docstring).

    ``source``: control cells to perturb (counts, ``obs[context_key]`` and ``obs[batch_key]``).
    Returns AnnData (one cell per source cell and perturbation) in ``lingshu simulate`` format.
    """
    import anndata as ad
    import torch

    gen = torch.Generator().manual_seed(seed)
    z_train = model.get_latent_representation(model.adata)  # (N, L) posterior means
    pert = train.obs[perturbation_key].astype(str).to_numpy()
    ctx = train.obs[context_key].astype(str).to_numpy()
    src = source.copy()
    src.X = sp.csr_matrix(src.X, dtype=np.float32)
    z_src = model.get_latent_representation(src)
    x_src = sp.csr_matrix(src.X)
    lib = np.log(np.maximum(np.asarray(x_src.sum(axis=1)).ravel(), 1.0))[:, None].astype(np.float32)
    if batch_key is not None:
        cats = list(model.adata_manager.get_state_registry("batch").categorical_mapping)
        bidx = np.array([cats.index(b) for b in src.obs[batch_key].astype(str)], dtype=np.int64)[:, None]
    else:
        bidx = np.zeros((src.n_obs, 1), dtype=np.int64)
    module = model.module
    dev = next(module.parameters()).device
    blocks, frames = [], []
    for p in perturbations:
        shifts = []
        for c in dict.fromkeys(ctx.tolist()):
            a_, b_ = (pert == p) & (ctx == c), (pert == control) & (ctx == c)
            if a_.any() and b_.any():
                shifts.append(z_train[a_].mean(axis=0) - z_train[b_].mean(axis=0))
        if not shifts:
            log.warning("scgen_scvi: no training context has both %s and %s; skipped", p, control)
            continue
        delta = np.mean(shifts, axis=0)
        z_new = torch.tensor(z_src + delta[None, :], dtype=torch.float32, device=dev)
        with torch.no_grad():
            out = module.generative(z=z_new, library=torch.tensor(lib, device=dev),
                                    batch_index=torch.tensor(bidx, device=dev))
            px = out["px"]
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            x = px.sample().cpu().numpy().astype(np.float32)
        blocks.append(sp.csr_matrix(x))
        frame = pd.DataFrame({context_key: src.obs[context_key].astype(str).to_numpy(), perturbation_key: p,
                              "source_cell": np.asarray(src.obs_names)})
        if batch_key is not None and batch_key != context_key:
            frame[batch_key] = src.obs[batch_key].astype(str).to_numpy()
        frames.append(frame)
    if not blocks:
        return None
    obs = pd.concat(frames, ignore_index=True)
    obs.index = [f"scgen_{i}" for i in range(len(obs))]
    out = ad.AnnData(X=sp.vstack(blocks).tocsr(), obs=obs, var=pd.DataFrame(index=src.var_names.copy()))
    out.uns["lingshu"] = {"baseline": "scgen_scvi", "seed": seed}
    return out
