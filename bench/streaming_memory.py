"""Benchmark: peak memory of training on (and simulating into) files larger than memory.

1. Writes a synthetic 1,000,000-cell x 18,080-gene sparse count ``.h5ad`` chunk by chunk
   (never in memory; gene detection rates from a log-normal, counts 1 + geometric; two
   cell-type labels) unless it already exists.
2. Runs ``lingshu train --in FILE --stream`` (tiny preset) in a child process and reads
   its peak resident memory (``ru_maxrss`` of the child).
3. For comparison, trains the same way on a 10,000-cell file with the same genes (so the
   difference is what the number of cells costs) and, with ``--in-memory``, on the big file
   loaded into memory (no ``--stream``).
4. Runs ``lingshu simulate --n-cells N`` into an ``.h5ad`` (streamed chunk by chunk) and
   reads its peak memory too.

Writes ``bench/results/streaming_memory.json``; ``bench/report_md.py`` puts it in
``BENCHMARKS.md``.

    python bench/streaming_memory.py --file /tmp/lingshu_1m.h5ad --max-steps 30 --sim-cells 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_synthetic(path: Path, n_cells: int, n_genes: int, seed: int = 0, chunk: int = 2000) -> dict:
    """Write the synthetic file with :class:`lingshu.h5ad_stream.H5adStreamWriter` (memory O(chunk))."""
    import anndata as ad

    from lingshu.h5ad_stream import H5adStreamWriter

    rng = np.random.default_rng(seed)
    detect = np.clip(np.exp(rng.normal(-4.6, 1.3, n_genes)), 0, 0.9).astype(np.float32)  # (G,) mean ~0.02
    genes = [f"GENE{j:05d}" for j in range(n_genes)]
    nnz = 0
    t0 = time.perf_counter()
    with H5adStreamWriter(path, genes, overwrite=True) as w:
        for start in range(0, n_cells, chunk):
            n = min(chunk, n_cells - start)
            hit = rng.random((n, n_genes), dtype=np.float32) < detect  # (n, G)
            x = sp.csr_matrix(hit, dtype=np.float32)
            x.data = (1 + rng.geometric(0.5, size=x.nnz)).astype(np.float32)
            types = np.where(rng.random(n) < 0.5, "A", "B")
            obs = pd.DataFrame({"cell_type": pd.Categorical(types, categories=["A", "B"])},
                               index=[f"cell{start + i}" for i in range(n)])
            w.append(ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes)))
            nnz += x.nnz
    return {"cells": n_cells, "genes": n_genes, "nnz": int(nnz), "bytes": path.stat().st_size,
            "write_s": round(time.perf_counter() - t0, 1)}


def run_child(cmd: list[str]) -> dict:
    """Run ``cmd``; return its wall time and peak RSS (children's ru_maxrss grows monotonically,
    so run each measured command in a fresh interpreter via this script's --child mode)."""
    t0 = time.perf_counter()
    wrapped = [sys.executable, __file__, "--child", "--", *cmd]
    out = subprocess.run(wrapped, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    rss_kb = int(out.stdout.strip().splitlines()[-1])
    return {"command": " ".join(cmd), "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(rss_kb / 1024, 1)}


def child(cmd: list[str]) -> None:
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(rc)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=Path("/tmp/lingshu_1m_18080.h5ad"))
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=18_080)
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--sim-cells", type=int, default=10_000)
    ap.add_argument("--sim-steps", type=int, default=1)
    ap.add_argument("--compare-cells", type=int, default=10_000)
    ap.add_argument("--in-memory", action="store_true", help="also train on the big file loaded into memory")
    ap.add_argument("--skip-simulate", action="store_true")
    ap.add_argument("--simulate-only", action="store_true",
                    help="re-measure only the simulation (model and results of an earlier run in --work/--out)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lingshu_streaming_bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "streaming_memory.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.cmd)
        return
    import torch

    if args.simulate_only:
        result = json.loads(args.out.read_text())
        simulate(args, result)
        return
    result: dict = {"hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                                f"torch {torch.__version__}, {torch.get_num_threads()} threads"}
    if not args.file.exists():
        print(f"writing {args.cells:,} x {args.genes:,} synthetic counts to {args.file} ...", flush=True)
        result["file"] = write_synthetic(args.file, args.cells, args.genes)
    else:
        import h5py
        with h5py.File(args.file, "r") as f:
            shape = [int(v) for v in f["X"].attrs["shape"]]
            nnz = int(f["X"]["data"].shape[0])
        result["file"] = {"cells": shape[0], "genes": shape[1], "nnz": nnz, "bytes": args.file.stat().st_size,
                          "note": "existing file reused"}
    result["file"]["path"] = str(args.file)
    print(json.dumps(result["file"]), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    small = args.work / f"same_genes_{args.compare_cells}.h5ad"
    if not small.exists():
        write_synthetic(small, args.compare_cells, args.genes)
    runs = {"train": (args.file, ["--stream"]), "train_small": (small, ["--stream"])}
    if args.in_memory:
        runs["train_in_memory"] = (args.file, [])
    lingshu = [sys.executable, "-m", "cli.main"]
    for name, (data, extra) in runs.items():
        run = args.work / name
        if run.exists():
            import shutil
            shutil.rmtree(run)
        result[name] = run_child([*lingshu, "train", "--in", str(data), *extra, "--out", str(run),
                                  "--context-key", "cell_type", "--preset", "tiny", "--max-steps",
                                  str(args.max_steps), "--device", "cpu", "--quiet"])
        hist = json.loads((run / "lingshu.json").read_text())["training"]
        result[name].update(cells=args.cells if data == args.file else args.compare_cells,
                            steps=hist["step"], train_seconds=round(hist["seconds"], 1),
                            cells_per_s=round(hist["cells_seen"] / hist["seconds"], 1))
        print(json.dumps(result[name]), flush=True)
    if not args.skip_simulate:
        simulate(args, result)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


def simulate(args, result: dict) -> None:
    """Measure ``lingshu simulate`` into a streamed .h5ad with the streamed model; write the results."""
    run = args.work / "train"
    sim = args.work / "sim.h5ad"
    lingshu = [sys.executable, "-m", "cli.main"]
    result["simulate"] = run_child([*lingshu, "simulate", "--model", str(run), "--n-cells", str(args.sim_cells),
                                    "--steps", str(args.sim_steps), "--out", str(sim), "--overwrite",
                                    "--device", "cpu", "--quiet"])
    result["simulate"].update(cells=args.sim_cells, genes=args.genes, out_bytes=sim.stat().st_size,
                              dense_float32_mb=round(args.sim_cells * args.genes * 4 / 2**20, 1))
    print(json.dumps(result["simulate"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
