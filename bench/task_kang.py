"""Task 1: novel identity x perturbation, IFN-beta (Kang et al. 2018, scGen's validation split).

For each held-out cell type T: train on every cell except T's stimulated cells (context =
``cell_type``, perturbation = ``condition``, control = ``control``), simulate T's stimulated
state from T's control cells (``LingshuModel.predict``), and score with ``lingshu evaluate``
against T's real stimulated cells (controls: T's control cells), beside the ``control``,
``pert_mean`` and ``additive`` baselines (learned from the training cells only) and the
``half_split`` ceiling, plus the scGen-style peer in scVI's latent space. With ``kang_draws = n``
the prediction and the evaluation are repeated with seeds ``seed .. seed + n - 1`` (Lingshu's
sampling, the baselines' stochastic rounding, the half split and the equal-count subsample all
re-drawn; column ``draw``); the report and plots are the first draw's.

    python bench/task_kang.py --quick   # or via bench/run.py
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (KANG_TYPES, Meter, Profile, combine, note, pin_threads, read_counts,  # noqa: E402
                    resolve_device, run_evaluate, select_genes, train_config, wide)

log = logging.getLogger("bench")

DATA = "kang2018_ifnb_pbmc_scgen_valid.h5ad"
CTX, PERT, CONTROL, STIM = "cell_type", "condition", "control", "stimulated"


def run(profile: Profile, out: Path) -> pd.DataFrame:
    import torch

    from lingshu import LingshuModel

    import peers

    device = resolve_device(profile.device)
    cells = read_counts(DATA)
    types = profile.kang_types or KANG_TYPES
    scvi_ok, scvi_msg = peers.scvi_status() if profile.peers else (False, "peers disabled")
    if profile.peers and not scvi_ok:
        note(out, f"kang: scVI peers skipped: {scvi_msg}")
    rows = []
    for t in types:
        hold = ((cells.obs[CTX] == t) & (cells.obs[PERT] == STIM)).to_numpy()
        if not hold.any():
            note(out, f"kang: no stimulated {t!r} cells; skipped (types: {', '.join(sorted(cells.obs[CTX].unique()))})")
            continue
        train = cells[~hold].copy()
        genes = select_genes(train, profile.max_genes)
        data = cells if genes is None else cells[:, genes].copy()
        train = data[~hold].copy()
        real = data[(data.obs[CTX] == t).to_numpy()].copy()  # T's controls + T's stimulated cells
        source = real[(real.obs[PERT] == CONTROL).to_numpy()].copy()
        log.info("kang %s: train %d cells x %d genes; held out %d stimulated, %d control sources",
                 t, train.n_obs, train.n_vars, int(hold.sum()), source.n_obs)
        base = {"task": "kang", "dataset": DATA, "holdout": t, "n_train_cells": train.n_obs, "n_genes": train.n_vars,
                "n_real": int(hold.sum())}
        report_dir = out / "kang" / t.replace("/", "_").replace("+", "p")

        model = LingshuModel(train, context_keys=[CTX], perturbation_key=PERT, control=CONTROL,
                             preset=profile.preset, seed=profile.seed)
        pin_threads()
        with Meter() as m_train:
            hist = model.train(train_config(profile), max_steps=profile.kang_steps, device=device)
        guidance = profile.guidance_scale if profile.kang_guidance is None else profile.kang_guidance
        n_params = sum(p.numel() for p in model.denoiser.parameters())
        for draw in range(max(1, profile.kang_draws)):  # draw 0 writes the report and plots
            seed = profile.seed + draw
            pin_threads()
            with Meter() as m_pred:
                pred = model.predict(source, [STIM], guidance_scale=guidance, steps=profile.predict_steps,
                                     n_per_cell=profile.kang_n_per_cell,
                                     guidance_reference=profile.kang_guidance_reference,
                                     mask_fraction=profile.kang_mask_fraction, coupling=profile.kang_coupling,
                                     neighbours=profile.kang_neighbours, min_similarity=profile.kang_min_similarity,
                                     global_weight=profile.kang_global_weight,
                                     seed=seed, device=device)
            with Meter() as m_eval:
                report = run_evaluate(pred, real, perturbation_key=PERT, control_label=CONTROL, context_key=CTX,
                                      train=train, baselines=["control", "pert_mean", "additive", "half_split"],
                                      distribution="pooled", out_dir=report_dir if draw == 0 else None,
                                      plots=profile.plots and draw == 0, embedding=profile.embedding, seed=seed)
            for r in wide(report, {"model": "lingshu"}).to_dict("records"):
                extra = {"draw": draw, "eval_s": m_eval.wall_s, "report": str(report_dir) if draw == 0 else None}
                if r["method"] == "lingshu":
                    extra["sample_s"] = m_pred.wall_s
                    if draw == 0:  # the trained model's cost: training + the first prediction
                        extra |= {"train_s": m_train.wall_s, **combine(m_train, m_pred), "steps": hist.get("step"),
                                  "params": n_params}
                rows.append(base | r | extra)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

        if scvi_ok:
            smodel, m_strain = peers.fit_scvi(train, profile, device)
            pin_threads()
            with Meter() as m_spred:
                spred = peers.scgen_latent_shift(smodel, train, source, perturbation_key=PERT, control=CONTROL,
                                                 perturbations=[STIM], context_key=CTX, seed=profile.seed)
            with Meter() as m_seval:
                srep = run_evaluate(spred, real, perturbation_key=PERT, control_label=CONTROL, context_key=CTX,
                                    train=train, baselines=[], distribution="pooled", plots=False,
                                    seed=profile.seed)
            for r in wide(srep, {"model": "scgen_scvi"}).to_dict("records"):
                rows.append(base | r | {"eval_s": m_seval.wall_s} | peers.scvi_cost(smodel, m_strain, m_spred))
        res = peers.run_state(profile, out, f"kang {t}", train, {(t, STIM): source}, context_key=CTX,
                              perturbation_key=PERT, control=CONTROL, device=device)
        if res is not None:
            spred, c_train, c_pred = res
            with Meter() as m_seval:
                srep = run_evaluate(spred, real, perturbation_key=PERT, control_label=CONTROL, context_key=CTX,
                                    train=train, baselines=[], distribution="pooled", plots=False,
                                    seed=profile.seed)
            for r in wide(srep, {"model": "state"}).to_dict("records"):
                rows.append(base | r | {"eval_s": m_seval.wall_s}
                            | peers.state_cost(c_train, c_pred, profile.state_steps))
        pd.DataFrame(rows).to_csv(out / "kang.partial.csv", index=False)
    (out / "kang.partial.csv").unlink(missing_ok=True)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    from run import main

    raise SystemExit(main(["--tasks", "kang", *sys.argv[1:]]))
