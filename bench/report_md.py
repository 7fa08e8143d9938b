"""``BENCHMARKS.md`` from the CSVs of ``bench/run.py``: tables, targets (PASS/FAIL computed from the
numbers), hardware, the command, timings and the ``lingshu evaluate`` plots.

    python bench/report_md.py bench/results BENCHMARKS.md   # regenerate without rerunning
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

TOP = "pearson_delta_top100"
PERT_BASELINES = ("control", "pert_mean", "additive")
QUICK_BUDGET_S = 20 * 60
PLOTS = ("embedding.png", "lfc.png", "gene_means.png", "proportions.png")


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        a = abs(float(v))
        if a != 0 and (a < 1e-3 or a >= 1e5):
            return f"{float(v):.2e}"
        return f"{float(v):.{digits}f}" if a < 100 else f"{float(v):,.0f}"
    return str(v)


def _table(df: pd.DataFrame, cols: list[str]) -> list[str]:
    cols = [c for c in cols if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df[cols].itertuples(index=False):
        lines.append("| " + " | ".join(_f(v) for v in r) + " |")
    return lines


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def _read(out: Path, name: str) -> pd.DataFrame | None:
    p = out / f"{name}.csv"
    try:
        return pd.read_csv(p) if p.exists() else None
    except pd.errors.EmptyDataError:
        return None


def _rel(path: Path, md: Path) -> str:
    return os.path.relpath(path, md.parent).replace(os.sep, "/")


def _plots(report_dirs: list[str], md: Path, limit: int = 2) -> list[str]:
    lines, shown = [], 0
    for d in report_dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        pngs = [d / p for p in PLOTS if (d / p).exists()]
        if not pngs:
            continue
        links = ", ".join(f"[{p.name}]({_rel(p, md)})" for p in pngs)
        lines.append(f"- `{d.name}`: {links} ([summary.md]({_rel(d / 'summary.md', md)}))")
        if shown < limit:
            lines += [""] + [f"![{d.name} {p.stem}]({_rel(p, md)})" for p in pngs[:2]] + [""]
            shown += 1
    return lines


# ------------------------------------------------------------------ tasks
def _over_draws(df: pd.DataFrame, metrics: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Every method's metrics averaged over the evaluation draws (column ``draw``), and a text and
    table of Lingshu's spread; the other columns are the first draw's. One draw: unchanged."""
    draw = df["draw"].fillna(0).astype(int) if "draw" in df.columns else pd.Series(0, index=df.index)
    n = int(draw.max()) + 1 if len(draw) else 1
    if n == 1:
        return df, []
    mean = df.groupby(["holdout", "method"])[metrics].mean()
    first = df[draw == 0].set_index(["holdout", "method"])
    first.loc[:, metrics] = mean.reindex(first.index)
    own = df[df["method"] == "lingshu"].assign(_d=draw)
    rows = []
    for h, g in own.sort_values("_d").groupby("holdout"):
        rows.append({"holdout": h, **{f"{c} per draw": " / ".join(_f(v) for v in g[c])
                                      for c in (TOP, "energy_distance")},
                     **{f"{c} sd": g[c].std(ddof=0) for c in (TOP, "energy_distance")}})
    text = [f"Every method's scores are **means over {n} draws** with seeds seed .. seed+{n - 1}: Lingshu's "
            "sampling seed, and for every method the evaluation's seed (the baselines' stochastic rounding, the "
            "half split and the equal-count subsample); the targets are judged on these means, the report and "
            "plots are the first draw's. Lingshu per draw (sd ddof 0):", ""]
    return first.reset_index(), text + (_table(pd.DataFrame(rows), list(rows[0])) if rows else ["(no Lingshu rows)"]) + [""]


