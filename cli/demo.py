"""``lingshu demo``: train a tiny model on pbmc68k, generate as many cells per type as real, score."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ._common import console

log = logging.getLogger("lingshu.demo")

OUTPUTS = ("model", "generated.h5ad", "metrics.csv")


def run_demo(out: Path, *, max_steps: int | None, quick: bool, device: str, overwrite: bool,
             progress: bool) -> None:
    """Write ``out/model``, ``out/generated.h5ad`` and ``out/metrics.csv``."""
    import anndata as ad
    import pandas as pd

    from lingshu import LingshuModel
    from lingshu.config import preset
    from lingshu.datasets import pbmc68k_counts
    from lingshu.errors import LingshuError
    from lingshu.io import write_cells

    if out.exists() and not out.is_dir():
        raise LingshuError(f"--out {out} is a file; give a directory")
    present = [name for name in OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        raise LingshuError(f"{out} already holds demo outputs ({', '.join(present)}); pass --overwrite")
    if max_steps is None and quick:
        max_steps = 100
    sample_steps = 4 if quick else 32

    real = pbmc68k_counts()
    console.print(f"pbmc68k: {real.n_obs} cells x {real.n_vars} genes, "
                  f"{real.obs['cell_type'].nunique()} cell types", markup=False, highlight=False)
    # 32 cell states (ModelConfig.cell_states): chosen on a development split of these data (bench/model_changes.md)
    config = dataclasses.replace(preset("tiny").model, cell_states=32)
    model = LingshuModel(real, context_keys=["cell_type"], preset="tiny", config=config, seed=0)
    history = model.train(max_steps=max_steps, device=device, progress=progress)
    console.print(f"trained {history.get('step', '?')} steps in {history.get('seconds', 0.0):.1f} s",
                  markup=False, highlight=False)

    counts = real.obs["cell_type"].astype(str).value_counts()
    parts = []
    for i, (cell_type, n) in enumerate(counts.items()):
        part = model.generate(int(n), condition={"cell_type": cell_type}, steps=sample_steps,
                              seed=i, device=device, progress=progress)
        part.obs_names = [f"gen_{i}_{j}" for j in range(part.n_obs)]
        parts.append(part)
    sim = ad.concat(parts)
    sim.obs["cell_type"] = pd.Categorical(sim.obs["cell_type"].astype(str))

    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model")
    write_cells(sim, out / "generated.h5ad", overwrite=True)
    report = _score(real, sim)
    if report is not None:
        report.to_csv(out / "metrics.csv", index=False)
        _print_table(report)
    console.print(f"wrote {out / 'model'}, {out / 'generated.h5ad'}"
                  + (f", {out / 'metrics.csv'}" if report is not None else ""), markup=False, highlight=False)


def _score(real, sim):
    """The metrics report, or ``None`` (with a warning) when ``lingshu.metrics`` is unavailable."""
    try:
        from lingshu.metrics import distribution_report
    except ImportError as exc:
        log.warning("metrics skipped: %s", exc)
        return None
    return distribution_report(real, sim, label_key="cell_type", seed=0)


def _print_table(df) -> None:
    from rich.table import Table

    table = Table(title="generated vs real (pbmc68k)")
    for col in df.columns:
        table.add_column(str(col), justify="right" if df[col].dtype.kind in "fi" else "left")
    for row in df.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)
