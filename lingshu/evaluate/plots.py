"""The pictures of an evaluation report (matplotlib, PNG): what a biologist would look at first.

* ``embedding.png``: real and simulated cells in one UMAP (or PCA), coloured by source and
  by cell type (or condition);
* ``gene_means.png``: per-gene mean of log1p(CP10k), real vs each method;
* ``lfc.png``: predicted vs real log2 fold changes of the top DE genes of each condition;
* ``proportions.png``: cell-type proportions of real and simulated cells, as conditioned
  and as a classifier trained on the real cells assigns them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..metrics import celltype_proportions, joint_pca, log_cp10k
from ._inputs import COND, CTX

__all__ = ["write_plots"]

log = logging.getLogger("lingshu.evaluate")

MAX_PLOT_CELLS = 1500
MAX_PANELS = 9
TOP_GENES = 50


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    _pyplot().close(fig)
    return path.name


def _sample(n: int, rng) -> np.ndarray:
    return np.sort(rng.choice(n, size=MAX_PLOT_CELLS, replace=False)) if n > MAX_PLOT_CELLS else np.arange(n)


def _coords(real_log, sim_log, method: str, seed: int) -> tuple[np.ndarray, str]:
    pr, ps = joint_pca(real_log, sim_log, n_pcs=30, seed=seed)
    pcs = np.vstack([pr, ps])
    if method == "umap" and len(pcs) > 15:
        try:
            import anndata as ad
            import scanpy as sc

            a = ad.AnnData(X=np.zeros((len(pcs), 1), dtype=np.float32), obsm={"X_pca": pcs})
            sc.pp.neighbors(a, use_rep="X_pca", n_neighbors=15, random_state=seed)
            sc.tl.umap(a, random_state=seed)
            return a.obsm["X_umap"], "UMAP"
        except ImportError as err:  # umap-learn missing
            log.info("UMAP unavailable (%s); plotting PCA", err)
    return pcs[:, :2], "PC"


def _scatter_groups(ax, xy, labels, title: str, axis: str) -> None:
    cats = list(dict.fromkeys(labels.tolist()))
    cmap = _pyplot().get_cmap("tab20" if len(cats) > 10 else "tab10")
    for i, cat in enumerate(cats):
        m = labels == cat
        ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.6, color=cmap(i % cmap.N), label=str(cat), linewidths=0)
    ax.set_title(title)
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))


def embedding_plot(real, sim, path: Path, *, embedding: str, seed: int) -> str:
    """Joint UMAP/PCA of real and simulated cells, coloured by source and by context or condition."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    real, sim = real[_sample(real.n_obs, rng)], sim[_sample(sim.n_obs, rng)]
    xy, axis = _coords(log_cp10k(real.X), log_cp10k(sim.X), embedding, seed)
    source = np.r_[np.full(real.n_obs, "real", dtype=object), np.full(sim.n_obs, "simulated", dtype=object)]
    by = CTX if (real.obs[CTX] != "").any() else COND
    labels = np.r_[real.obs[by].to_numpy(), sim.obs[by].to_numpy()].astype(str)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    _scatter_groups(axes[0], xy, source, "real vs simulated", axis)
    _scatter_groups(axes[1], xy, labels, "cell type" if by == CTX else "condition", axis)
    fig.tight_layout()
    return _save(fig, path)


def _gene_means(x) -> np.ndarray:
    return np.asarray(log_cp10k(x).mean(axis=0)).ravel()