def kang_section(df: pd.DataFrame, md: Path) -> tuple[list[str], list[str]]:
    lines = ["## Task 1: novel cell type x IFN-beta (Kang 2018)", "",
             "Held out: the stimulated cells of one cell type at a time; predicted from that type's control "
             "cells; scored against its real stimulated cells (`lingshu evaluate`). Baselines learn from the "
             "training cells only; `half_split` is the ceiling (one half of the real cells vs the other).", ""]
    cols = ["holdout", "method", "pearson_delta", TOP, "des", "mae", "energy_distance", "mmd", "classifier_auc",
            "wall_s", "peak_rss_mb"]
    order = {m: i for i, m in enumerate(["lingshu", "scgen_scvi", "state", *PERT_BASELINES, "half_split"])}
    df, spread = _over_draws(df, [c for c in cols[2:-2] if c in df.columns])
    lines += spread
    df = df.assign(_o=df["method"].map(lambda m: order.get(m, 99))).sort_values(["holdout", "_o"])
    lines += _table(df, cols) + [""]
    mean = df.groupby("method", sort=False)[[c for c in cols[2:] if c in df.columns]].mean().reset_index()
    mean = mean.assign(_o=mean["method"].map(lambda m: order.get(m, 99))).sort_values("_o")
    lines += [f"Mean over {df['holdout'].nunique()} held-out type(s):", ""] + _table(mean, cols[1:]) + [""]

    targets = []
    piv = {m: df.pivot_table(index="holdout", columns="method", values=m, aggfunc="first")
           for m in (TOP, "energy_distance", "pearson_delta")}
    holdouts = sorted(df["holdout"].unique())
    wins = []
    for h in holdouts:
        top, en = piv[TOP].loc[h], piv["energy_distance"].loc[h]
        base = [b for b in PERT_BASELINES if b in top.index and pd.notna(top.get(b))]
        if "lingshu" not in top.index or not base:
            continue
        ok = all(top["lingshu"] > top[b] for b in base) and all(
            en["lingshu"] < en[b] for b in PERT_BASELINES if b in en.index and pd.notna(en.get(b)))
        wins.append((h, bool(ok)))
    n, k = len(wins), sum(ok for _, ok in wins)
    need = math.ceil(5 * n / 7) if n else 0
    scaled = "" if n == 7 else f" (target is >= 5 of 7; with {n} held out, >= {need})"
    targets.append(f"{_verdict(k >= need if n else None)}: Task 1: Lingshu beats every baseline "
                   f"({', '.join(PERT_BASELINES)}) on Pearson-delta (top 100 DE) and energy distance for "
                   f"{k} of {n} held-out types{scaled}: "
                   + (", ".join(f"{h} {'yes' if ok else 'no'}" for h, ok in wins) or "none scored"))
    pd_l = piv["pearson_delta"].get("lingshu")
    pd_h = piv["pearson_delta"].get("half_split")
    if pd_l is not None and pd_h is not None:
        ml, mh = float(np.nanmean(pd_l)), float(np.nanmean(pd_h))
        targets.append(f"{_verdict(ml >= 0.9 * mh)}: Task 1: mean Pearson-delta {ml:.3f} >= 0.9 x half-split "
                       f"ceiling {mh:.3f} (= {0.9 * mh:.3f}; ratio {ml / mh:.2f})")
    lines += ["Plots (`lingshu evaluate`):", ""] + _plots(sorted(df["report"].dropna().unique()), md) + [""]
    return lines, targets


