"""What every command shares: the stderr console, logging, error handling, device choice."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

console = Console(stderr=True)  # all human output; stdout stays clean for pipes


def setup(quiet: bool) -> bool:
    """Attach the rich log handler (stderr) and return whether to show progress bars."""
    level = logging.WARNING if quiet else logging.INFO
    try:
        from lingshu.progress import setup_logging
    except ImportError:  # engine not importable: fall back to a plain rich handler
        from rich.logging import RichHandler

        log = logging.getLogger("lingshu")
        log.setLevel(level)
        if not any(isinstance(h, RichHandler) for h in log.handlers):
            log.addHandler(RichHandler(console=console, show_path=False))
    else:
        setup_logging(level)
    return not quiet and sys.stderr.isatty()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: <one line>`` to stderr and return the Exit to raise."""
    line = " ".join(str(message).split())
    console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-input errors into ``error: <one line>`` + exit 1, Ctrl-C into exit 130."""
    from lingshu.errors import LingshuError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LingshuError as exc:
            raise fail(str(exc)) from None
        except FileNotFoundError as exc:
            raise fail(f"{exc.filename or exc}: no such file or directory") from None
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise fail(f"{where}{exc.strerror or exc}") from None
        except KeyboardInterrupt:
            console.print("interrupted", markup=False, highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; refuse ``cuda`` without a GPU."""
    from lingshu.errors import LingshuError

    device = device.strip().lower()
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise LingshuError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise LingshuError(f"--device {device} but no CUDA device is available; use --device cpu or auto")
    return device


def parse_prior(items: list[str] | None) -> dict[str, int]:
    """``["IL6=0", "STAT1=2"]`` -> ``{"IL6": 0, "STAT1": 2}`` (prior injection: gene fixed at a count)."""
    from lingshu.errors import LingshuError

    out: dict[str, int] = {}
    for item in items or []:
        gene, sep, value = item.partition("=")
        gene, value = gene.strip(), value.strip()
        if not sep or not gene or not value.isdigit():
            raise LingshuError(f"--prior {item!r} should look like GENE=COUNT with a whole count >= 0, e.g. STAT1=0")
        if gene in out:
            raise LingshuError(f"--prior {gene} given twice")
        out[gene] = int(value)
    return out


def parse_conditions(items: list[str] | None) -> dict[str, str]:
    """``["cell_type=B", "donor=d1"]`` -> ``{"cell_type": "B", "donor": "d1"}``."""
    from lingshu.errors import LingshuError

    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise LingshuError(f"--condition {item!r} should look like KEY=VALUE, e.g. cell_type=B")
        if key in out:
            raise LingshuError(f"--condition {key} given twice")
        out[key] = value
    return out
