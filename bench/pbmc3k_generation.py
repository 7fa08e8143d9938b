"""Benchmark: conditional generation of PBMC 3k cells (all 13,714 genes), scored on held-out cells.

Splits the 2,638 cells into a train half and a held-out half (stratified by cell type),
trains ``LingshuModel(train, context_keys=["cell_type"])``, generates one cell per held-out
cell with the same cell-type label and scores it with
:func:`lingshu.metrics.distribution_report` against the held-out half. Beside the model:

- ``train_half``: the real train half scored against the held-out half: a perfect generator
  at the same sample size (the ceiling; the MMD floor for the target).
- ``heldout_half_split``: one half of the held-out cells vs the other (half the size).
- ``mean_poisson``: per cell type, Poisson counts from the train half's mean profile of that
  type, scaled to library sizes drawn from the train cells of that type.
- ``lingshu_vs_train``: the generated cells scored against the *training* half: close to the
  ``train_half`` column there but not in ``lingshu`` means the model reproduces its training
  cells and misses the tissue beyond them; far from it means it has not learned them yet.

Targets: MMD within 2x of the ``train_half`` floor and classifier AUC <= 0.65.

With more than 1,000 genes the report also scores the generated cells on gene tiers picked on
the training half (its 1,000 HVGs; genes ranked 1-500, 501-3,000 and beyond by mean count),
each on its own joint PCA against the train half's floor on that tier
(``pbmc3k_generation_tiers.csv``): where on the transcriptome a model falls short.

    python bench/pbmc3k_generation.py --preset tiny --max-steps 50 --steps 8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingshu.metrics import align_genes, compare, distribution_report, half_split  # noqa: E402

DATA_FILE = "pbmc3k_10x_seurat_labels.h5ad"
LABEL = "cell_type"
MMD_FACTOR, AUC_MAX = 2.0, 0.65


def data_path() -> Path:
    env = os.environ.get("LINGSHU_DATA_DIR")
    return Path(env) / DATA_FILE if env else ROOT.parent / "shared" / "data" / DATA_FILE


def mean_poisson(train: ad.AnnData, labels: pd.Series, seed: int) -> ad.AnnData:
    """One cell per entry of ``labels``: Poisson(type mean profile x a train library size of that type)."""
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(train.X, dtype=np.float64)
    train_labels = train.obs[LABEL].astype(str).to_numpy()
    want = labels.astype(str).to_numpy()
    out = np.zeros((len(want), train.n_vars), dtype=np.float32)
    for t in np.unique(want):
        rows = np.flatnonzero(train_labels == t)
        profile = np.asarray(x[rows].sum(axis=0)).ravel()
        profile /= profile.sum()  # (G,)
        lib = np.asarray(x[rows].sum(axis=1)).ravel()
        dest = np.flatnonzero(want == t)
        sizes = rng.choice(lib, size=len(dest), replace=True)
        out[dest] = rng.poisson(sizes[:, None] * profile[None, :])
    obs = pd.DataFrame({LABEL: want}, index=[f"poisson_{i}" for i in range(len(want))])
    return ad.AnnData(X=sp.csr_matrix(out), obs=obs, var=pd.DataFrame(index=train.var_names.copy()))


def score(heldout: ad.AnnData, other: ad.AnnData, seed: int) -> dict[str, float]:
    xr, xs, genes = align_genes(heldout, other)
    return compare(xr, xs, genes, real_labels=heldout.obs[LABEL].astype(str).to_numpy(),
                   sim_labels=other.obs[LABEL].astype(str).to_numpy(), seed=seed)


def gene_tiers(train: ad.AnnData) -> dict[str, np.ndarray]:
    """Column indices of gene subsets picked on the training half: its 1,000 HVGs, and three tiers of mean count."""
    from common import select_genes

    order = np.argsort(-np.asarray(sp.csr_matrix(train.X).mean(axis=0)).ravel(), kind="stable")
    hvg = select_genes(train, 1000)
    return {"1,000 HVGs": train.var_names.get_indexer(hvg) if hvg is not None else np.arange(train.n_vars),
            "mean rank 1-500": np.sort(order[:500]), "mean rank 501-3,000": np.sort(order[500:3000]),
            "mean rank > 3,000": np.sort(order[3000:])}


def tier_table(heldout: ad.AnnData, sim: ad.AnnData, train: ad.AnnData, seed: int) -> pd.DataFrame:
    """MMD / train-half floor and classifier AUC of the generated cells on each gene tier (its own joint PCA).

    Shows where on the transcriptome the generated cells differ from held-out ones: the
    whole-transcriptome scores mix the genes a short-trained model has learned with those it has not.
    """
    rows = []
    for name, idx in gene_tiers(train).items():
        if len(idx) < 2:
            continue
        names = train.var_names[idx]  # by name: the generated cells need not list the genes in the same order
        cut = [c[:, names].copy() for c in (heldout, sim, train)]
        model, floor = score(cut[0], cut[1], seed), score(cut[0], cut[2], seed)
        rows.append({"genes": name, "n_genes": len(idx), "mmd_ratio": model["mmd"] / floor["mmd"],
                     "auc": model["classifier_auc"], "train_half_auc": floor["classifier_auc"]})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, meta: dict[str, object], verdicts: list[str], tiers: pd.DataFrame | None = None) -> str:
    lines = ["# PBMC 3k conditional generation (all 13,714 genes)", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| metric | " + " | ".join(table.columns[1:]) + " |",
              "|---|" + "---:|" * (len(table.columns) - 2) + "---|"]
    for row in table.itertuples(index=False):
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row[1:]]
        lines.append(f"| {row[0]} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:", ""] + [f"- {v}" for v in verdicts]
    if tiers is not None and len(tiers):
        lines += ["", "By gene tier (picked on the training half; each tier scored on its own joint PCA, MMD over "
                  "the train half's MMD on the same tier):", "",
                  "| genes | n | MMD / floor | classifier AUC | train-half AUC |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r.genes} | {r.n_genes:,} | {r.mmd_ratio:.2f} | {r.auc:.3f} | {r.train_half_auc:.3f} |"
                  for r in tiers.itertuples(index=False)]
    lines += ["", "Columns: `lingshu` = generated vs held-out half; `train_half` = real train half vs held-out "
              "half (ceiling at equal size); `heldout_half_split` = held-out half vs half (half size); "
              "`mean_poisson` = per-type mean-profile Poisson baseline; `lingshu_vs_train` = the generated cells vs "
              "the training half (near `train_half` there but not in `lingshu`: the training cells are learned, "
              "the tissue beyond them is not). Metric definitions: "
              "`lingshu/metrics/` docstrings.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base", "paper"])
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--steps", type=int, default=32, help="sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=0.0)
    parser.add_argument("--cell-states", type=int, default=None,
                        help="condition on this many cell states (ModelConfig.cell_states; default: the preset's, 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--data", type=Path, default=None, help=f"path of {DATA_FILE}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--save-model", type=Path, default=None,
                        help="also save the trained model to this directory (re-sample it later with LingshuModel.load)")
    args = parser.parse_args(argv)

    import torch

    from lingshu import LingshuModel
    from lingshu.progress import setup_logging

    if not sys.stderr.isatty():  # a log file: the trainer's plain progress lines instead of a bar
        setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    path = args.data or data_path()
    if not path.exists():
        print(f"error: {path} not found; pass --data or set LINGSHU_DATA_DIR", file=sys.stderr)
        return 1

    cells = ad.read_h5ad(path)
    cells.obs[LABEL] = cells.obs[LABEL].astype(str)
    first, second = half_split(cells.n_obs, cells.obs[LABEL].to_numpy(), args.seed)
    train, heldout = cells[first].copy(), cells[second].copy()
    print(f"{path.name}: {cells.n_obs} cells x {cells.n_vars} genes; train {train.n_obs}, held-out {heldout.n_obs}")

    config = None
    if args.cell_states is not None:
        from lingshu.config import preset
        config = dataclasses.replace(preset(args.preset).model, cell_states=args.cell_states)
    model = LingshuModel(train, context_keys=[LABEL], preset=args.preset, config=config, seed=args.seed)
    t0 = time.perf_counter()
    history = model.train(max_steps=args.max_steps, device=device, progress=sys.stderr.isatty())
    train_s = time.perf_counter() - t0
    if args.save_model:
        model.save(args.save_model)
    t0 = time.perf_counter()
    sim = model.simulate(heldout.obs[[LABEL]], steps=args.steps, guidance_scale=args.guidance_scale,
                         seed=args.seed, device=device, progress=sys.stderr.isatty())
    sample_s = time.perf_counter() - t0
    print(f"trained {history.get('step', history.get('steps'))} steps in {train_s:.1f} s; "
          f"sampled {sim.n_obs} cells in {sample_s:.1f} s")

    t0 = time.perf_counter()
    report = distribution_report(heldout, sim, label_key=LABEL, seed=args.seed)
    baseline_train = score(heldout, train, args.seed)
    baseline_poisson = score(heldout, mean_poisson(train, heldout.obs[LABEL], args.seed), args.seed)
    fit = score(train, sim, args.seed)
    tiers = tier_table(heldout, sim, train, args.seed) if cells.n_vars > 1000 else None
    metrics_s = time.perf_counter() - t0
    table = pd.DataFrame({
        "metric": report["metric"],
        "lingshu": report["model"],
        "train_half": report["metric"].map(baseline_train),
        "heldout_half_split": report["half_split"],
        "mean_poisson": report["metric"].map(baseline_poisson),
        "lingshu_vs_train": report["metric"].map(fit),
        "better": report["better"],
    })

    by = table.set_index("metric")
    mmd, floor, auc = by.loc["mmd", "lingshu"], by.loc["mmd", "train_half"], by.loc["classifier_auc", "lingshu"]
    verdicts = [f"{'PASS' if mmd <= MMD_FACTOR * floor else 'FAIL'}: MMD {mmd:.4g} <= {MMD_FACTOR:g} x train-half floor "
                f"{floor:.4g} (ratio {mmd / floor:.2f})",
                f"{'PASS' if auc <= AUC_MAX else 'FAIL'}: classifier AUC {auc:.3f} <= {AUC_MAX}"]
    n_steps = history.get("step", history.get("steps"))
    losses = history.get("train_loss") or [[float("nan")]]
    last_loss = losses[-1][-1] if isinstance(losses[-1], (list, tuple)) else losses[-1]  # entries: [step, loss]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    meta = {
        "data": f"{path.name}: {cells.n_obs} cells x {cells.n_vars} genes, train {train.n_obs} / held-out {heldout.n_obs} "
                f"(stratified by {LABEL}, seed {args.seed})",
        "model": f"preset {args.preset}, {n_steps} training steps, "
                 f"{sum(p.numel() for p in model.denoiser.parameters()) / 1e6:.2f}M parameters, "
                 f"final train loss {float(last_loss):.4f}, {model.model_config.cell_states} cell states",
        "sampling": f"{args.steps} steps, guidance {args.guidance_scale:g}, {sim.n_obs} cells",
        "training wall time": f"{train_s:.1f} s",
        "sampling wall time": f"{sample_s:.1f} s",
        "metrics wall time": f"{metrics_s:.1f} s",
        "peak RSS": f"{peak_rss_mb:.0f} MiB",
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
                    f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}"
                    + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""),
    }
    if device.startswith("cuda"):
        meta["peak GPU memory"] = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"

    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "pbmc3k_generation.csv", index=False)
    if tiers is not None:
        tiers.to_csv(args.out / "pbmc3k_generation_tiers.csv", index=False)
    (args.out / "pbmc3k_generation.md").write_text(markdown(table, meta, verdicts, tiers))
    with pd.option_context("display.width", 160, "display.max_columns", 10, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    for k, v in meta.items():
        print(f"{k}: {v}")
    if tiers is not None:
        print(tiers.to_string(index=False, float_format="{:.3f}".format))
    print("\n".join(verdicts))
    print(f"wrote {args.out / 'pbmc3k_generation.csv'} and {args.out / 'pbmc3k_generation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