def papalexi_section(df: pd.DataFrame, md: Path) -> tuple[list[str], list[str]]:
    lines = ["## Task 2: CRISPR knock-out (Papalexi 2021 ECCITE-seq)", "",
             "Held out: (replicate, target) combinations (rotating replicate per target); predicted from "
             "non-targeting cells of the same replicate. Metrics are means over held-out combinations "
             "(PDS is computed among them).", ""]
    per = df[df["condition"] != "mean"]
    conds = per[["holdout", "condition"]].drop_duplicates()
    lines += [f"{len(conds)} held-out combination(s): " + ", ".join(f"{c}" for c in conds["condition"]), ""]
    cols = ["pds", "des", "mae", "pearson_delta", TOP, "spearman_lfc"]
    mean = per.groupby("method", sort=False)[[c for c in cols if c in per.columns]].mean()
    cost = df[df["condition"] == "mean"].groupby("method")[["wall_s", "peak_rss_mb"]].agg(
        {"wall_s": lambda v: v.sum(min_count=1), "peak_rss_mb": "max"})
    mean = mean.join(cost, how="left").reset_index()
    order = {m: i for i, m in enumerate(["lingshu", "scgen_scvi", "state", *PERT_BASELINES, "half_split"])}
    mean = mean.assign(_o=mean["method"].map(lambda m: order.get(m, 99))).sort_values("_o")
    lines += _table(mean, ["method", *cols, "wall_s", "peak_rss_mb"]) + [""]
    piv = per.pivot_table(index="condition", columns="method", values="pearson_delta", aggfunc="first")
    show = [m for m in ["lingshu", "scgen_scvi", "state", "additive", "half_split"] if m in piv.columns]
    if show:
        lines += ["Pearson-delta per held-out combination:", "",
                  "| condition | " + " | ".join(show) + " |", "|" + "---|" * (len(show) + 1)]
        lines += [f"| {c} | " + " | ".join(_f(piv.loc[c, m]) for m in show) + " |" for c in piv.index] + [""]
    targets = []
    m = mean.set_index("method")
    if "half_split" in m.index:
        h = m.loc["half_split"]
        lines += [f"Half-split ceiling (what the real cells allow, many carrying a targeting guide without a "
                  f"knock-out phenotype): PDS {_f(h.get('pds'))}, DES {_f(h.get('des'))}, Pearson-delta "
                  f"{_f(h.get('pearson_delta'))}. Targets whose half-split Pearson-delta is low have effects "
                  "too weak to reproduce between two halves of their own cells.", ""]
    for metric in ("pds", "des"):
        if "lingshu" in m.index and all(b in m.index for b in ("pert_mean", "additive")):
            v, pm_, ad_ = m.loc["lingshu", metric], m.loc["pert_mean", metric], m.loc["additive", metric]
            ok = bool(v > pm_ and v > ad_) if all(np.isfinite([v, pm_, ad_])) else None
            targets.append(f"{_verdict(ok)}: Task 2: {metric.upper()} {_f(v)} above pert_mean {_f(pm_)} and "
                           f"additive {_f(ad_)}")
        else:
            targets.append(f"n/a: Task 2: {metric.upper()}: lingshu, pert_mean or additive missing")
    lines += ["Plots (`lingshu evaluate`):", ""] + _plots(sorted(df["report"].dropna().unique()), md) + [""]
    return lines, targets


