"""A versioned run directory: ``model.safetensors`` + ``lingshu.json`` (+ trainer state).

Files are written to temporary names and renamed; the manifest ``lingshu.json`` is
written last and records the size and SHA-256 of every tensor file, so a checkpoint
interrupted mid-write, truncated or edited is reported on load instead of loaded.
Nothing is ever unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import LingshuError

__all__ = ["FORMAT_VERSION", "MANIFEST", "WEIGHTS", "TRAINER_STATE", "write_checkpoint", "read_manifest",
           "read_tensors", "is_run_dir"]

FORMAT_VERSION = 1
MANIFEST = "lingshu.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def write_checkpoint(path: str | Path, manifest: dict[str, Any], weights: dict[str, torch.Tensor],
                     trainer_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a run directory atomically, file by file, manifest last.

    Parameters
    ----------
    path
        The run directory (created if absent; other files in it are left alone).
    manifest
        JSON-ready description (configs, tokenizer, genes, vocabularies, ...).
        ``format_version`` and ``files`` are filled in here.
    weights
        Model tensors (the EMA weights).
    trainer_state
        Optional optimizer / raw-weight / RNG tensors for resuming.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}
    todo = [(WEIGHTS, weights)] + ([(TRAINER_STATE, trainer_state)] if trainer_state is not None else [])
    for name, tensors in todo:
        tmp = path / f".{name}.tmp-{os.getpid()}"
        try:
            save_file(_contiguous(tensors), str(tmp))
            files[name] = {"bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
            _atomic_replace(tmp, path / name)
        finally:
            tmp.unlink(missing_ok=True)
    if trainer_state is None and (path / TRAINER_STATE).exists():
        old = read_manifest(path, verify=False).get("files", {}) if (path / MANIFEST).exists() else {}
        if TRAINER_STATE in old:
            files[TRAINER_STATE] = old[TRAINER_STATE]
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=files)
    tmp = path / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(manifest, indent=1))
        _atomic_replace(tmp, path / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a Lingshu model directory."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and check ``lingshu.json`` of a run directory.

    Raises
    ------
    LingshuError
        Missing directory or manifest, unreadable JSON, another format version, or
        (``verify``) a tensor file whose size or hash differs from the manifest.
    """
    path = Path(path)
    if not path.is_dir():
        raise LingshuError(f"model directory {str(path)!r} not found")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise LingshuError(f"{str(path)!r} is not a Lingshu model directory (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise LingshuError(f"{mpath} is not valid JSON ({e.__class__.__name__}); the checkpoint is damaged") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise LingshuError(f"{str(path)!r} has checkpoint format_version {version!r}; this Lingshu reads version "
                           f"{FORMAT_VERSION}: retrain, or use the Lingshu release that wrote it")
    if verify:
        for name, meta in manifest.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise LingshuError(f"checkpoint file {f} is missing")
            if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                raise LingshuError(f"checkpoint file {f} does not match its manifest (truncated or modified); "
                                   "it will not be loaded")
    return manifest


def read_tensors(path: str | Path, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """Load a verified safetensors file of a run directory (never unpickles)."""
    f = Path(path) / name
    if not f.is_file():
        raise LingshuError(f"checkpoint file {f} is missing")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types
        raise LingshuError(f"cannot read {f}: {e}") from None
