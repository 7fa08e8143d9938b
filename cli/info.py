"""``lingshu info``: what is inside a data file or a model directory (report on stdout)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

_CHUNK = 4096
_TOP_LEVELS = 8


def _nnz(x) -> int:
    if sp.issparse(x):
        return int(x.nnz)
    if isinstance(x, np.ndarray):
        return int(np.count_nonzero(x))
    total = 0  # backed matrix: count in row chunks
    for start in range(0, x.shape[0], _CHUNK):
        chunk = x[start:start + _CHUNK]
        total += int(chunk.nnz) if sp.issparse(chunk) else int(np.count_nonzero(chunk))
    return total


def _matrix(x) -> dict[str, Any]:
    from lingshu.validation import check_count_values

    why = check_count_values(x)
    kind = "sparse" if sp.issparse(x) or not isinstance(x, np.ndarray) else "dense"
    return {"shape": list(x.shape), "kind": kind, "dtype": str(x.dtype), "nnz": _nnz(x),
            "integer_counts": why is None, "why_not_counts": why}


def _column(s: pd.Series) -> dict[str, Any]:
    if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == bool or pd.api.types.is_string_dtype(s) \
            or s.dtype == object:
        counts = s.astype(str).value_counts()
        return {"kind": "labels", "n_levels": int(len(counts)),
                "levels": {str(k): int(v) for k, v in counts.head(_TOP_LEVELS).items()}}
    values = pd.to_numeric(s, errors="coerce")
    return {"kind": "numeric", "min": float(values.min()), "max": float(values.max()),
            "mean": float(values.mean())}


def data_report(path: Path) -> dict[str, Any]:
    """Shape, obs columns, layers and where the integer counts are, of a data file."""
    from lingshu.io import read_cells

    adata = read_cells(path, backed=path.suffix.lower() == ".h5ad")
    try:
        report: dict[str, Any] = {
            "path": str(path), "kind": "data", "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars),
            "genes": [str(g) for g in adata.var_names[:5]],
            "X": _matrix(adata.X) if adata.X is not None else None,
            "layers": {name: _matrix(adata.layers[name]) for name in adata.layers.keys()},
            "raw": _matrix(adata.raw.X) if adata.raw is not None else None,
            "obs": {str(c): _column(adata.obs[c]) for c in adata.obs.columns},
        }
    finally:
        if getattr(adata, "isbacked", False):
            adata.file.close()
    return report


def model_report(path: Path) -> dict[str, Any]:
    """Genes, condition vocabularies, configs and training length of a model directory."""
    from lingshu import LingshuModel

    model = LingshuModel.load(path)
    manifest = json.loads((path / "lingshu.json").read_text())
    report: dict[str, Any] = {
        "path": str(path), "kind": "model", "format_version": manifest.get("format_version"),
        "n_genes": len(model.genes), "genes": [str(g) for g in model.genes[:5]],
        "condition_keys": list(model.condition_keys),
        "vocab_sizes": {k: len(v) for k, v in model.categories.items()},
        "categories": {k: [str(x) for x in v[:_TOP_LEVELS]] for k, v in model.categories.items()},
        "perturbation_key": model.perturbation_key, "control": model.control,
    }
    training = manifest.get("training") or {}
    report["steps"] = training.get("steps", training.get("step"))
    for key in ("preset", "lingshu_version", "model_config", "train_config"):
        if key in manifest:
            report[key] = manifest[key]
    return report


def format_report(report: dict[str, Any]) -> str:
    """Plain text for people (``--json`` gives the dict itself)."""
    lines = []
    if report["kind"] == "data":
        lines.append(f"{report['path']}: {report['n_cells']} cells x {report['n_genes']} genes "
                     f"(genes: {', '.join(report['genes'])}{', ...' if report['n_genes'] > 5 else ''})")

        def mat(name: str, m: dict[str, Any] | None) -> None:
            if m is None:
                return
            counts = "integer counts" if m["integer_counts"] else f"NOT counts ({m['why_not_counts']})"
            lines.append(f"  {name:<18} {m['kind']} {m['dtype']}, nnz {m['nnz']:,}, {counts}")

        lines.append("matrices:")
        mat("X", report["X"])
        for name, m in report["layers"].items():
            mat(f"layers[{name!r}]", m)
        mat(".raw.X", report["raw"])
        lines.append("obs:" if report["obs"] else "obs: (no columns)")
        for name, col in report["obs"].items():
            if col["kind"] == "labels":
                shown = ", ".join(f"{k} {v}" for k, v in col["levels"].items())
                more = ", ..." if col["n_levels"] > len(col["levels"]) else ""
                lines.append(f"  {name} ({col['n_levels']} levels): {shown}{more}")
            else:
                lines.append(f"  {name} (numeric): min {col['min']:.4g}, max {col['max']:.4g}, mean {col['mean']:.4g}")
    else:
        lines.append(f"{report['path']}: Lingshu model (format {report['format_version']}), "
                     f"{report['n_genes']} genes ({', '.join(report['genes'])}, ...)")
        if report.get("preset"):
            lines.append(f"preset: {report['preset']}, written by Lingshu {report.get('lingshu_version', '?')}")
        lines.append(f"steps trained: {report['steps'] if report.get('steps') is not None else 'unknown'}")
        lines.append("conditions:" if report["condition_keys"] else "conditions: none (unconditional)")
        for key in report["condition_keys"]:
            role = " (perturbation; control: %s)" % report["control"] if key == report["perturbation_key"] else ""
            shown = ", ".join(report["categories"][key])
            more = ", ..." if report["vocab_sizes"][key] > len(report["categories"][key]) else ""
            lines.append(f"  {key}{role}: {report['vocab_sizes'][key]} labels: {shown}{more}")
        for key in ("model_config", "train_config"):
            if isinstance(report.get(key), dict):
                items = ", ".join(f"{k}={v}" for k, v in report[key].items())
                lines.append(f"{key}: {items}")
    return "\n".join(lines)
