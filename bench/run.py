"""The Lingshu benchmark suite: perturbation (Kang IFN-beta, Papalexi CRISPR) and generation tasks,
with baselines, half-split ceilings and peers; writes ``<out>/*.csv`` and ``BENCHMARKS.md``.

    python bench/run.py --quick                       # 2 CPU cores, < 20 minutes
    python bench/run.py --full --device cuda          # one GPU, all holdouts, all genes
    python bench/run.py --quick --smoke               # pipeline check (~5 steps, 1 holdout per task)
    python bench/run.py --quick --tasks kang,generation --out bench/results

Data: ``$LINGSHU_DATA_DIR`` or ``<repo>/../shared/data``; a task whose file is absent is skipped
with a message. Every setting is fixed by the profile (``bench/common.py: make_profile``) before
any held-out cell is seen; nothing is tuned on the reported splits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (ROOT, Meter, MissingData, data_dir, exit_with_parent, hardware, make_profile,  # noqa: E402
                    set_threads, setup_logging)

log = logging.getLogger("bench")
TASKS = ("kang", "papalexi", "generation")
BY_COST = ("kang", "generation", "papalexi")  # longest first, so parallel jobs finish close together
TASK_FILES = {"kang": ["kang2018_ifnb_pbmc_scgen_valid.h5ad"],
              "papalexi": ["papalexi2021_eccite_thp1_sceptre_subset.h5ad"],
              "generation": None}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2-CPU profile (default)")
    mode.add_argument("--full", action="store_true", help="GPU profile: all holdouts, all genes, base preset")
    ap.add_argument("--smoke", action="store_true", help="~5 steps and 1 holdout per task: checks the pipeline only")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default bench/results; bench/results/smoke with --smoke)")
    ap.add_argument("--md", type=Path, default=None,
                    help="markdown report (default <repo>/BENCHMARKS.md for bench/results, else <out>/BENCHMARKS.md)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and BLAS threads (default: 1 for --quick, measured faster and steadier than 2 on a "
                         "shared 2-core machine; all cores for --full)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="tasks run at once, each in its own process with --threads threads (default: 2 for "
                         "--quick, one task per core; 1 for --full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default=None, help="override the profile's Lingshu preset")
    ap.add_argument("--max-steps", type=int, default=None, help="override the training steps of every task")
    ap.add_argument("--loss-genes", type=int, default=None,
                    help="override the masked genes scored per cell in training (0: the preset's own budget; "
                         "--quick sets 256, sized for tiny)")
    ap.add_argument("--cell-states", type=int, default=None,
                    help="generation: override the number of cell states the model conditions on (0: off)")
    ap.add_argument("--sample-steps", type=int, default=None,
                    help="generation: override the sampling steps (--quick: 32)")
    ap.add_argument("--sample-seeds", type=int, default=None,
                    help="generation: sampling seeds per trained model (default 3; Task 3 targets use the mean)")
    ap.add_argument("--kang-draws", type=int, default=None,
                    help="Kang: prediction + evaluation draws per held-out type with seeds seed, seed+1, ... "
                         "(--quick: 3; Task 1 targets use every method's mean)")
    ap.add_argument("--scvi-epochs", type=int, default=None, help="override the scVI epoch cap")
    ap.add_argument("--papalexi-offsets", default=None,
                    help="rotation offsets of the Papalexi target subset, comma-separated (--quick: 0,2,3, the "
                         "targets not used for development; 1 and 4 are the development folds)")
    ap.add_argument("--papalexi-targets", type=int, default=None, help="override the number of held-out targets")
    ap.add_argument("--papalexi-max-ctrl", type=int, default=None,
                    help="override the control cells per replicate Lingshu predicts from (0: every one)")
    ap.add_argument("--kang-types", default=None, help="override the held-out Kang cell types (comma-separated)")
    ap.add_argument("--datasets", default=None, help="override the generation data sets (comma-separated)")
    ap.add_argument("--state-steps", type=int, default=None, help="override STATE's training steps (0: skip STATE)")
    ap.add_argument("--mask-fraction", type=float, default=None,
                    help="Kang: predict in counterfactual mode, re-generating this fraction of each control "
                         "cell's genes")
    ap.add_argument("--coupling", choices=["independent", "quantile"], default=None,
                    help="Kang counterfactual start: re-generated genes drawn afresh, or carried by quantile")
    ap.add_argument("--neighbours", type=int, default=None,
                    help="Kang composed guidance: average the effect over this many nearest seen cell types "
                         "(0: the context-free effect)")
    ap.add_argument("--min-similarity", type=float, default=None,
                    help="Kang neighbours: leave out those, other than the nearest, whose control profile "
                         "correlates with the held-out type's below this (-1: keep them all)")
    ap.add_argument("--global-weight", type=float, default=None,
                    help="Kang neighbours: share of the context-free (all cell types pooled) effect in the "
                         "effect used (0: the neighbours alone)")
    ap.add_argument("--papalexi-guidance-gate", type=float, default=None, metavar="TAU",
                    help="Papalexi: guide only genes whose predicted mean log1p count moves by more than TAU "
                         "(0: every gene, as published)")
    ap.add_argument("--no-peers", action="store_true", help="skip scVI / scGen-style peers")
    ap.add_argument("--no-plots", action="store_true", help="skip the lingshu evaluate plots")
    ap.add_argument("--no-probe-installs", action="store_true",
                    help="do not run pip --dry-run for peers that are not installed")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


# numeric options: (argparse dest, smallest value, what the smallest value means or "")
_MINIMA = [("cell_states", 0, "0: off"), ("sample_steps", 1, ""), ("sample_seeds", 1, ""), ("kang_draws", 1, ""),
           ("papalexi_max_ctrl", 0, "0: every control cell"), ("papalexi_guidance_gate", 0, "0: off"),
           ("loss_genes", 0, "0: the preset's own")]


def arg_error(args: argparse.Namespace, tasks: list[str]) -> str | None:
    """The first problem with the command line, as one line, or ``None``."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        return f"unknown task(s) {', '.join(bad)}; choose from {', '.join(TASKS)}"
    for dest, low, meaning in _MINIMA:
        value = getattr(args, dest)
        if value is not None and not value >= low:  # `not >=`: NaN is refused too
            flag = "--" + dest.replace("_", "-")
            return f"{flag} must be >= {low}" + (f" ({meaning})" if meaning else "") + f", got {value}"
    try:
        _offsets(args.papalexi_offsets)
    except ValueError:
        return f"--papalexi-offsets must be integers separated by commas, got {args.papalexi_offsets!r}"
    return None