def generation_section(df: pd.DataFrame, md: Path) -> tuple[list[str], list[str]]:
    lines = ["## Task 3: cell-type conditional generation across tissues and species", "",
             "Train on a stratified random half, generate as many cells per type as the held-out half holds, "
             "score against the held-out half. Floor = the real training half scored the same way "
             "(`train_half`, equal size); `half_split` = `lingshu evaluate`'s held-out quarter vs quarter. "
             "Ratio = Lingshu MMD / floor MMD. Lingshu's `mmd`, `auc` and `wasserstein` are means over "
             "`seeds` sampling seeds of the one trained model (`*_sd`: standard deviation; each draw is a "
             "`lingshu_seed<k>` row under All methods), and the targets below are judged on them; its other "
             "columns and the plots are the first draw's.", ""]
    g = df.set_index(["dataset", "method"])
    rows = []
    for ds in dict.fromkeys(df["dataset"]):
        def val(method, col):
            try:
                return float(g.loc[(ds, method), col])
            except (KeyError, TypeError, ValueError):
                return float("nan")
        draws = df[(df["dataset"] == ds) & df["method"].str.fullmatch(r"lingshu(_seed\d+)?")]

        def over_seeds(col):  # mean and sd over the sampling seeds of the one trained model
            v = pd.to_numeric(draws[col], errors="coerce").dropna() if col in draws else pd.Series(dtype=float)
            return (float(v.mean()) if len(v) else float("nan")), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))

        (mmd, mmd_sd), (auc, auc_sd) = over_seeds("mmd"), over_seeds("classifier_auc")
        floor = val("train_half", "mmd")
        rows.append({"dataset": ds, "cells(train/held)": f"{int(val('lingshu', 'n_train_cells'))}/"
                                                         f"{int(val('lingshu', 'n_real'))}",
                     "genes": int(val("lingshu", "n_genes")), "seeds": len(draws), "mmd": mmd, "mmd_sd": mmd_sd,
                     "floor_mmd": floor, "ratio": mmd / floor if floor > 0 else float("nan"),
                     "half_split_mmd": val("half_split", "mmd"),
                     "auc": auc, "auc_sd": auc_sd, "floor_auc": val("train_half", "classifier_auc"),
                     "ratio_vs_train": over_seeds("mmd_vs_train")[0] / floor if floor > 0 else float("nan"),
                     "auc_vs_train": over_seeds("auc_vs_train")[0],
                     "wasserstein": over_seeds("mean_wasserstein")[0],
                     "scvi_mmd": val("scvi", "mmd"), "scvi_wasserstein": val("scvi", "mean_wasserstein"),
                     "scvi_auc": val("scvi", "classifier_auc"), "poisson_mmd": val("mean_poisson", "mmd"),
                     "celltype_acc": val("lingshu", "celltype_accuracy"),
                     "celltype_tvd": val("lingshu", "celltype_tvd"),
                     "marker_overlap": val("lingshu", "marker_overlap"),
                     "floor_marker_overlap": val("train_half", "marker_overlap"),
                     "wall_s": val("lingshu", "wall_s"), "peak_rss_mb": val("lingshu", "peak_rss_mb")})
    t = pd.DataFrame(rows)
    lines += _table(t, list(t.columns)) + [""]
    lines += ["Columns: `mmd`, `auc` (classifier AUC, 0.5 ideal), `wasserstein` (mean per-gene Wasserstein), "
              "`celltype_acc` / `celltype_tvd` (generated cells assigned to types by a classifier trained on "
              "real cells; TVD of the proportions), `marker_overlap` (top-20 markers per type) are Lingshu's; "
              "`ratio_vs_train` / `auc_vs_train`: the same draws scored against the model's own training half "
              "(MMD / floor, AUC; near 1 and 0.5 there but not against the held-out half: the model reproduces "
              "its training cells, and the gap is generalisation from them); "
              "`scvi_*` scVI posterior predictive; `poisson_mmd` the per-type mean-profile Poisson baseline; "
              "`wall_s` / `peak_rss_mb` Lingshu training + sampling.", ""]
    all_cols = ["dataset", "method", "mmd", "energy_distance", "mean_wasserstein", "classifier_auc", "ilisi",
                "celltype_accuracy", "celltype_tvd", "marker_overlap", "wall_s", "peak_rss_mb"]
    lines += ["<details><summary>All methods</summary>", ""] + _table(df, all_cols) + ["", "</details>", ""]
    targets = []
    checks = {
        "MMD within 2x of the half-split floor": lambda r: r["mmd"] <= 2 * r["floor_mmd"],
        "classifier AUC <= 0.65": lambda r: r["auc"] <= 0.65,
        "MMD below scVI's": lambda r: r["mmd"] < r["scvi_mmd"] if np.isfinite(r["scvi_mmd"]) else None,
        "per-gene Wasserstein below scVI's": (lambda r: r["wasserstein"] < r["scvi_wasserstein"]
                                              if np.isfinite(r["scvi_wasserstein"]) else None),
    }
    for name, fn in checks.items():
        res = [(r["dataset"], fn(r)) for r in rows]
        known = [ok for _, ok in res if ok is not None]
        verdict = None if not known or len(known) < len(res) else all(known)
        targets.append(f"{_verdict(verdict)}: Task 3: every data set {name}: "
                       + ", ".join(f"{d} {'yes' if ok else ('n/a' if ok is None else 'no')}" for d, ok in res))
    lines += ["Plots (`lingshu evaluate`):", ""] + _plots(sorted(df["report"].dropna().unique()), md, limit=1) + [""]
    return lines, targets


# ---------------------------------------------------------------- models
def models_table(frames: dict[str, pd.DataFrame]) -> list[str]:
    rows = []
    for task, df in frames.items():
        if df is None:
            continue
        d = df[df["train_s"].notna()] if "train_s" in df.columns else df.iloc[0:0]
        if "condition" in d.columns:
            d = d[d["condition"].isna() | (d["condition"] == "mean")]
        for r in d.to_dict("records"):
            rows.append({"task": task, "data / holdout": f"{r.get('dataset')} / {r.get('holdout')}"
                         if task == "generation" else r.get("holdout"),
                         "method": r["method"], "cells": r.get("n_train_cells"), "genes": r.get("n_genes"),
                         "steps / epochs": r.get("steps") if pd.notna(r.get("steps", np.nan)) else r.get("epochs"),
                         "params": r.get("params"), "train_s": r.get("train_s"), "sample_s": r.get("sample_s"),
                         "wall_s": r.get("wall_s"), "cpu_s": r.get("cpu_s"), "peak_rss_mb": r.get("peak_rss_mb"),
                         "peak_gpu_mb": r.get("peak_gpu_mb")})
    if not rows:
        return []
    t = pd.DataFrame(rows)
    for c in ("cells", "genes", "steps / epochs", "params"):
        t[c] = pd.Series([int(v) if pd.notna(v) else None for v in t[c]], index=t.index, dtype=object)
    if t["peak_gpu_mb"].isna().all():
        t = t.drop(columns="peak_gpu_mb")
    return ["## Every model trained: wall time and peak memory", "",
            "`train_s` training, `sample_s` prediction / generation, `wall_s` both, `cpu_s` their CPU time "
            "(all threads; STATE: its CLI processes); `peak_rss_mb` peak resident memory of those blocks (kernel "
            "high-water mark reset per block; STATE: its CLI processes).", ""] + _table(t, list(t.columns)) + [""]


