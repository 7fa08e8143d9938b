"""A plain training loop: AdamW, warmup + cosine, clipping, bf16 on CUDA, EMA, accumulation.

The batch of micro-step ``i`` is a pure function of the data seed and ``i``, and the
masking generator's state is saved with the optimizer, so a resumed run on the CPU
continues bit for bit.

Under ``torchrun`` the model is wrapped in DistributedDataParallel: every rank builds the
same global micro-batch and the same noise (:func:`lingshu.diffusion.draw_noise`), reads
and trains on its own strided share of the cells, and the averaged gradient equals the
single-process gradient of that global batch. Only rank 0 validates, logs and writes
checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from .config import TrainConfig
from .data import BatchStream
from .diffusion import Noise, diffusion_loss, draw_noise, drop_conditions
from .distributed import DistInfo, info as dist_info
from .progress import progress_bar

__all__ = ["Trainer", "TrainHistory", "lr_at", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    from .errors import LingshuError
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise LingshuError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LingshuError("--device cuda asked for but no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup to ``cfg.lr`` then cosine decay to ``cfg.min_lr`` (at most ``cfg.lr``) at ``max_steps``."""
    warm = min(cfg.warmup_steps, max(max_steps - 1, 0))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(max_steps - warm, 1)
    floor = min(cfg.min_lr, cfg.lr)  # a learning rate set below the default floor is not raised to it
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


