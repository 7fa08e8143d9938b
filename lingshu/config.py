"""Plain dataclass configs for the denoiser, the trainer and the sampler, and presets.

Every knob of a run lives here; a run writes its resolved configs into its
checkpoint manifest (``lingshu.json``) so a model directory says how it was made.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import LingshuError

__all__ = [
    "ModelConfig",
    "TrainConfig",
    "SampleConfig",
    "GUIDANCE_REFERENCES",
    "PRESETS",
    "preset",
    "resolve_group_size",
    "to_dict",
    "from_dict",
]


GUIDANCE_REFERENCES = ("control", "null", "composed")  # SampleConfig.guidance_reference


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise LingshuError(msg)


MAX_SEED = 2**62  # seeds are offset per chunk and per draw; NumPy and torch both take them below 2**63


def whole_number(x: object) -> bool:
    """True for an integer value (``3``, ``np.int64(3)``, ``3.0``), False for ``2.5``, NaN, ``True``."""
    if isinstance(x, bool):
        return False
    try:
        return float(x).is_integer() and int(x) == x
    except (TypeError, ValueError, OverflowError):
        return False


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int, or a :class:`LingshuError` unless it is a whole number in ``[0, 2**62)``."""
    _check(whole_number(seed) and 0 <= int(seed) < MAX_SEED, f"{name} must be a whole number in [0, 2**62), got {seed}")
    return int(seed)


