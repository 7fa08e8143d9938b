"""Shared pieces of the benchmark suite (``bench/run.py``): data paths, run profiles, timing and
peak memory, gene selection, and the ``lingshu evaluate`` call with the extra metric the suite needs.

Nothing here tunes anything: every setting of a profile is fixed before any test split is scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import resource
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench")

TOP_DE = 100  # Pearson-delta on the top-100 DE genes of the real cells


# ------------------------------------------------------------------ data
def data_dir() -> Path:
    """``$LINGSHU_DATA_DIR`` or ``<repo>/../shared/data`` (``/work/shared/data``)."""
    env = os.environ.get("LINGSHU_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


class MissingData(RuntimeError):
    """A data file of the suite is absent; the task is skipped with this message."""


def data_file(name: str) -> Path:
    path = data_dir() / name
    if not path.exists():
        raise MissingData(f"{path} not found (set LINGSHU_DATA_DIR to the folder holding {name}); skipping")
    return path


def read_counts(name: str):
    """The AnnData of ``name`` with string obs labels and unique gene names."""
    import anndata as ad

    a = ad.read_h5ad(data_file(name))
    a.var_names_make_unique()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    for c in a.obs.columns:
        if isinstance(a.obs[c].dtype, pd.CategoricalDtype) or a.obs[c].dtype == object:
            a.obs[c] = a.obs[c].astype(str)
    return a


# -------------------------------------------------------------- profiles
@dataclasses.dataclass
class Profile:
    """Every setting of one suite run (fixed a priori; recorded in ``run_meta.json``)."""

    name: str
    preset: str
    device: str = "auto"
    seed: int = 0
    threads: int | None = None  # torch / BLAS threads per process; None = all cores
    jobs: int = 1  # tasks run at once, each in its own process with `threads` threads
    # Lingshu training / sampling
    kang_steps: int | None = None
    papalexi_steps: int | None = None
    gen_steps: int | None = None
    loss_genes: int | None = None  # masked genes scored per cell in training; None = the preset's
    predict_steps: int = 3  # published perturbation setting (LingshuModel.predict default)
    guidance_scale: float = 2.0  # Papalexi, and Kang unless kang_guidance; LingshuModel.predict default (published)
    kang_guidance: float | None = None  # Kang only; None = guidance_scale
    kang_guidance_reference: str = "control"  # Kang: control (published) or composed
    kang_n_per_cell: int = 1  # Kang: simulated cells per control source cell
    kang_mask_fraction: float | None = None  # None: from condition tokens (published); else counterfactual start
    kang_coupling: str = "independent"  # counterfactual start: re-generated genes drawn afresh, or "quantile"
    kang_neighbours: int = 0  # composed guidance: the effect of the k most similar seen cell types; 0 = all pooled
    kang_min_similarity: float | None = None  # neighbours: leave out those (bar the nearest) correlating below this
    kang_global_weight: float | None = None  # neighbours: share of the context-free (all types pooled) effect
    kang_draws: int = 1  # Kang: evaluations with seeds seed .. seed+n-1 (Lingshu's sampling, the baselines'
    # rounding, the half split and the equal-count subsample); Task 1 is judged on every method's mean
    papalexi_target_prior: int | None = None  # prior injection: the target gene fixed at this count; None = off
    papalexi_n_per_cell: int = 1  # Papalexi: simulated cells per control source cell
    papalexi_guidance_gate: float = 0.0  # Papalexi: guide only genes whose predicted mean log1p shift exceeds this
    gen_sample_steps: int = 32
    gen_sample_seeds: int = 3  # generation: Lingshu sampled with seeds seed .. seed+n-1; Task 3 judged on the mean
    gen_cell_states: int | None = None  # generation: ModelConfig.cell_states; None = the preset's (0, off)
    # data size
    max_genes: int | None = None  # HVGs picked on the training cells only; None = all genes
    gen_max_cells: int | None = None  # stratified subsample of each generation data set before the split
    papalexi_max_ctrl: int | None = None  # control cells per replicate fed to predict
    # holdouts
    kang_types: list[str] | None = None  # None = all 7
    papalexi_targets: int | None = None  # None = all 25; else this many per offset
    papalexi_offsets: list[int] = dataclasses.field(default_factory=lambda: [0])  # rotation offsets of the subset
    papalexi_folds: int = 3
    gen_datasets: list[str] | None = None  # None = all 6
    # peers
    peers: bool = True
    scvi_max_epochs: int | None = None  # None = scvi-tools' default (min(400, 20000/n*400))
    scvi_max_updates: int | None = None  # also cap epochs at ~this many minibatch updates (quick profile)
    scvi_latent: int = 10
    state_steps: int | None = None  # STATE training steps (0/None: STATE not run)
    state_small: bool = True  # 2-layer width-128 STATE for CPUs; False = state_sm as published
    state_set_len: int = 32
    state_batch: int = 4
    # evaluation
    embedding: str = "umap"
    plots: bool = True


GEN_DATASETS = {
    "pbmc3k": "pbmc3k_10x_seurat_labels.h5ad",
    "pbmc68k_reduced": "pbmc68k_reduced_10x_subset.h5ad",
    "mouse_lung_immune": "zilionis2019_mouse_lung_immune_cluey_800.h5ad",
    "mouse_pancreas": "baron2016_mouse_pancreas_mouse1_chai_822.h5ad",
    "mouse_bladder": "han2018_mca_mouse_bladder_scdeepcluster_2100.h5ad",
    "worm_neurons": "cao2017_worm_neurons_scdeepcluster_4186.h5ad",
}
KANG_TYPES = ["CD4T", "FCGR3A+Mono", "CD14+Mono", "B", "NK", "CD8T", "Dendritic"]


def make_profile(mode: str, smoke: bool = False, **overrides) -> Profile:
    """``quick``: 2 CPU cores, < 20 min for the whole suite; ``full``: one GPU, all holdouts and genes.

    ``smoke`` cuts a profile to ~5 training steps and one holdout per task (pipeline check only).
    """
    if mode == "quick":
        # Kang: a counterfactual start regenerating half of each control cell's genes, chosen on the NK cell
        # type (not held out in quick mode) before any reported type was scored: NK Pearson-delta 0.22 -> 0.41,
        # energy distance 11.7 -> 5.2 vs 160 steps / 1.0 (at 400 steps).
        # Kang composed guidance with w = 0 and 4 cells per source, also chosen on NK (600 steps, 2026-12-02):
        # Pearson-delta / top-100 / energy distance at the published control reference, 1 cell per source:
        # w = 2 0.620 / 0.670 / 2.70, w = 1 0.657 / 0.717 / 2.22, w = 0.5 0.654 / 0.733 / 2.11; 4 per source,
        # w = 1: 0.688 / 0.749 / 1.99; composed w = 0: 0.656 / 0.780 / 2.17, with 4 per source 0.688 / 0.817 / 2.00
        # (NK additive 0.795 / 0.846 / 1.84).
        # Mask fraction 0.7 with the tiny preset's learning rate 1e-2 (was 3e-3), chosen on NK and CD8T (neither
        # reported in quick mode; 2026-12-02): top-100 Pearson-delta / energy distance NK, CD8T: mask 0.5 0.796 /
        # 2.38, 0.923 / 1.52; mask 0.7 0.817 / 2.50, 0.940 / 1.23 (CD8T additive 0.914 / 1.50, pert_mean 0.922 /
        # 1.40: beaten on both). Full table in bench/model_changes.md.
        # Papalexi: the published prior injection of the target gene (fixed at count 0, never re-masked, when it
        # is one of the 299 genes), chosen on development folds (targets offset 1 and 4; the reported fold is
        # offset 0), control guidance w = 2 as published. PDS / DES with lr 3e-3, offset 1: 0.80 / 0.037 without,
        # the same with count 0 (JAK2, STAT3 modelled); offset 4: 0.96 / 0.071 -> 0.92 / 0.662 (count 1: 0.92 /
        # 0.262); with lr 1e-2: offset 1 0.84 / 0.054 either way, offset 4 0.96 / 0.076 -> 0.96 / 0.664 (additive
        # 0.76 / 0.168 and 0.88 / 0.534). Tried and not adopted there: composed guidance, a counterfactual start
        # (mask 0.5), and scoring against the model's own simulated controls.
        # Papalexi guidance w = 1 (was the published 2), chosen on the development folds (offsets 1 and 4), target
        # fixed at 0 counts, 750 steps, 3 sampling seeds each (session 9): PDS / DES / MAE offset 1 w = 2 0.83 /
        # 0.055 / 0.041 -> w = 1 0.84 / 0.066 / 0.035; offset 4 0.99 / 0.726 / 0.040 -> 0.96 / 0.749 / 0.035
        # (seed 0 only: w = 0 and 0.5 offset 4 PDS 0.76 and 0.92, additive 0.88; w = 4 lower DES on both).
        # Training lengths: what fits the 20-minute budget on 2 cores (2 task processes, head in 9 MB chunks),
        # 1.5x the earlier 400 / 250 / 160; sized by wall time, not by any score. Loss budget 256 masked genes
        # per cell (tiny's 1,024 covers whole transcriptomes): on 1,000 genes a step is 1.4x faster at no
        # measured cost (development splits, bench/model_changes.md), so generation trains 420 steps (was 240)
        # in about the same time and Kang's process got ~200 s shorter (909 -> 714 s). The 846 s that left was
        # spent on Kang 800 steps (was 600) and generation 480 (was 420), measured on the development splits
        # only: NK Pearson-delta / top-100 / energy distance 0.745 / 0.849 / 2.09 -> 0.772 / 0.866 / 1.88,
        # CD8T 0.861 / 0.930 / 1.30 -> 0.859 / 0.937 / 1.19; generation MMD / floor at 360 -> 480 steps
        # PBMC 3k 1.70 -> 1.51, mouse pancreas 1.97 -> 1.85, PBMC 68k 2.50 -> 2.27, worm 1.28 -> 1.36.
        # Papalexi 750 steps (was 375), development folds: PDS / DES offset 1 0.84 / 0.051 -> 0.84 / 0.054,
        # offset 4 0.96 / 0.698 -> 1.00 / 0.707 (~35 s more).
        # Generation with 32 cell states (ModelConfig.cell_states; session 10), chosen on the development split
        # (seed 1) of PBMC 68k (classifier AUC / MMD 0.767 / 0.00940 without, 0.662 / 0.00820 with; a 16- and
        # a 32-state prototype 0.680 / 0.00826 and 0.648 / 0.00754) and mouse pancreas (16-state prototype:
        # 0.765 / 0.00854 -> 0.645 / 0.00797); bench/model_changes.md. Only for this short `tiny` training: with
        # `small` at 1,500 steps 32 states made PBMC 68k and mouse pancreas worse (bench/results/gen3_small_states32).
        # Kang quantile coupling, 1 cell per control cell (was independent draws, 4 per cell), mask 0.7, chosen on
        # NK and CD8T (session 11) with distribution metrics on equal cell counts. Pearson-delta / top-100 /
        # energy distance, independent 4 per cell seed 0: NK 0.773 / 0.866 / 2.17, CD8T 0.859 / 0.938 / 1.50
        # (seed 1: 2.22, 1.74); quantile, means of sampling seeds 0-2: mask 1.0 NK 0.798 / 0.866 / 1.98, CD8T
        # 0.877 / 0.944 / 1.56; mask 0.7 NK 0.790 / 0.863 / 1.69, CD8T 0.867 / 0.940 / 1.47 (effect scaled by 0.8,
        # i.e. composed w = -0.2: 1.75 / 1.50 at mask 1.0). The suite ran mask 1.0 first (eed9018). See
        # bench/model_changes.md.
        # Kang composed guidance over the 3 nearest seen cell types (neighbours=3; the perturbation's effect
        # averaged over the cell types seen stimulated whose control profile is most like the held-out type's,
        # instead of the context-free pair, which lacks the held-out type's stimulated cells) with every gene
        # re-generated (mask 1.0), session 14, chosen on NK, CD8T, FCGR3A+Mono and Dendritic (none reported in
        # quick mode), 3 sampling seeds: energy distance (top-100 Pearson-delta) mask 0.7 pooled NK 1.69 (0.863),
        # CD8T 1.47 (0.940), FCGR3A+Mono 2.52 (0.959), Dendritic 2.34 (0.952); 3 neighbours, mask 1.0: 1.66
        # (0.877), 1.35 (0.943), 3.05 (0.925), 2.06 (0.959); 2 neighbours 1.75, 1.37, 1.65, 1.79 (best baseline
        # 1.75, 1.40, 5.17, 3.77): both beat every baseline on all four, 3 with the wider margins on the close
        # calls (the lymphocytes). Session 15, same four types and seeds: neighbours correlating with the held-out
        # type below 0.8 left out (min_similarity=0.8; only FCGR3A+Mono's third, B at 0.77, goes, and its 2
        # neighbours then fill the 3 slots, CD14+Mono twice): FCGR3A+Mono 3.05 -> 1.38 (0.925 -> 0.963), the
        # other three unchanged. Session 16, same four types and seeds: the context-free effect mixed in with
        # weight 0.25 (global_weight; the smallest tried): energy distance NK 1.66 -> 1.69, CD8T 1.35 -> 1.35,
        # FCGR3A+Mono 1.38 -> 1.33, Dendritic 2.06 -> 1.85, all four still beat every baseline (0.4 gains the
        # myeloid types more and leaves NK 0.02 ahead of pert_mean). See bench/model_changes.md.
        # Papalexi held-out targets: offsets 0, 2 and 3 of the 5-target rotation (15 targets), every target
        # not used for development (offsets 1 and 4 are the development folds). Offset 0 alone had one target
        # with real DE genes (STAT2), so its DES could not separate the methods (session 18).
        # Papalexi 3,000 training steps (was 750), development folds (offsets 1 and 4), w = 1, target at 0 counts,
        # means of sampling seeds 0, 100, 200 (session 18): PDS / DES / MAE / Pearson-delta offset 1 750 steps
        # 0.840 / 0.064 / 0.035 / 0.339, 2,000 0.813 / 0.086 / 0.034 / 0.362, 3,000 0.827 / 0.093 / 0.033 / 0.414;
        # offset 4 0.960 / 0.749 / 0.035 / 0.631, 0.973 / 0.791 / 0.033 / 0.643, 0.987 / 0.778 / 0.033 / 0.650.
        # The task runs after Kang in the same worker, so the suite's wall time grows by less than its ~3 min.
        # Papalexi 2 simulated cells per control source (was 1), same folds and seeds, 3,000 steps: offset 1
        # 0.827 / 0.093 / 0.033 / 0.414 -> 0.840 / 0.095 / 0.031 / 0.461, offset 4 0.987 / 0.778 / 0.033 / 0.650 ->
        # 1.000 / 0.782 / 0.031 / 0.664 (guidance w = 0.5 instead: 0.827 / 0.101 / 0.031 / 0.399 and 0.987 / 0.781 /
        # 0.031 / 0.646, not adopted).
        # Generation 800 training steps (was 480), chosen on the development splits in session 13 (seed 1, 3
        # sampling seeds; MMD / floor, AUC, energy distance): PBMC 68k 2.05 / 0.687 / 0.380 -> 1.92 / 0.661 / 0.341,
        # mouse pancreas 1.75 / 0.659 / 0.341 -> 1.68 / 0.644 / 0.326 (1,200 steps no better than 800); left out
        # then for the suite's time (generation ~610 -> ~1,150 s on that day), adopted now that the generation task
        # takes ~510 s at 480 steps (session 18).
        # Generation sampling 32 steps (was 8), development splits (seed 1, 800 training steps, 32 states, 3 draws;
        # MMD / floor, AUC; session 18): PBMC 68k 1.916 / 0.667 -> 1.907 / 0.666, mouse lung 1.472 / 0.674 -> 1.431 /
        # 0.644, PBMC 3k 1.489 / 0.636 -> 1.475 / 0.622, mouse pancreas 1.699 / 0.637 -> 1.529 / 0.588 (~12 s more
        # per data set). At 800 steps 32 states still beat none (PBMC 68k AUC 0.667 vs 0.707, lung 0.674 vs 0.705)
        # and 64 (0.670, 0.678).
        # Papalexi guidance gated at tau = 0.05 (guide only genes whose predicted mean log1p count moves by more),
        # chosen on the development folds (offsets 1 and 4, 3,000 steps, 3 seeds; session 20): PDS / DES / MAE /
        # Pearson-delta offset 1 0.853 / 0.102 / 0.031 / 0.463 -> 0.840 / 0.121 / 0.031 / 0.439, offset 4 1.000 /
        # 0.777 / 0.030 / 0.663 -> 1.000 / 0.782 / 0.030 / 0.666; tau 0.1-0.25 no more DES, less Pearson-delta; with
        # w = 2 the gate gives the same DES at a worse MAE.
        # Then 4 cells per control source instead of 2 (same folds, gate 0.05, 6 seeds): offset 1 PDS / DES / MAE /
        # Pearson-delta 0.833 / 0.118 / 0.0304 / 0.440 -> 0.833 / 0.128 / 0.0292 / 0.478, offset 4 1.000 / 0.784 /
        # 0.0297 / 0.665 -> 1.000 / 0.795 / 0.0288 / 0.668 (8 per source, 3 seeds: DES 0.111 / 0.794). Composed
        # guidance (w = 0 or 1, 0 or 2 neighbour replicates) gave no more DES (offset 1 0.097-0.113).
        # STATE 1,000 training steps (was 40) on both tasks, sized by wall time alone (session 22): about half of
        # Lingshu's training time per task (STATE 0.043 s / step + 9 s start on Kang, 0.071 s + 10 s on Papalexi,
        # one AMD EPYC core; Lingshu 105-125 s and 187 s in session 20's suite run), what the 20-minute budget
        # leaves beside Lingshu.
        p = Profile(name="quick", preset="tiny", threads=1, jobs=2, guidance_scale=1.0, kang_steps=800,
                    kang_mask_fraction=1.0, kang_coupling="quantile", kang_guidance=0.0,
                    kang_guidance_reference="composed", kang_n_per_cell=1, kang_neighbours=3,
                    kang_min_similarity=0.8, kang_global_weight=0.25, kang_draws=3,
                    papalexi_steps=3000, papalexi_target_prior=0, papalexi_n_per_cell=4, papalexi_guidance_gate=0.05,
                    gen_steps=800, loss_genes=256,
                    gen_sample_steps=32, gen_cell_states=32, max_genes=1000, gen_max_cells=600, papalexi_max_ctrl=250,
                    kang_types=["CD4T", "CD14+Mono", "B"], papalexi_targets=5, papalexi_offsets=[0, 2, 3],
                    papalexi_folds=1,
                    scvi_max_epochs=100, scvi_max_updates=500, state_steps=1000, embedding="pca")
    elif mode == "full":
        p = Profile(name="full", preset="base", kang_steps=4000, papalexi_steps=4000, papalexi_target_prior=0,
                    gen_steps=4000,  # no cell states: with `small` at 1,500 steps they made generation worse
                    gen_sample_steps=64, state_steps=4000, state_small=False, state_set_len=64, state_batch=16)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if smoke:
        p = dataclasses.replace(p, name=f"{p.name}+smoke", kang_steps=5, papalexi_steps=5, gen_steps=5,
                                gen_sample_steps=2, predict_steps=2, kang_types=["B"], papalexi_targets=2,
                                papalexi_offsets=[0], papalexi_folds=1,
                                gen_datasets=["pbmc68k_reduced", "mouse_lung_immune"],
                                gen_max_cells=300, papalexi_max_ctrl=100, scvi_max_epochs=2, scvi_max_updates=20,
                                state_steps=3 if p.state_steps else None,
                                max_genes=p.max_genes or 1000, embedding="pca")
    return dataclasses.replace(p, **{k: v for k, v in overrides.items() if v is not None})


def train_config(profile: Profile):
    """The preset's training settings with the profile's loss budget, or ``None`` (the preset's own)."""
    if profile.loss_genes is None:
        return None
    from lingshu.config import preset
    return dataclasses.replace(preset(profile.preset).train, loss_genes=profile.loss_genes)


def gen_model_config(profile: Profile):
    """The preset's model with the profile's generation cell states, or ``None`` (the preset's own)."""
    if profile.gen_cell_states is None:
        return None
    from lingshu.config import preset
    return dataclasses.replace(preset(profile.preset).model, cell_states=profile.gen_cell_states)


# ------------------------------------------------------ time and memory
def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Wall time and peak resident memory of a block (and peak GPU memory on CUDA).

    The peak RSS is that of the block alone where the kernel lets the process reset its
    high-water mark (``/proc/self/clear_refs``); otherwise the process-wide
    ``getrusage(RUSAGE_SELF).ru_maxrss`` so far (then ``rss_scope == "process"``). Meters may
    nest: an inner block's reset does not hide the outer block's earlier peak.
    ``Meter.suite_peak_mb`` is the largest peak seen by any meter of the process.
    """

    _stack: list["Meter"] = []
    suite_peak_mb: float = 0.0

    def __init__(self) -> None:
        self.wall_s = float("nan")
        self.peak_rss_mb = float("nan")
        self.peak_gpu_mb = float("nan")
        self.rss_scope = "block"
        self.cpu_s = float("nan")
        self._seen = 0.0
        self._seen_gpu = 0.0

    def __enter__(self) -> "Meter":
        import torch

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            gpu_now = torch.cuda.max_memory_allocated() / 2**20
            for outer in Meter._stack:
                outer._seen_gpu = max(outer._seen_gpu, gpu_now)
            torch.cuda.reset_peak_memory_stats()
        now = _vm_hwm_mb() or 0.0
        for outer in Meter._stack:  # the outer blocks' peaks so far, before the reset erases them
            outer._seen = max(outer._seen, now)
        Meter.suite_peak_mb = max(Meter.suite_peak_mb, now)
        self.rss_scope = "block" if _reset_hwm() else "process"
        Meter._stack.append(self)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self._cpu0 = ru.ru_utime + ru.ru_stime
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self.wall_s = time.perf_counter() - self._t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_s = ru.ru_utime + ru.ru_stime - self._cpu0
        Meter._stack.remove(self)
        hwm = _vm_hwm_mb() if self.rss_scope == "block" else None
        if hwm is None:
            self.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        else:
            self.peak_rss_mb = max(hwm, self._seen)
        for outer in Meter._stack:
            outer._seen = max(outer._seen, self.peak_rss_mb)
        Meter.suite_peak_mb = max(Meter.suite_peak_mb, self.peak_rss_mb)
        if self._cuda:
            self.peak_gpu_mb = max(torch.cuda.max_memory_allocated() / 2**20, self._seen_gpu)
            for outer in Meter._stack:
                outer._seen_gpu = max(outer._seen_gpu, self.peak_gpu_mb)


def combine(*meters: Meter) -> dict[str, float]:
    """Wall and CPU time summed and peaks maxed over consecutive blocks."""
    return {"wall_s": float(sum(m.wall_s for m in meters)), "cpu_s": float(sum(m.cpu_s for m in meters)),
            "peak_rss_mb": float(np.nanmax([m.peak_rss_mb for m in meters])),
            "peak_gpu_mb": float(np.nanmax([m.peak_gpu_mb for m in meters])) if any(
                np.isfinite(m.peak_gpu_mb) for m in meters) else float("nan")}


THREADS: list[int | None] = [None]  # set by run.py --threads


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` to torch and the BLAS pools of this process and remember it for :func:`pin_threads`."""
    if not threads:
        return
    import torch
    from threadpoolctl import threadpool_limits

    THREADS[0] = threads
    torch.set_num_threads(threads)
    threadpool_limits(threads)


def exit_with_parent(interval: float = 2.0) -> None:
    """In a worker process: exit (status 1) once the process that started it is gone.

    Without it, a suite stopped with ``kill`` (SIGTERM or SIGKILL on the ``bench/run.py`` process)
    leaves its task processes running, and they keep writing into the results folder beside the
    next run. A daemon thread checks the parent pid every ``interval`` seconds. Call it once per
    process (``bench/run.py`` passes it as the worker pool's initializer).
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def pin_threads() -> None:
    """Re-apply ``--threads`` to torch before each model is trained or sampled.

    Needed because importing / running scanpy's HVG selection (numba, another libgomp) leaves
    torch's intra-op pool at the machine default again: measured 4.5x slower training at
    "1 thread" on a busy 2-core machine without this.
    """
    import torch

    if THREADS[0]:
        torch.set_num_threads(THREADS[0])


def resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def hardware() -> dict[str, str]:
    import torch

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"platform": platform.platform(), "cpu": cpu,
           "cpus_visible": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
           "memory": mem, "python": platform.python_version(), "torch": torch.__version__,
           "torch_threads": str(THREADS[0] or f"default ({os.cpu_count()})"),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}
    return out


# --------------------------------------------------------- preparation
def select_genes(train, n: int | None) -> list[str] | None:
    """Top ``n`` highly variable genes of ``train`` (scanpy ``seurat`` flavour on log1p CP10k), in data order.

    Picked on the training cells only, so the held-out cells never influence the gene set.
    ``None`` when ``n`` is None or at least the number of genes.
    """
    import anndata as ad
    import scanpy as sc

    if n is None or n >= train.n_vars:
        return None
    b = ad.AnnData(X=sp.csr_matrix(train.X, dtype=np.float32, copy=True), var=pd.DataFrame(index=train.var_names))
    expressed = np.asarray((b.X > 0).sum(axis=0)).ravel() > 0
    b = b[:, expressed].copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(b, n_top_genes=min(n, b.n_vars), flavor="seurat")
    keep = set(b.var_names[b.var["highly_variable"].to_numpy()])
    return [g for g in train.var_names if g in keep]


def stratified_subsample(labels: np.ndarray, max_n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_n`` items, proportional per label (at least 2 of each, if present)."""
    labels = np.asarray(labels).astype(str)
    if max_n is None or len(labels) <= max_n:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    frac = max_n / len(labels)
    keep = []
    for lab in dict.fromkeys(labels.tolist()):
        idx = np.flatnonzero(labels == lab)
        k = min(len(idx), max(2, int(round(len(idx) * frac))))
        keep.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(keep))