class _Objective(torch.nn.Module):
    """The loss as a module's ``forward``, so DistributedDataParallel can wrap it."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x0: torch.Tensor, cond: torch.Tensor, noise: Noise, loss_genes: int | None,
                denom: float, nonzero_share: float | None = None) -> torch.Tensor:
        return diffusion_loss(self.denoiser, x0, cond, noise=noise, loss_genes=loss_genes, denom=denom,
                              nonzero_share=nonzero_share)[0]


@dataclass
class TrainHistory:
    """What happened during training (saved in the manifest)."""

    step: int = 0
    seconds: float = 0.0
    cells_seen: int = 0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)

    @property
    def cells_per_second(self) -> float:
        """Training throughput so far."""
        return self.cells_seen / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seconds": self.seconds, "cells_seen": self.cells_seen,
                "train_loss": [list(x) for x in self.train_loss], "val_loss": [list(x) for x in self.val_loss]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainHistory":
        return cls(d.get("step", 0), d.get("seconds", 0.0), d.get("cells_seen", 0),
                   [tuple(x) for x in d.get("train_loss", [])], [tuple(x) for x in d.get("val_loss", [])])


class Trainer:
    """Trains a denoiser on a :class:`BatchStream`.

    Parameters
    ----------
    denoiser
        The model to train (its weights become the raw weights; the EMA copy is
        what :attr:`ema` holds and what a checkpoint stores as the model).
    stream
        Training batches.
    cfg
        Optimisation settings; ``cfg.max_steps`` must be set.
    device
        Where to train.
    val_stream
        Optional validation cells; their loss is computed on a fixed grid of times.
    on_checkpoint
        Called as ``on_checkpoint(trainer)`` every ``cfg.checkpoint_every`` steps and at the end.
    progress
        Show a rich progress bar. Without one (a log file, a pipeline), the ``lingshu`` logger
        gets a plain progress line (step, loss, cells/s, time left) every 5% of the steps.
    dist
        Rank and world size (default: from ``torch.distributed``); with ``world > 1`` each
        rank trains on its share of every global batch of ``cfg.batch_size`` cells.
    """

    def __init__(self, denoiser: torch.nn.Module, stream: BatchStream, cfg: TrainConfig, device: torch.device, *,
                 val_stream: BatchStream | None = None,
                 on_checkpoint: Callable[["Trainer"], None] | None = None, progress: bool = False,
                 dist: DistInfo | None = None) -> None:
        if cfg.max_steps is None:
            raise ValueError("TrainConfig.max_steps must be resolved before training")
        self.dist = dist or dist_info()
        if stream.batch_size < self.dist.world:
            from .errors import LingshuError
            raise LingshuError(f"batch size {stream.batch_size} is smaller than the {self.dist.world} processes")
        self.cfg, self.device, self.progress = cfg, device, progress and self.dist.is_main
        self.model = denoiser.to(device)
        self.objective: torch.nn.Module = _Objective(self.model)
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel
            self.objective = DistributedDataParallel(
                self.objective, device_ids=[device.index] if device.type == "cuda" else None)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.stream, self.val_stream, self.on_checkpoint = stream, val_stream, on_checkpoint
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and "norm" not in name and not name.endswith("bias") else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.history = TrainHistory()
        self.amp = device.type == "cuda"

    # ------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume, as named tensors (safetensors-ready)."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for i, st in self.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                out[f"optim.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        out["rng.mask"] = self.generator.get_state()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], history: dict[str, Any]) -> None:
        """Restore from :meth:`state_tensors` and a history dict."""
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        sd = self.optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        sd["state"] = state
        self.optimizer.load_state_dict(sd)
        self.generator.set_state(tensors["rng.mask"].to(torch.uint8).cpu() if self.device.type == "cpu"
                                 else tensors["rng.mask"].to(torch.uint8))
        self.history = TrainHistory.from_dict(history)

    # -------------------------------------------------------------- steps
    @torch.no_grad()
    def _update_ema(self) -> None:
        step = self.history.step
        d = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
            pe.lerp_(pm.detach(), 1.0 - d)

    @torch.no_grad()
    def validation_loss(self, model: torch.nn.Module | None = None) -> float:
        """Mean loss of the validation cells on a fixed grid of times and a fixed mask seed."""
        if self.val_stream is None:
            return float("nan")
        model = model or self.ema
        g = torch.Generator(device=self.device).manual_seed(12345)
        idx, bs, total, n = self.val_stream.indices, self.val_stream.batch_size, 0.0, 0
        for start in range(0, len(idx), bs):
            x0, cond = self.val_stream.take(idx[start:start + bs])
            x0, cond = x0.to(self.device), cond.to(self.device)
            t = (torch.arange(len(x0), device=self.device) + 0.5) / len(x0)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss, _ = diffusion_loss(model, x0, cond, g, t=t)
            total, n = total + float(loss) * len(x0), n + len(x0)
        return total / max(n, 1)

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        cfg, step = self.cfg, self.history.step
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, cfg.max_steps)
        self.model.train()
        total = torch.zeros((), device=self.device)
        share = self.dist.share(self.stream.batch_size)
        for a in range(cfg.grad_accum):
            rows = np.sort(self.stream.rows(step * cfg.grad_accum + a))
            noise = draw_noise(len(rows), self.stream.n_genes, self.stream.n_keys, self.generator, self.device,
                               cond_dropout=cfg.cond_dropout, loss_genes=cfg.loss_genes)
            if self.dist.active:
                rows, noise = rows[share], noise.rows(share)
            x0, cond = self.stream.take(rows)
            x0, cond = x0.to(self.device, non_blocking=True), cond.to(self.device, non_blocking=True)
            cond = drop_conditions(cond, cfg.cond_dropout, u=noise.drop_u)
            denom = self.stream.batch_size / self.dist.world  # this rank's share of the global batch
            sync = (not self.dist.active or a == cfg.grad_accum - 1)
            with (contextlib.nullcontext() if sync else self.objective.no_sync()):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    loss = self.objective(x0, cond, noise, cfg.loss_genes, denom, cfg.loss_nonzero_share)
                (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
            self.history.cells_seen += self.stream.batch_size
        if self.dist.active:
            torch.distributed.all_reduce(total)
            total /= self.dist.world
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        self.history.step += 1
        return float(total) if self.history.step % max(cfg.log_every, 1) == 0 else float("nan")

    def _log_progress(self, start_step: int, start_seconds: float) -> None:
        """One plain progress line (what the bar shows) for logs without a progress bar."""
        h = self.history
        per_step = (h.seconds - start_seconds) / max(h.step - start_step, 1)
        eta = per_step * (self.cfg.max_steps - h.step)
        loss = f"{h.train_loss[-1][1]:.4f}" if h.train_loss else "-"
        log.info("step %d/%d  loss %s  %.1f cells/s  %s left", h.step, self.cfg.max_steps, loss,
                 h.cells_per_second, timedelta(seconds=round(eta)))

    def fit(self) -> TrainHistory:
        """Train until ``cfg.max_steps`` (continuing from :attr:`history.step`)."""
        cfg = self.cfg
        start_step, t0 = self.history.step, time.perf_counter() - self.history.seconds
        if start_step >= cfg.max_steps:
            log.info("already trained for %d steps (max_steps %d); nothing to do", start_step, cfg.max_steps)
            return self.history
        report_every, start_seconds = max(1, cfg.max_steps // 20), self.history.seconds
        with progress_bar(self.progress, "training", total=cfg.max_steps) as bar:
            bar.advance(start_step)
            while self.history.step < cfg.max_steps:
                loss = self.train_step()
                step = self.history.step
                self.history.seconds = time.perf_counter() - t0
                if not math.isnan(loss):
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"training loss became {loss} at step {step}; lower the learning rate")
                    self.history.train_loss.append((step, round(loss, 5)))
                    bar.update(info=f"loss {loss:.4f}")
                if self.val_stream is not None and self.dist.is_main and \
                        (step % cfg.val_every == 0 or step == cfg.max_steps):
                    v = self.validation_loss()
                    self.history.val_loss.append((step, round(v, 5)))
                    log.info("step %d  val loss %.4f  (%.1f cells/s)", step, v,
                             self.history.cells_per_second)
                if self.on_checkpoint and self.dist.is_main and cfg.checkpoint_every \
                        and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    self.on_checkpoint(self)
                bar.advance()
                if not self.progress and self.dist.is_main and \
                        (step % report_every == 0 or step == cfg.max_steps):
                    self._log_progress(start_step, start_seconds)
        self.history.seconds = time.perf_counter() - t0
        if self.on_checkpoint and self.dist.is_main:
            self.on_checkpoint(self)
        return self.history