@dataclass
class ModelConfig:
    """Shape of the denoiser.

    Parameters
    ----------
    n_layers
        Number of transformer blocks.
    d_model
        Width of the transformer tokens.
    n_heads
        Attention heads; ``d_model`` must be divisible by it.
    d_ff
        Hidden width of the SwiGLU feed-forward layer.
    gene_dim
        Width ``D`` of each gene's value embedding before grouping.
    group_size
        Number of genes ``S`` flattened into one transformer token (``S * D -> d_model``).
    max_tokens
        If set, ``group_size`` grows (when the model is built for a gene set) so that the
        genes fit in at most this many transformer tokens; CPU presets use it to keep
        attention affordable on whole transcriptomes. ``None``: ``group_size`` as given.
    gene_bias
        Add a learned per-gene bias over the 281 value tokens to the shared head's logits
        (started at 0, so step 0 is the published head; trained without weight decay): room
        for genes whose counts a shared head over ``gene_dim`` features reaches slowly.
        ``False``: the published shared head only. Starting it at each gene's marginal
        instead was measured and rejected: cell identity was learned much later.
    library_bins
        Condition on each cell's library size (total counts over the modelled genes) in
        this many quantile bins (:mod:`lingshu.library`): training sees each cell's own bin,
        generation draws bins from the training cells of the same conditions, prediction
        from real cells keeps the source cell's bin. ``0``: off (the published design).
    cell_states
        Condition on each cell's coarse expression state, one of this many k-means clusters
        of the training cells (:mod:`lingshu.cellstate`): training sees each cell's own
        state, plain generation draws a state from the training cells with the same labels
        (restoring within-type variation a short-trained denoiser under-disperses); guided,
        counterfactual and novel-combination draws use the null state. ``0``: off (the
        published design). Measured to help short ``tiny`` training and to hurt ``small``
        at its default length (``bench/model_changes.md``).
    cond_broadcast
        Also add every condition embedding to each gene-group token (besides the
        prepended condition tokens of the published design), so conditions reach every
        group directly rather than only through attention.
    rope_base
        Base of the rotary position embedding.
    dropout
        Dropout inside the blocks (0 for the published design).
    gene_seed
        Seed of the fixed random gene permutation.
    """

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    gene_dim: int = 8
    group_size: int = 16
    max_tokens: int | None = None
    gene_bias: bool = True
    library_bins: int = 10
    cell_states: int = 0
    cond_broadcast: bool = True
    rope_base: float = 10000.0
    dropout: float = 0.0
    gene_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_ff", "gene_dim", "group_size"):
            _check(int(getattr(self, name)) >= 1, f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.d_model % self.n_heads == 0,
               f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        _check((self.d_model // self.n_heads) % 2 == 0,
               f"ModelConfig head width d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        _check(self.library_bins >= 0, f"ModelConfig.library_bins must be >= 0, got {self.library_bins}")
        _check(self.cell_states >= 0, f"ModelConfig.cell_states must be >= 0, got {self.cell_states}")
        _check(self.max_tokens is None or self.max_tokens >= 1, f"ModelConfig.max_tokens must be >= 1, got {self.max_tokens}")
        _check(0.0 <= self.dropout < 1.0, f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        self.gene_seed = check_seed(self.gene_seed, "ModelConfig.gene_seed")
        _check(1.0 < self.rope_base < math.inf,
               f"ModelConfig.rope_base must be a finite number > 1, got {self.rope_base}")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run.

    Parameters
    ----------
    max_steps
        Optimizer steps; ``None`` takes the preset's default length.
    batch_size
        Cells per micro-batch.
    grad_accum
        Micro-batches per optimizer step (global batch = ``batch_size * grad_accum``).
    lr, min_lr
        Peak learning rate after warmup and the floor of the cosine decay (a floor above
        ``lr`` is taken as ``lr``: a constant rate after warmup).
    warmup_steps
        Linear warmup length in optimizer steps.
    weight_decay, betas, grad_clip
        AdamW settings and the global gradient-norm clip (published: 0.1, (0.9, 0.95), 1.0;
        ``grad_clip = 0``: no clipping).
    ema_decay
        Decay of the exponential moving average of weights saved as the model.
    cond_dropout
        Probability of replacing each condition token by its null id (enables guidance
        relative to the null condition and unconditional sampling).
    val_fraction
        Fraction of cells held out for the validation loss (at most 2,000 cells).
    val_every, checkpoint_every, log_every
        Intervals in optimizer steps (0 disables periodic checkpoints).
    loss_genes
        At most this many masked genes per cell enter the output head and the loss,
        reweighted to stay unbiased; ``None`` scores every masked gene (published).
        Bounds the ``genes x 281`` head cost on CPUs for whole-transcriptome data.
    loss_nonzero_share
        With ``loss_genes``: up to this share of the budget goes to masked genes whose
        count is not 0, scored at a higher rate and reweighted so the loss stays unbiased
        (:func:`lingshu.diffusion.subsample_mask_nonzero`); ``None``: uniform subsample.
    seed
        Seed of the train/validation split, data order, masking and dropout.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    max_steps: int | None = None
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 2e-5
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    val_fraction: float = 0.05
    val_every: int = 100
    checkpoint_every: int = 0
    log_every: int = 25
    loss_genes: int | None = None
    loss_nonzero_share: float | None = None
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives lists
        if self.max_steps is not None:
            _check(int(self.max_steps) >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        self.seed = check_seed(self.seed)
        _check(0 < self.lr < math.inf and 0 <= self.min_lr < math.inf,
               f"lr must be a finite number > 0 and min_lr one >= 0, got lr {self.lr}, min_lr {self.min_lr}")
        _check(0 <= self.weight_decay < math.inf, f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"betas must be two numbers in [0, 1), got {self.betas}")
        _check(0 <= self.grad_clip < math.inf, f"grad_clip must be a finite number >= 0 (0: off), got {self.grad_clip}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.val_every >= 1 and self.log_every >= 1,
               f"val_every and log_every must be >= 1, got {self.val_every} and {self.log_every}")
        _check(self.checkpoint_every >= 0,
               f"checkpoint_every must be >= 0 (0: only at the end), got {self.checkpoint_every}")
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(0.0 <= self.cond_dropout < 1.0, f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        _check(0.0 <= self.val_fraction < 0.5, f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        _check(self.loss_genes is None or (self.loss_genes >= 1 and float(self.loss_genes).is_integer()),
               f"loss_genes must be a whole number >= 1 or None, got {self.loss_genes}")
        _check(self.loss_nonzero_share is None or 0.0 < self.loss_nonzero_share < 1.0,
               f"loss_nonzero_share must be in (0, 1) or None, got {self.loss_nonzero_share}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class SampleConfig:
    """Reverse-process settings.

    Parameters
    ----------
    steps
        Number of denoising steps (published: 256 unconditional, 3 perturbation).
    schedule
        ``"cosine"`` or ``"linear"``: how many genes stay masked after each step.
    order
        ``"random"`` reveals masked genes uniformly at random (published);
        ``"confidence"`` reveals the genes whose drawn value is most probable first.
    guidance_scale
        Classifier-free guidance ``w``; 0 is plain conditional sampling.
    guidance_reference
        ``"control"`` (same context, control perturbation; published), ``"null"``, or
        ``"composed"``: this context's control plus ``w + 1`` times the perturbation's effect
        learned across all contexts (context keys null); for context x perturbation
        combinations never seen in training (:mod:`lingshu.sampler`). ``w = 0`` is then the
        product of experts, not plain conditional sampling.
    guidance_gate
        0 (published): guide every gene. ``tau > 0``: guide only the genes whose predicted mean
        ``log1p`` count under the condition differs from the reference's by more than ``tau``
        (per cell and step); the others are drawn from the plain conditional. Not for
        ``"composed"``.
    batch_size
        Cells denoised at once.
    seed
        Seed of all draws: same seed, same cells.
    """

    steps: int = 32
    schedule: str = "cosine"
    order: str = "random"
    guidance_scale: float = 0.0
    guidance_reference: str = "control"
    guidance_gate: float = 0.0
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check(whole_number(self.steps) and self.steps >= 1, f"steps must be a whole number >= 1, got {self.steps}")
        self.seed = check_seed(self.seed)
        _check(self.schedule in ("cosine", "linear"), f"schedule must be cosine or linear, got {self.schedule!r}")
        _check(self.order in ("random", "confidence"), f"order must be random or confidence, got {self.order!r}")
        _check(self.guidance_reference in GUIDANCE_REFERENCES,
               f"guidance_reference must be control, null or composed, got {self.guidance_reference!r}")
        _check(math.isfinite(self.guidance_scale), f"guidance_scale must be a finite number, got {self.guidance_scale}")
        _check(self.guidance_gate >= 0 and math.isfinite(self.guidance_gate),
               f"guidance_gate must be a finite number >= 0, got {self.guidance_gate}")
        _check(self.guidance_gate == 0 or self.guidance_reference != "composed",
               "guidance_gate needs guidance relative to the control or null, not composed")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Preset:
    """A named model size with a sensible default training length."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        ModelConfig(n_layers=2, d_model=64, n_heads=4, d_ff=256, gene_dim=8, group_size=16, max_tokens=256),
        TrainConfig(max_steps=400, batch_size=64, lr=1e-2, warmup_steps=40, ema_decay=0.99, val_every=100,
                    loss_genes=1024, loss_nonzero_share=0.75),
        "CPU, about a minute for a few thousand cells x genes",
    ),
    "small": Preset(
        ModelConfig(n_layers=4, d_model=128, n_heads=4, d_ff=512, gene_dim=16, group_size=32, max_tokens=512),
        TrainConfig(max_steps=1500, batch_size=48, lr=3e-3, warmup_steps=100, ema_decay=0.995, val_every=250,
                    loss_genes=2048, loss_nonzero_share=0.75),
        "CPU, under ~10 minutes for a few thousand cells x genes",
    ),
    "base": Preset(
        ModelConfig(n_layers=8, d_model=384, n_heads=6, d_ff=1536, gene_dim=16, group_size=32),
        TrainConfig(max_steps=20000, batch_size=128, lr=5e-4, warmup_steps=500, ema_decay=0.999, val_every=1000),
        "one GPU, hours",
    ),
    "paper": Preset(
        ModelConfig(n_layers=13, d_model=640, n_heads=10, d_ff=2560, gene_dim=32, group_size=32),
        TrainConfig(max_steps=100000, batch_size=256, lr=3e-4, warmup_steps=2000, ema_decay=0.9999,
                    val_every=2000, checkpoint_every=5000),
        "the published size (13 x 640, 10 heads, FFN 2,560); GPUs",
    ),
}


def preset(name: str) -> Preset:
    """Return a fresh copy of the preset called ``name``."""
    if name not in PRESETS:
        raise LingshuError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return Preset(dataclasses.replace(p.model), dataclasses.replace(p.train), p.description)


def resolve_group_size(cfg: ModelConfig, n_genes: int) -> ModelConfig:
    """``cfg`` with ``group_size`` raised so ``n_genes`` fit in ``cfg.max_tokens`` tokens."""
    if cfg.max_tokens is None:
        return cfg
    return dataclasses.replace(cfg, group_size=max(cfg.group_size, -(-n_genes // cfg.max_tokens)))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build config ``cls`` from a dict, refusing unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise LingshuError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**d)