def _papalexi_targets(p: dict) -> str:
    """The held-out Papalexi targets of a profile, in words (older results have no offsets)."""
    n, offsets = p.get("papalexi_targets"), p.get("papalexi_offsets") or [0]
    if not n:
        return "all 25 targets"
    if len(offsets) == 1:
        return f"{n} targets (offset {offsets[0]})"
    return f"{n * len(offsets)} targets ({n} each from offsets {', '.join(map(str, offsets))})"


# ------------------------------------------------------------------ main
def _profile_text(p: dict) -> str:
    if not p:
        return "?"
    parts = [f"Lingshu preset `{p.get('preset')}`, training steps kang {p.get('kang_steps')} / papalexi "
             f"{p.get('papalexi_steps')} / generation {p.get('gen_steps')}"
             + (f", at most {p['loss_genes']} masked genes per cell in the loss" if p.get("loss_genes") else ""),
             f"predict {p.get('predict_steps')} steps with guidance {p.get('guidance_scale')}"
             + (f" (Kang: counterfactual start, mask fraction {p['kang_mask_fraction']}"
                + (f", {p['kang_coupling']} coupling" if p.get("kang_coupling", "independent") != "independent"
                   else "") + ")"
                if p.get("kang_mask_fraction") else "")
             + (f"; Kang guidance {p['kang_guidance']}" if p.get("kang_guidance") is not None else "")
             + (f" relative to `{p['kang_guidance_reference']}`"
                if p.get("kang_guidance_reference", "control") != "control" else "")
             + (f" over the {p['kang_neighbours']} nearest seen cell types" if p.get("kang_neighbours") else "")
             + (f" correlating >= {p['kang_min_similarity']} (the nearest always)"
                if p.get("kang_neighbours") and p.get("kang_min_similarity") is not None else "")
             + (f", {p['kang_global_weight']} x the pooled effect mixed in"
                if p.get("kang_neighbours") and p.get("kang_global_weight") else "")
             + (f", {p['kang_n_per_cell']} cells per control cell" if (p.get("kang_n_per_cell") or 1) > 1 else "")
             + (f", {p['kang_draws']} draws" if (p.get("kang_draws") or 1) > 1 else ""),
             f"generation sampling {p.get('gen_sample_steps')} steps, {p.get('gen_sample_seeds', 1)} seed(s)",
             f"genes: top {p['max_genes']} HVGs picked on the training cells" if p.get("max_genes") else "all genes",
             f"generation data sets subsampled to <= {p['gen_max_cells']} cells" if p.get("gen_max_cells")
             else "all cells",
             f"Kang held-out types: {', '.join(p['kang_types']) if p.get('kang_types') else 'all 7'}",
             f"Papalexi: {_papalexi_targets(p)} x {p.get('papalexi_folds')} fold(s)"
             + (f", <= {p['papalexi_max_ctrl']} control sources per replicate" if p.get("papalexi_max_ctrl") else "")
             + (f", {p['papalexi_n_per_cell']} cells per source" if (p.get("papalexi_n_per_cell") or 1) > 1 else "")
             + (f", target gene fixed at {p['papalexi_target_prior']} counts (prior injection)"
                if p.get("papalexi_target_prior") is not None else "")
             + (f", guidance gated at tau = {p['papalexi_guidance_gate']}" if p.get("papalexi_guidance_gate") else ""),
             "scVI epochs: scvi-tools default" + (f", <= {p['scvi_max_epochs']}" if p.get("scvi_max_epochs") else "")
             + (f", <= ~{p['scvi_max_updates']} updates" if p.get("scvi_max_updates") else ""),
             (f"STATE {p['state_steps']} steps ({'2-layer width-128' if p.get('state_small') else 'state_sm'}, "
              f"sets of {p.get('state_set_len')}, batch {p.get('state_batch')})") if p.get("state_steps") else "no STATE",
             f"threads {p.get('threads') or 'all'}"
             + (f" per process, {p['jobs']} tasks at once" if (p.get("jobs") or 1) > 1 else ""), f"seed {p.get('seed')}"]
    return "; ".join(parts)