# ----------------------------------------------------------- evaluation
def _top_de_pearson(real, pred, cond: str, k: int = TOP_DE) -> float:
    """Pearson-delta over the ``k`` genes most significant in the real condition vs its controls.

    Genes ranked by the real Mann-Whitney p-value (ascending), ties by ``|log2 fold change|``
    (descending); effects are pseudobulk minus control pseudobulk on each side's own scale,
    exactly the effects of ``pearson_delta``.
    """
    from lingshu.evaluate.perturbation import pearson_delta

    de = real.de[cond]
    p = np.nan_to_num(de.pvalue.astype(np.float64), nan=1.0)
    lfc = np.abs(np.nan_to_num(de.lfc.astype(np.float64), nan=0.0, posinf=1e9, neginf=-1e9))
    top = np.lexsort((-lfc, p))[:k]
    real_eff = (real.means[cond] - real.control_means[cond]).astype(np.float64)
    pred_eff = (pred.means[cond] - pred.control_means[cond]).astype(np.float64)
    return pearson_delta(real_eff[top], pred_eff[top])


@contextlib.contextmanager
def top_de_metric():
    """Add ``pearson_delta_top100`` to ``lingshu evaluate``'s perturbation metrics for the duration.

    Library gap worked around here: :func:`lingshu.evaluate.evaluate` reports Pearson-delta on
    all genes only. Its per-condition scorer is wrapped so the extra column flows through the
    very same code path (metrics.csv, summary.md, relative gains); restored on exit.
    """
    import lingshu.evaluate.perturbation as pm
    import lingshu.evaluate.report as rep

    name = f"pearson_delta_top{TOP_DE}"
    orig = rep.perturbation_scores

    def scores(real, pred, genes, targets):
        table = orig(real, pred, genes, targets)
        col = [(_top_de_pearson(real, pred, c) if c in pred.means and c in real.means else np.nan)
               for c in table.index]
        table[name] = col  # the column exists (NaN) when the name is in PERTURBATION_METRICS
        return table

    had = name in pm.PERTURBATION_METRICS
    rep.perturbation_scores = scores
    pm.PERTURBATION_METRICS[name] = "higher"
    try:
        yield name
    finally:
        rep.perturbation_scores = orig
        if not had:
            pm.PERTURBATION_METRICS.pop(name, None)