def _offsets(text: str | None) -> list[int] | None:
    """``--papalexi-offsets`` as integers (``None`` when not given); ``ValueError`` on anything else."""
    return [int(o) for o in text.split(",")] if text else None


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse(raw)
    setup_logging(args.verbose)
    mode = "full" if args.full else "quick"
    out = args.out or (ROOT / "bench" / "results" / ("smoke" if args.smoke else ""))
    main_results = out.resolve() == (ROOT / "bench" / "results").resolve()
    md = args.md or (ROOT / "BENCHMARKS.md" if main_results else out / "BENCHMARKS.md")  # side runs keep theirs
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    error = arg_error(args, tasks)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    offsets = _offsets(args.papalexi_offsets)  # checked by arg_error
    if not data_dir().is_dir():
        print(f"skipping the benchmark suite: data folder {data_dir()} not found "
              "(set LINGSHU_DATA_DIR to the folder with the .h5ad files)", file=sys.stderr)
        return 0

    import torch

    threads = args.threads or make_profile(mode).threads
    set_threads(threads)
    steps = args.max_steps
    profile = make_profile(mode, smoke=args.smoke, device=args.device, seed=args.seed, preset=args.preset,
                           kang_steps=steps, papalexi_steps=steps, gen_steps=steps,
                           scvi_max_epochs=args.scvi_epochs, papalexi_targets=args.papalexi_targets,
                           papalexi_offsets=offsets, papalexi_guidance_gate=args.papalexi_guidance_gate,
                           kang_types=args.kang_types.split(",") if args.kang_types else None,
                           gen_datasets=args.datasets.split(",") if args.datasets else None,
                           state_steps=args.state_steps, threads=threads, kang_mask_fraction=args.mask_fraction,
                           kang_coupling=args.coupling, kang_neighbours=args.neighbours,
                           kang_min_similarity=args.min_similarity, kang_global_weight=args.global_weight,
                           kang_draws=args.kang_draws,
                           gen_cell_states=args.cell_states, gen_sample_seeds=args.sample_seeds,
                           gen_sample_steps=args.sample_steps)
    if args.papalexi_max_ctrl is not None:  # 0: every control cell (None in the profile)
        profile = dataclasses.replace(profile, papalexi_max_ctrl=args.papalexi_max_ctrl or None)
    if args.loss_genes is not None:  # 0: the preset's own budget (None in the profile)
        profile = dataclasses.replace(profile, loss_genes=args.loss_genes or None)
    profile = dataclasses.replace(profile, peers=not args.no_peers, plots=not args.no_plots,
                                  jobs=max(1, args.jobs or profile.jobs))
    if mode == "full" and not args.smoke and not torch.cuda.is_available():
        log.warning("--full is sized for a GPU (preset %s, %s steps per model) but no CUDA device is visible; "
                    "this will take many hours on CPUs", profile.preset, profile.kang_steps)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in raw)
    env_threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    meta = {"command": command, "env": env_threads, "mode": profile.name, "profile": dataclasses.asdict(profile),
            "hardware": hardware(), "commit": _git_commit(), "data_dir": str(data_dir()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tasks": {}, "out": str(out)}
    (out / "notes.txt").unlink(missing_ok=True)
    for stale in TASKS:  # a task not run this time must not leave an old table behind
        (out / f"{stale}.csv").unlink(missing_ok=True)
    log.info("suite %s: tasks %s -> %s", profile.name, ", ".join(tasks), out)
    t0 = time.perf_counter()
    runnable = []
    for task in tasks:
        missing = [n for n in TASK_FILES[task] or [] if not (data_dir() / n).exists()]
        if missing:
            meta["tasks"][task] = {"status": "skipped", "reason": f"{data_dir() / missing[0]} not found"}
            log.warning("%s skipped: %s not found", task, data_dir() / missing[0])
        else:
            meta["tasks"][task] = {"status": "not finished"}
            runnable.append(task)
    _write_meta(out, meta)
    for task, info in _run_tasks(runnable, profile, out, args):
        meta["tasks"][task] = info
        _write_meta(out, meta)
    if profile.peers:
        import peers

        try:
            meta["peer_installs"] = peers.install_report(probe_missing=not args.no_probe_installs,
                                                         cache=out / "peer_installs.json")
        except Exception as err:  # noqa: BLE001 - the report must still be written
            meta["peer_installs"] = [{"package": "?", "status": "probe failed", "detail": repr(err)}]
    meta["wall_s"] = time.perf_counter() - t0  # the whole suite, install probes included
    meta["peak_rss_mb"] = Meter.suite_peak_mb
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    _write_meta(out, meta)

    import report_md

    report_md.write(out, md)
    log.info("suite done in %.0f s; wrote %s and %s", meta["wall_s"], out, md)
    return 0 if all(t.get("status") in ("ok", "skipped") for t in meta["tasks"].values()) else 1


def _run_tasks(tasks: list[str], profile, out: Path, args):
    """Yield ``(task, info)`` as tasks finish: one after another, or ``profile.jobs`` at once in
    separate processes (each with ``profile.threads`` threads), longest tasks first."""
    if profile.jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield task, _run_task(task, profile, out, args)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    order = sorted(tasks, key=BY_COST.index)
    log.info("running %s in %d processes (%s thread(s) each)", ", ".join(order), profile.jobs,
             profile.threads or "all")
    with ProcessPoolExecutor(max_workers=profile.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent) as pool:
        futures = {pool.submit(_task_process, task, profile, out, args): task for task in order}
        for fut in as_completed(futures):
            task = futures[fut]
            try:
                info, peak_mb = fut.result()
            except Exception as err:  # noqa: BLE001 - a crashed worker (e.g. killed for memory) fails its task only
                log.error("%s: worker process failed: %r", task, err)
                yield task, {"status": "failed", "error": f"worker process failed: {err!r}"}
                continue
            Meter.suite_peak_mb = max(Meter.suite_peak_mb, peak_mb)
            yield task, info


def _task_process(task: str, profile, out: Path, args) -> tuple[dict, float]:
    """One task in a worker process: the parent's logging and thread settings, then :func:`_run_task`."""
    setup_logging(args.verbose)
    set_threads(profile.threads)
    info = _run_task(task, profile, out, args)
    return info, Meter.suite_peak_mb


def _run_task(task: str, profile, out: Path, args) -> dict:
    import importlib

    mod = importlib.import_module(f"task_{task}")
    try:
        with Meter() as meter:
            df = mod.run(profile, out)
    except MissingData as err:
        log.warning("%s skipped: %s", task, err)
        return {"status": "skipped", "reason": str(err)}
    except Exception as err:  # noqa: BLE001 - one failing task must not lose the others
        log.error("%s failed:\n%s", task, traceback.format_exc())
        return {"status": "failed", "error": f"{err.__class__.__name__}: {err}",
                "traceback": traceback.format_exc()[-4000:]}
    if df.empty:
        log.warning("%s skipped: no results (data files missing?)", task)
        return {"status": "skipped", "reason": "no results: no data file found (see the log)"}
    df.to_csv(out / f"{task}.csv", index=False)
    log.info("%s: %d rows in %.0f s (CPU %.0f s, peak RSS %.0f MiB) -> %s", task, len(df), meter.wall_s, meter.cpu_s,
             meter.peak_rss_mb, out / f"{task}.csv")
    return {"status": "ok", "wall_s": meter.wall_s, "cpu_s": meter.cpu_s, "peak_rss_mb": meter.peak_rss_mb,
            "rows": len(df)}


def _write_meta(out: Path, meta: dict) -> None:
    (out / "run_meta.json").write_text(json.dumps(meta, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