def gene_means_plot(real, sims: dict, path: Path) -> str:
    """Per-gene mean log1p(CP10k) of real vs each method's cells, with the Pearson r."""
    plt = _pyplot()
    mr = _gene_means(real.X)
    fig, axes = plt.subplots(1, len(sims), figsize=(3.6 * len(sims), 3.6), squeeze=False)
    hi = max([mr.max()] + [_gene_means(s.X).max() for s in sims.values()]) * 1.05
    for ax, (name, sim) in zip(axes[0], sims.items()):
        ms = _gene_means(sim.X)
        r = np.corrcoef(mr, ms)[0, 1] if np.ptp(mr) > 0 and np.ptp(ms) > 0 else np.nan
        ax.scatter(mr, ms, s=3, alpha=0.5, linewidths=0)
        ax.plot([0, hi], [0, hi], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{name}  (r = {r:.3f})", fontsize=10)
        ax.set_xlabel("real mean log1p(CP10k)")
        ax.set_ylabel("simulated mean")
    fig.tight_layout()
    return _save(fig, path)


def lfc_plot(real_side, pred_side, path: Path) -> str | None:
    """Predicted vs real log2 fold changes of each condition's top real DE genes (by p-value)."""
    plt = _pyplot()
    conds = [c for c in real_side.de if c in pred_side.de]
    if not conds:
        return None
    conds = sorted(conds, key=lambda c: -int(real_side.de[c].significant.sum()))[:MAX_PANELS]
    ncol = min(3, len(conds))
    nrow = int(np.ceil(len(conds) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.4 * nrow), squeeze=False)
    for ax in axes.ravel()[len(conds):]:
        ax.axis("off")
    for ax, c in zip(axes.ravel(), conds):
        rd, pd_ = real_side.de[c], pred_side.de[c]
        top = np.lexsort((-np.abs(rd.lfc), rd.pvalue))[:TOP_GENES]
        x, y = rd.lfc[top].astype(float), pd_.lfc[top].astype(float)
        finite = np.r_[x[np.isfinite(x)], y[np.isfinite(y)]]
        lim = (np.abs(finite).max() if finite.size else 1.0) * 1.1 or 1.0
        x, y = np.clip(x, -lim, lim), np.clip(y, -lim, lim)
        sig = rd.significant[top]
        ax.scatter(x[sig], y[sig], s=10, color="tab:red", label="real DE (FDR<0.05)", linewidths=0)
        ax.scatter(x[~sig], y[~sig], s=10, color="tab:grey", label="not DE", linewidths=0)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{c}  ({int(rd.significant.sum())} real DE genes)", fontsize=9)
        ax.set_xlabel("real log2 fold change")
        ax.set_ylabel("predicted log2 fold change")
    axes.ravel()[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def proportions_plot(real, sim, context_key: str, path: Path, seed: int) -> str:
    """Stacked bars of cell-type shares: real, simulated as conditioned, simulated as classified."""
    plt = _pyplot()
    table = celltype_proportions(real, sim, context_key, seed=seed).table
    cols = {"real": "real_fraction", "simulated\n(labels)": "sim_conditioned_fraction",
            "simulated\n(classified)": "sim_assigned_fraction"}
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    bottom = np.zeros(len(cols))
    cmap = plt.get_cmap("tab20" if len(table) > 10 else "tab10")
    for i, (typ, row) in enumerate(table.iterrows()):
        vals = np.array([row[c] for c in cols.values()], dtype=float)
        ax.bar(list(cols), vals, bottom=bottom, color=cmap(i % cmap.N), label=str(typ))
        bottom += vals
    ax.set_ylabel("share of cells")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def write_plots(e, out: Path, *, embedding: str = "umap") -> list[str]:
    """Write every plot that applies to ``out``; returns the file names (relative to ``out``)."""
    ev = e.inputs
    out.mkdir(parents=True, exist_ok=True)

    def evaluated(cells):  # only the conditions real has
        return cells[np.isin(cells.obs[COND].to_numpy(), list(ev.conditions))] if ev.perturbation_key else cells

    sims = {name: evaluated(cells) for name, (cells, _) in e.methods.items()}
    model = sims["model"]
    done = []
    if model.n_obs >= 2 and ev.real.n_obs >= 2:
        done.append(embedding_plot(ev.real, model, out / "embedding.png", embedding=embedding, seed=e.seed))
        done.append(gene_means_plot(ev.real, {k: v for k, v in sims.items() if v.n_obs}, out / "gene_means.png"))
    if e.real_side is not None and "model" in e.sides:
        name = lfc_plot(e.real_side, e.sides["model"], out / "lfc.png")
        if name:
            done.append(name)
    if ev.context_key and model.n_obs >= 2 and ev.real.n_obs >= 2:
        done.append(proportions_plot(ev.real, model, ev.context_key, out / "proportions.png", e.seed))
    return done
