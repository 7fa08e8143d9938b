"""Training and sampling throughput, MFU and peak memory of a preset on synthetic counts.

Usage::

    python bench/throughput.py --preset paper --genes 18080 --group-size 32 --device cuda
    python bench/throughput.py --preset tiny --genes 2000 --device cpu --train-steps 10

Writes one row per run to ``bench/results/throughput.csv`` (appending) and prints it.
The data are Poisson-Gamma counts with a realistic sparsity (~90 % zeros); speed does not
depend on their biology. MFU counts 6 x parameters x tokens for the blocks plus attention
(12 x layers x width x L^2 per cell) against the device's bf16 dense peak (``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import platform
import resource
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from lingshu import LingshuModel, TrainConfig
from lingshu.config import preset as get_preset

RESULTS = Path(__file__).parent / "results" / "throughput.csv"


def synthetic(n_cells: int, n_genes: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    mean = rng.gamma(0.3, 2.0, n_genes)  # (G,)
    rows = []
    for start in range(0, n_cells, 1024):
        n = min(1024, n_cells - start)
        lib = rng.lognormal(0, 0.4, (n, 1))
        rows.append(sp.csr_matrix(rng.poisson(mean * lib).astype(np.float32)))
    obs = pd.DataFrame({"cell_type": rng.choice(["a", "b", "c"], n_cells),
                        "perturbation": rng.choice(["ctrl"] + [f"p{i}" for i in range(50)], n_cells)},
                       index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(sp.vstack(rows).tocsr(), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))


def flops_per_cell(model: LingshuModel) -> float:
    cfg, den = model.model_config, model.denoiser
    L = den.n_groups + den.n_cond
    block_params = sum(p.numel() for p in den.blocks.parameters())
    io_params = den.group_in.weight.numel() + den.group_out.weight.numel()
    return 6.0 * (block_params * L + io_params * den.n_groups) + 12.0 * cfg.n_layers * cfg.d_model * L * L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--genes", type=int, default=18080)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--cells", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--sample-cells", type=int, default=10000)
    ap.add_argument("--sample-steps", type=int, nargs="+", default=[3, 256])
    ap.add_argument("--sample-batch", type=int, default=1024)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM 989)")
    args = ap.parse_args()

    p = get_preset(args.preset)
    mcfg = dataclasses.replace(p.model, group_size=args.group_size or p.model.group_size)
    data = synthetic(args.cells, args.genes)
    model = LingshuModel(data, context_keys=["cell_type"], perturbation_key="perturbation", control="ctrl",
                         preset=args.preset, config=mcfg)
    tcfg = dataclasses.replace(p.train, max_steps=3, val_fraction=0.0, val_every=10 ** 9,
                               batch_size=args.batch_size or p.train.batch_size)
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    model.train(tcfg, device=args.device)  # warm-up (allocations, kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tcfg = dataclasses.replace(tcfg, max_steps=args.train_steps)
    model2 = LingshuModel(data, context_keys=["cell_type"], perturbation_key="perturbation", control="ctrl",
                          preset=args.preset, config=mcfg)
    t0 = time.perf_counter()
    hist = model2.train(tcfg, device=args.device)
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    cells_per_s = hist["cells_seen"] / train_s
    mfu = cells_per_s * flops_per_cell(model2) / (args.peak_tflops * 1e12) if cuda else float("nan")
    train_peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")

    row = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "preset": args.preset, "genes": args.genes, "group_size": mcfg.group_size,
           "tokens": model2.denoiser.n_groups, "params_M": round(sum(q.numel() for q in model2.denoiser.parameters()) / 1e6, 2),
           "batch": tcfg.batch_size, "train_steps": args.train_steps, "train_cells_per_s": round(cells_per_s, 1),
           "mfu": round(mfu, 4), "train_peak_gib": round(train_peak, 2)}
    for steps in args.sample_steps:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model2.generate(args.sample_cells, {"perturbation": "p1"}, steps=steps, guidance_scale=2.0,
                        batch_size=args.sample_batch, device=args.device)
        if cuda:
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        row[f"sample_{steps}steps_s"] = round(s, 2)
        row[f"sample_{steps}steps_cells_per_s"] = round(args.sample_cells / s, 1)
        row[f"sample_{steps}steps_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else float("nan")
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    for k, v in row.items():
        print(f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
