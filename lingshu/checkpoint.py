"""A versioned run directory: ``model.safetensors`` + ``lingshu.json`` (+ trainer state).

A checkpoint is first written completely into ``<run>/.next/`` (tensor files, then the
manifest ``lingshu.json`` that records the size and SHA-256 of every tensor file), and
only then moved into place file by file, manifest last. A process killed at any moment
therefore leaves either the previous checkpoint intact (``.next`` has no manifest yet:
it is discarded) or a complete new one in ``.next`` that the next reader moves into
place (roll forward). A truncated or edited file is reported on load, never loaded.

Nothing is ever unpickled: tensors come from safetensors, everything else from JSON.
Pickle-based files (``.pt``, ``.pth``, ``.ckpt``, ``.pkl``, ``.bin``) are refused as
model paths and ignored inside model directories; the manifest may only name the known
tensor files, so it cannot point a reader outside the run directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import LingshuError

__all__ = ["FORMAT_VERSION", "MANIFEST", "WEIGHTS", "TRAINER_STATE", "write_checkpoint", "read_manifest",
           "read_tensors", "is_run_dir", "recover"]

FORMAT_VERSION = 1
MANIFEST = "lingshu.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.safetensors"
STAGING = ".next"
TENSOR_FILES = (WEIGHTS, TRAINER_STATE)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def write_checkpoint(path: str | Path, manifest: dict[str, Any], weights: dict[str, torch.Tensor],
                     trainer_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a run directory so that a crash at any point leaves a loadable checkpoint.

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
        Optional optimizer / raw-weight / RNG tensors for resuming. When omitted, a
        trainer state already in ``path`` stays listed in the new manifest.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LingshuError(f"cannot save the model to {path}: it is a file; give a directory")
    path.mkdir(parents=True, exist_ok=True)
    recover(path)
    stage = path / STAGING
    stage.mkdir()
    files: dict[str, dict[str, Any]] = {}
    todo = [(WEIGHTS, weights)] + ([(TRAINER_STATE, trainer_state)] if trainer_state is not None else [])
    for name, tensors in todo:
        save_file(_contiguous(tensors), str(stage / name))
        _fsync(stage / name)
        files[name] = {"bytes": (stage / name).stat().st_size, "sha256": _sha256(stage / name)}
    if trainer_state is None and (path / TRAINER_STATE).exists() and (path / MANIFEST).exists():
        old = read_manifest(path, verify=False).get("files", {})
        if TRAINER_STATE in old:
            files[TRAINER_STATE] = old[TRAINER_STATE]
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=files)
    tmp = stage / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    os.replace(tmp, stage / MANIFEST)  # from here on the new checkpoint is complete and wins
    _fsync_dir(stage)
    _commit(path)
    return path


def _fsync(f: Path) -> None:
    with open(f, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # not supported everywhere (e.g. Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(path: Path) -> None:
    """Move a complete staged checkpoint into ``path``: tensor files first, manifest last."""
    stage = path / STAGING
    for name in TENSOR_FILES:
        if (stage / name).exists():
            os.replace(stage / name, path / name)
    os.replace(stage / MANIFEST, path / MANIFEST)
    _fsync_dir(path)
    shutil.rmtree(stage, ignore_errors=True)


def recover(path: str | Path) -> None:
    """Finish or discard a checkpoint write that was interrupted (e.g. by SIGKILL).

    A staged checkpoint with its manifest is complete and is moved into place; one
    without is discarded, leaving the previous checkpoint as it was.
    """
    path = Path(path)
    stage = path / STAGING
    if not stage.is_dir():
        return
    try:
        if (stage / MANIFEST).is_file():
            log.warning("%s: completing a checkpoint write that was interrupted", path)
            _commit(path)
        else:
            log.info("%s: discarding an incomplete checkpoint write", path)
            shutil.rmtree(stage)
    except OSError as e:
        raise LingshuError(f"{path} holds an interrupted checkpoint write that cannot be completed "
                           f"({e.__class__.__name__}: {e}); check permissions") from None


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
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise LingshuError(f"{str(path)!r} is a pickle-based file; Lingshu never unpickles files (they can run "
                           "arbitrary code): give a model directory written by lingshu train")
    if not path.is_dir():
        raise LingshuError(f"model directory {str(path)!r} not found")
    recover(path)
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
    files = manifest.get("files", {})
    if not isinstance(files, dict) or any(name not in TENSOR_FILES for name in files):
        bad = sorted(set(files) - set(TENSOR_FILES)) if isinstance(files, dict) else files
        raise LingshuError(f"{mpath} lists unexpected files {bad}; a manifest may only name "
                           f"{', '.join(TENSOR_FILES)} inside its own directory")
    ignored = sorted(f.name for f in path.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if ignored:
        log.warning("%s: ignoring %s (pickle files are never loaded)", path, ", ".join(ignored))
    if verify:
        for name, meta in files.items():
            f = path / name
            if not f.is_file():
                raise LingshuError(f"checkpoint file {f} is missing")
            if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                raise LingshuError(f"checkpoint file {f} does not match its manifest (truncated or modified); "
                                   "it will not be loaded")
    return manifest


def read_tensors(path: str | Path, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """Load a verified safetensors file of a run directory (never unpickles)."""
    if name not in TENSOR_FILES:
        raise LingshuError(f"{name!r} is not a Lingshu tensor file")
    f = Path(path) / name
    if not f.is_file():
        raise LingshuError(f"checkpoint file {f} is missing")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types
        raise LingshuError(f"cannot read {f}: {e}") from None
