"""Lingshu: generative virtual cells with a masked discrete diffusion transformer."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import PRESETS, ModelConfig, SampleConfig, TrainConfig
from .errors import LingshuError
from .model import LingshuModel
from .tokenizer import CountTokenizer

__all__ = ["LingshuModel", "ModelConfig", "TrainConfig", "SampleConfig", "PRESETS", "CountTokenizer",
           "LingshuError", "__version__"]
