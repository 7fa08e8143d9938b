"""Task 2: genetic perturbation, CRISPR knock-out (Papalexi et al. 2021 ECCITE-seq, THP-1).

Unassigned cells are dropped. Context = ``replicate``, perturbation = ``target_gene``, control =
``non-targeting``. Targets (sorted by name) are taken every k-th from one or more offsets (a
rotating subset; all 25 in the full profile); in fold f, target i is held out in replicate
``(i + f) mod 3``, so every model still sees each held-out target in the two other replicates
and, over three folds, every (replicate, target) combination is held out once. One model per
fold predicts each held-out combination from control cells of its replicate (with the target gene
fixed at ``papalexi_target_prior`` counts when it is modelled: the published prior injection); scored with the
Virtual Cell Challenge metrics of ``lingshu evaluate`` (PDS, DES, MAE, Pearson-delta) beside
``control``, ``pert_mean``, ``additive``, the ``half_split`` ceiling (what the real cells
allow, given that many cells escape the knock-out) and the scGen-style scVI peer.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DIST_COLS, Meter, Profile, combine, note, pin_threads, read_counts,  # noqa: E402
                    resolve_device, run_evaluate, train_config, wide)

log = logging.getLogger("bench")

DATA = "papalexi2021_eccite_thp1_sceptre_subset.h5ad"
CTX, PERT, CONTROL = "replicate", "target_gene", "non-targeting"


def pick_targets(targets: list[str], n: int | None, offsets: Sequence[int] = (0,)) -> list[str]:
    """Every k-th target from each offset (k = ceil(len / n)), offset by offset: the rotating subset.

    With ``n`` = 5 of 25 targets, offsets 0 .. 4 split the targets into five disjoint groups.
    """
    targets = sorted(targets)
    if n is None or n >= len(targets):
        return targets
    k = math.ceil(len(targets) / n)
    picked = [targets[(o + i * k) % len(targets)] for o in offsets for i in range(n)]
    return list(dict.fromkeys(picked))  # an offset given twice adds nothing


def target_prior(genes: list[str], target: str, count: int | None) -> dict[str, int] | None:
    """Prior injection for a knock-out: the target gene fixed at ``count`` (when it is a modelled gene)."""
    return {target: count} if count is not None and target in genes else None


def run(profile: Profile, out: Path) -> pd.DataFrame:
    from lingshu import LingshuModel

    import peers

    device = resolve_device(profile.device)
    cells = read_counts(DATA)
    cells = cells[(cells.obs[PERT] != "unassigned").to_numpy()].copy()
    reps = sorted(cells.obs[CTX].unique())
    all_targets = sorted(t for t in cells.obs[PERT].unique() if t != CONTROL)
    targets = pick_targets(all_targets, profile.papalexi_targets, profile.papalexi_offsets)
    scvi_ok, scvi_msg = peers.scvi_status() if profile.peers else (False, "peers disabled")
    if profile.peers and not scvi_ok:
        note(out, f"papalexi: scVI peers skipped: {scvi_msg}")
    rng = np.random.default_rng(profile.seed)
    rows = []
    for fold in range(profile.papalexi_folds):
        held = [(reps[(i + fold) % len(reps)], t) for i, t in enumerate(targets)]
        pair = cells.obs[CTX].astype(str) + "|" + cells.obs[PERT].astype(str)
        hold = pair.isin([f"{r}|{t}" for r, t in held]).to_numpy()
        train = cells[~hold].copy()
        used_reps = sorted({r for r, _ in held})
        ctrl = ((cells.obs[PERT] == CONTROL) & cells.obs[CTX].isin(used_reps)).to_numpy()
        real = cells[hold | ctrl].copy()
        log.info("papalexi fold %d: train %d cells; held out %d cells in %d (replicate, target) pairs: %s",
                 fold, train.n_obs, int(hold.sum()), len(held), ", ".join(f"{r}/{t}" for r, t in held))
        sources = {}
        for r in used_reps:
            idx = np.flatnonzero(((real.obs[PERT] == CONTROL) & (real.obs[CTX] == r)).to_numpy())
            if profile.papalexi_max_ctrl and len(idx) > profile.papalexi_max_ctrl:
                idx = np.sort(rng.choice(idx, profile.papalexi_max_ctrl, replace=False))
            sources[r] = real[idx].copy()
        base = {"task": "papalexi", "dataset": DATA, "holdout": f"fold{fold}", "n_train_cells": train.n_obs,
                "n_genes": train.n_vars}
        report_dir = out / "papalexi" / f"fold{fold}"

        model = LingshuModel(train, context_keys=[CTX], perturbation_key=PERT, control=CONTROL,
                             preset=profile.preset, seed=profile.seed)
        pin_threads()
        with Meter() as m_train:
            hist = model.train(train_config(profile), max_steps=profile.papalexi_steps, device=device)
        pin_threads()
        with Meter() as m_pred:
            pred = ad.concat([model.predict(sources[r], [t], guidance_scale=profile.guidance_scale,
                                            n_per_cell=profile.papalexi_n_per_cell,
                                            guidance_gate=profile.papalexi_guidance_gate,
                                            steps=profile.predict_steps, seed=profile.seed + i, device=device,
                                            prior=target_prior(model.genes, t, profile.papalexi_target_prior))
                              for i, (r, t) in enumerate(held)], index_unique="-")
        with Meter() as m_eval:
            report = run_evaluate(pred, real, perturbation_key=PERT, control_label=CONTROL, context_key=CTX,
                                  train=train, baselines=["control", "pert_mean", "additive", "half_split"],
                                  distribution="pooled", out_dir=report_dir, plots=profile.plots,
                                  embedding=profile.embedding, seed=profile.seed)
        cost = combine(m_train, m_pred) | {"train_s": m_train.wall_s, "sample_s": m_pred.wall_s,
                                           "steps": hist.get("step"),
                                           "params": sum(p.numel() for p in model.denoiser.parameters())}
        rows += _rows(report, "lingshu", base, cost, m_eval.wall_s, report_dir)

        if scvi_ok:
            smodel, m_strain = peers.fit_scvi(train, profile, device, batch_key=CTX)
            pin_threads()
            with Meter() as m_spred:
                parts = [peers.scgen_latent_shift(smodel, train, sources[r], perturbation_key=PERT, control=CONTROL,
                                                  perturbations=[t], context_key=CTX, batch_key=CTX,
                                                  seed=profile.seed + i) for i, (r, t) in enumerate(held)]
                spred = ad.concat([p for p in parts if p is not None], index_unique="-")
            with Meter() as m_seval:
                srep = run_evaluate(spred, real, perturbation_key=PERT, control_label=CONTROL, context_key=CTX,
                                    train=train, baselines=[], distribution="pooled", plots=False, seed=profile.seed)
            rows += _rows(srep, "scgen_scvi", base, peers.scvi_cost(smodel, m_strain, m_spred), m_seval.wall_s, None)
        res = peers.run_state(profile, out, f"papalexi fold {fold}", train, {(r, t): sources[r] for r, t in held},
                              context_key=CTX, perturbation_key=PERT, control=CONTROL, device=device)
        if res is not None:
            spred, c_train, c_pred = res
            with Meter() as m_seval:
                srep = run_evaluate(spred, real, perturbation_key=PERT, control_label=CONTROL, context_key=CTX,
                                    train=train, baselines=[], distribution="pooled", plots=False, seed=profile.seed)
            rows += _rows(srep, "state", base, peers.state_cost(c_train, c_pred, profile.state_steps), m_seval.wall_s,
                          None)
        pd.DataFrame(rows).to_csv(out / "papalexi.partial.csv", index=False)
    (out / "papalexi.partial.csv").unlink(missing_ok=True)
    return pd.DataFrame(rows)


def _rows(report: pd.DataFrame, name: str, base: dict, cost: dict, eval_s: float, report_dir) -> list[dict]:
    """Per-condition rows plus one ``condition == "mean"`` row per method (pooled distribution metrics)."""
    per = wide(report, {"model": name}, per_condition=True)
    per = per[[c for c in per.columns if c not in DIST_COLS]]  # distribution metrics are pooled only
    mean = wide(report, {"model": name}).assign(condition="mean")
    out = []
    for r in pd.concat([mean, per], ignore_index=True).to_dict("records"):
        extra = {"eval_s": eval_s, "report": str(report_dir) if report_dir else ""}
        if r["method"] == name:
            extra |= cost
        out.append(base | r | extra)
    return out


if __name__ == "__main__":
    from run import main

    raise SystemExit(main(["--tasks", "papalexi", *sys.argv[1:]]))