def streaming_section(out: Path) -> list[str]:
    """Peak memory of streamed training / simulation (``bench/streaming_memory.py``), if it was run."""
    f = out / "streaming_memory.json"
    if not f.exists():
        return []
    r = json.loads(f.read_text())
    lines = ["## Data larger than memory (`bench/streaming_memory.py`)", "",
             f"Synthetic sparse counts written chunk by chunk: {r['file'].get('cells', 0):,} cells x "
             f"{r['file'].get('genes', 0):,} genes, {r['file'].get('nnz', 0):,} non-zeros, "
             f"{r['file'].get('bytes', 0) / 2**30:.2f} GiB on disk. Hardware: {r.get('hardware', '?')}. "
             "Peak RSS is the child process's `ru_maxrss`.", "",
             "| run | cells | peak RSS (MiB) | wall (s) | training (s) | cells/s | command |", "|---|---:|---:|---:|---:|---:|---|"]
    for name in ("train", "train_small", "train_in_memory"):
        if name in r:
            t = r[name]
            lines.append(f"| {name} | {t.get('cells', 0):,} | {t['peak_rss_mb']:,.0f} | {t['wall_s']} | "
                         f"{t.get('train_seconds', '')} | {t.get('cells_per_s', '')} | `{t['command'].split('-m ', 1)[-1]}` |")
    if "simulate" in r:
        t = r["simulate"]
        lines.append(f"| simulate | {t['cells']:,} | {t['peak_rss_mb']:,.0f} | {t['wall_s']} | | | "
                     f"`{t['command'].split('-m ', 1)[-1]}` |")
        lines += ["", f"The simulated matrix would be {t['dense_float32_mb']:,.0f} MiB dense (float32); it is "
                  "written to the .h5ad 1,024 cells at a time."]
    return lines + [""]