def run_evaluate(pred, real, **kwargs) -> pd.DataFrame:
    """:func:`lingshu.evaluate.evaluate` (what ``lingshu evaluate`` runs) with the top-DE Pearson-delta."""
    from lingshu.evaluate import evaluate

    kwargs.setdefault("overwrite", True)
    with top_de_metric(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate(pred, real, **kwargs)


PERT_COLS = ["pearson_delta", f"pearson_delta_top{TOP_DE}", "des", "pds", "mae", "spearman_lfc", "auprc"]
DIST_COLS = ["energy_distance", "mmd", "classifier_auc", "mean_wasserstein", "pearson_mean", "ilisi",
             "library_size_ks", "celltype_accuracy", "celltype_tvd", "marker_overlap"]


def wide(report: pd.DataFrame, rename: dict[str, str] | None = None, per_condition: bool = False) -> pd.DataFrame:
    """One row per method (and condition with ``per_condition``): perturbation metrics per condition
    (or their mean) beside the pooled distribution metrics (condition ``"all"``)."""
    rename = rename or {}
    rep = report.assign(method=report["method"].map(lambda m: rename.get(m, m)))
    pert = rep[(rep["family"] == "perturbation") & (rep["condition"] != "all")]
    dist = rep[(rep["family"] == "distribution") & (rep["condition"] == "all")]
    dist_w = dist.pivot_table(index="method", columns="metric", values="value", aggfunc="first", dropna=False)
    if pert.empty:
        out = dist_w.reset_index()
    elif per_condition:
        pw = pert.pivot_table(index=["method", "condition"], columns="metric", values="value", aggfunc="first",
                              dropna=False).reset_index()
        out = pw.merge(dist_w.reset_index(), on="method", how="left")
    else:
        pw = pert.pivot_table(index="method", columns="metric", values="value", aggfunc="mean", dropna=False)
        out = pw.join(dist_w, how="outer").reset_index()
    cols = [c for c in ["method", "condition"] if c in out.columns]
    cols += [c for c in PERT_COLS + DIST_COLS if c in out.columns]
    return out[cols]


def note(out: Path, text: str) -> None:
    """Append a line to ``<out>/notes.txt`` (shown under "Notes from this run" in BENCHMARKS.md)."""
    log.warning(text)
    with open(Path(out) / "notes.txt", "a") as f:
        f.write(text.replace("\n", " ") + "\n")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for name in ("lingshu", "lingshu.evaluate", "lightning", "lightning.pytorch", "pytorch_lightning", "scvi",
                 "numba", "matplotlib", "anndata", "scanpy", "py.warnings"):
        logging.getLogger(name).setLevel(logging.INFO if verbose and name.startswith("lingshu") else logging.ERROR)
    logging.getLogger("bench").setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