def write(out: Path, md: Path) -> str:
    out, md = Path(out), Path(md)
    meta = json.loads((out / "run_meta.json").read_text()) if (out / "run_meta.json").exists() else {}
    prof = meta.get("profile", {})
    hw = meta.get("hardware", {})
    smoke = "smoke" in str(meta.get("mode", ""))
    lines = ["# Lingshu benchmarks", ""]
    if smoke:
        lines += ["> **SMOKE RUN**: ~5 training steps and one holdout per task, to check the pipeline end to "
                  "end. The numbers below say nothing about the model.", ""]
    lines += [f"Generated by `bench/report_md.py` from `{_rel(out, md)}/*.csv`; numbers are never edited by hand.",
              "", "## Run", "",
              f"- command: `{meta.get('command', '?')}`"
              + (f" with {', '.join(f'{k}={v}' for k, v in meta.get('env', {}).items())}" if meta.get("env") else ""),
              f"- profile: **{meta.get('mode', '?')}**: {_profile_text(prof)}",
              f"- commit: {meta.get('commit', '?')}; started {meta.get('started', '?')}, finished "
              f"{meta.get('finished', '?')}",
              f"- hardware: {hw.get('cpu', '?')}, {hw.get('cpus_visible', '?')} CPUs visible, {hw.get('memory', '')}, "
              f"GPU: {hw.get('gpu', 'none')}; {hw.get('platform', '')}; Python {hw.get('python', '')}, torch "
              f"{hw.get('torch', '')} ({hw.get('torch_threads', '?')} threads)",
              f"- total wall time: {_f(meta.get('wall_s'))} s; peak RSS {_f(meta.get('peak_rss_mb'))} MiB"
              + (f" (the largest of the {prof['jobs']} task processes that ran at once)"
                 if (prof.get("jobs") or 1) > 1 else ""), ""]
    for task, info in meta.get("tasks", {}).items():
        if info.get("status") != "ok":
            lines.append(f"- task `{task}`: **{info.get('status')}**: {info.get('reason') or info.get('error')}")
    lines.append("")

    frames = {t: _read(out, t) for t in ("kang", "papalexi", "generation")}
    body, targets = [], []
    for task, fn in (("kang", kang_section), ("papalexi", papalexi_section), ("generation", generation_section)):
        if frames[task] is None or frames[task].empty:
            targets.append(f"n/a: {task}: not run")
            continue
        sec, tg = fn(frames[task], md)
        body += sec
        targets += tg
    ok_cost = []
    for task, df in frames.items():
        if df is not None and "wall_s" in df.columns:
            d = df[df["method"].isin(["lingshu", "scgen_scvi", "scvi", "state"])]
            if "draw" in d.columns:  # Kang's later draws re-use the first draw's trained model
                d = d[d["draw"].fillna(0) == 0]
            ok_cost.append(bool(d["wall_s"].notna().all() and d["peak_rss_mb"].notna().all()))
    targets.append(f"{_verdict(all(ok_cost) if ok_cost else None)}: Speed: every trained model reports wall time "
                   "and peak memory")
    if meta.get("wall_s") is not None:
        if prof and str(meta.get("mode", "")).startswith("quick") and not smoke:
            full_suite = set(meta.get("tasks", {})) == {"kang", "papalexi", "generation"}
            targets.append(f"{_verdict(meta['wall_s'] < QUICK_BUDGET_S if full_suite else None)}: Speed: --quick "
                           f"suite {meta['wall_s']:.0f} s < {QUICK_BUDGET_S} s on {hw.get('cpus_visible', '?')} "
                           "CPU core(s)" + ("" if full_suite else " (not every task ran)"))
        else:
            targets.append(f"n/a: Speed: --quick budget applies to a full quick run (this run: {meta['mode']}, "
                           f"{meta['wall_s']:.0f} s)")
    lines += ["## Targets", "", "Computed from the tables below by `bench/report_md.py`.", ""]
    lines += [f"- {t}" for t in targets] + [""] + body
    lines += models_table(frames)
    lines += streaming_section(out)

    inst = meta.get("peer_installs")
    if inst:
        lines += ["## Peers: install outcome", "",
                  "scVI is the generative peer (posterior predictive samples); `scgen_scvi` is scGen-style latent "
                  "arithmetic in scVI's latent space (cell-type-balanced mean shift, decoded with each control "
                  "cell's library size). Installs are checked with torch pinned (`pip install --dry-run PKG -c "
                  "constraint torch==<installed>`); nothing may replace the installed torch.", "",
                  "| package | version | status | detail |", "|---|---|---|---|"]
        lines += [f"| {r.get('package')} | {r.get('version') or '-'} | {r.get('status')} | "
                  f"{str(r.get('detail', '')).replace('|', '/')} |" for r in inst] + [""]
    notes = out / "notes.txt"
    if notes.exists() and notes.read_text().strip():
        lines += ["## Notes from this run", ""] + [f"- {n}" for n in notes.read_text().splitlines() if n.strip()]
        lines.append("")
    changes = Path(__file__).resolve().parent / "model_changes.md"
    if changes.exists():
        lines += [changes.read_text().rstrip(), ""]
    lines += ["## Method notes", "",
              "- `lingshu evaluate` reports Pearson-delta on all genes; `pearson_delta_top100` (Pearson-delta on "
              "the 100 genes with the smallest real Mann-Whitney p-value vs control, ties by |log2 FC|) is added "
              "by the suite (`bench/common.py: top_de_metric`) through the same evaluation code path.",
              "- Perturbation metrics follow cell-eval 0.8.2 (`lingshu/evaluate/perturbation.py`); distribution "
              "metrics `lingshu/metrics/`. `half_split` rows are ceilings, not competitors.",
              "- Settings are fixed by the profile in `bench/common.py` before any held-out cell is scored; no "
              "setting is tuned on a reported split.", ""]
    text = "\n".join(lines)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    return text


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    md = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
    write(out, md)
    print(f"wrote {md}")
