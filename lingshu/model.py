"""The user facade: ``LingshuModel(adata, ...).train() / .generate() / .predict() / .save() / .load()``."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import checkpoint as ckpt
from .cellstate import CellState
from .config import (ModelConfig, SampleConfig, TrainConfig, check_seed, from_dict, preset as get_preset,
                     resolve_group_size, to_dict, whole_number)
from .data import BatchStream, Vocabulary, split_indices
from .denoiser import Denoiser
from .errors import LingshuError
from .library import LibrarySize, unique_rows
from .neighbours import neighbour_pairs
from .sampler import COUPLINGS, expected_values, sample_tokens, transport_tokens
from .tokenizer import MASK_ID, CountTokenizer, token_frequencies, token_midpoints
from .trainer import Trainer, resolve_device
from .validation import check_labels, counts_matrix, require_obs_keys, require_unique_genes

__all__ = ["LingshuModel"]

log = logging.getLogger(__name__)
_CHUNK_CELLS = 1024  # simulated cells per chunk: memory O(chunk x genes)


def _model_config(manifest: Mapping[str, Any]) -> ModelConfig:
    """The manifest's model config; settings added later take the values that reproduce older models."""
    return from_dict(ModelConfig, {"gene_bias": False, "library_bins": 0} | manifest["model_config"])


def _library(conditions: Mapping[str, Any]) -> LibrarySize | None:
    state = conditions.get("library_size")
    return LibrarySize.from_state(state) if state is not None else None


def _cell_states(conditions: Mapping[str, Any]) -> CellState | None:
    state = conditions.get("cell_states")
    return CellState.from_state(state) if state is not None else None


def _version() -> str:
    from . import __version__
    return __version__


class LingshuModel:
    """A masked discrete diffusion model of single-cell count profiles.

    Parameters
    ----------
    adata
        Cells x genes AnnData with raw integer UMI counts (in ``X`` or ``layer``).
    context_keys
        ``obs`` columns describing identity (cell type, cell line, donor, batch).
    perturbation_key
        ``obs`` column with the perturbation (target gene, cytokine); optional.
    control
        The label of unperturbed cells in ``perturbation_key`` (guidance reference).
    preset
        ``"tiny"``, ``"small"``, ``"base"`` or ``"paper"``: model size and default training length.
    config
        A :class:`ModelConfig` overriding the preset's model shape.
    layer
        Where the counts are: ``None`` (``X``), a layer name or ``"raw"``.
    seed
        Seed of the gene permutation and the weight initialisation.
    """

    def __init__(self, adata: ad.AnnData, *, context_keys: Sequence[str] = (), perturbation_key: str | None = None,
                 control: str | None = None, preset: str = "tiny", config: ModelConfig | None = None,
                 layer: str | None = None, seed: int = 0) -> None:
        genes = [str(g) for g in adata.var_names]
        require_unique_genes(genes)
        keys = self._keys(adata, context_keys, perturbation_key, control)
        x = counts_matrix(adata, layer)
        self._build(x, adata.obs, genes, keys, perturbation_key, control, preset, config, seed, x, block=0, buffer=0)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], *, context_keys: Sequence[str] = (),
                   perturbation_key: str | None = None, control: str | None = None, preset: str = "tiny",
                   config: ModelConfig | None = None, layer: str | None = None, seed: int = 0,
                   block: int = 1024, buffer: int = 16, fit_cells: int = 20_000) -> "LingshuModel":
        """A model that trains on files on disk without loading them into memory.

        Parameters
        ----------
        paths
            One or more ``.h5ad`` / 10x ``.h5`` / ``.h5mu`` shards with raw counts; genes are
            aligned by name (the genes every shard has).
        block, buffer
            Cells per disk read, and blocks mixed per shuffle buffer (memory holds
            ``block x buffer`` cells).
        fit_cells
            Cells (whole blocks spread over the data) used to fit the tokenizer's within-bin
            decoder, the output-head initialisation, the cell states and the library-size
            bins (and their frequencies per condition, used when generating).
        context_keys, perturbation_key, control, preset, config, layer, seed
            As for :class:`LingshuModel`.
        """
        from .shards import ShardedCounts

        counts = ShardedCounts(paths, layer=layer, block=block, cache_blocks=buffer)
        self = cls.__new__(cls)
        keys = self._keys(counts, context_keys, perturbation_key, control)
        sample, rows = counts.sample(fit_cells, seed)
        self._build(counts, counts.obs, counts.genes, keys, perturbation_key, control, preset, config, seed, sample,
                    block=block, buffer=buffer, fit_rows=rows)
        log.info("streaming %d cells x %d genes from %d file(s) in blocks of %d cells (buffer %d blocks)",
                 counts.shape[0], counts.shape[1], len(counts.shards), block, buffer)
        return self

    @staticmethod
    def _keys(data, context_keys, perturbation_key, control) -> tuple[list[str], list[str]]:
        context_keys = [context_keys] if isinstance(context_keys, str) else list(context_keys)
        keys = context_keys + ([perturbation_key] if perturbation_key else [])
        if len(set(keys)) != len(keys):
            raise LingshuError(f"condition keys must be distinct, got {keys}")
        require_obs_keys(data, keys)
        if control is not None and perturbation_key is None:
            raise LingshuError("--control needs --perturbation-key")
        if perturbation_key and control is None:
            raise LingshuError(f"--perturbation-key {perturbation_key!r} needs --control (the label of unperturbed cells)")
        return context_keys, keys

    def _build(self, x, obs: pd.DataFrame, genes: list[str], keys: tuple[list[str], list[str]],
               perturbation_key: str | None, control: str | None, preset: str, config: ModelConfig | None, seed: int,
               fit: sp.spmatrix, *, block: int, buffer: int, fit_rows: np.ndarray | None = None) -> None:
        seed = check_seed(seed)
        context_keys, all_keys = keys
        vocab = Vocabulary.from_obs(obs, all_keys)
        if control is not None:
            check_labels([control], vocab.labels[perturbation_key], f"control label in {perturbation_key!r}")
        p = get_preset(preset)
        model_cfg = resolve_group_size(dataclasses.replace(config or p.model, gene_seed=seed), len(genes))
        self._setup(genes, vocab, context_keys, perturbation_key, control, model_cfg, CountTokenizer().fit(fit, seed))
        self.preset, self.train_config = preset, p.train
        self._x, self._cond = x, vocab.encode(obs)
        self._block, self._buffer = block, buffer
        self._freq = self._frequencies(self._cond)
        fit_cond = self._cond if fit_rows is None else self._cond[fit_rows]
        self.states = None
        if model_cfg.cell_states:  # library bins are then tabled per (labels, state)
            self.states, ids = CellState.fit_ids(fit, fit_cond, model_cfg.cell_states, seed)
            fit_cond = np.concatenate([fit_cond, ids[:, None]], axis=1)
        self.library = LibrarySize.fit(fit, fit_cond, model_cfg.library_bins) if model_cfg.library_bins else None
        torch.manual_seed(seed)
        self.denoiser = Denoiser(model_cfg, len(genes), self._cond_sizes())
        self.denoiser.init_head_bias(token_frequencies(fit))  # per-gene biases (gene_bias) start at 0
        self.history: dict[str, Any] = {}
        self._trainer: Trainer | None = None

    def _setup(self, genes, vocab, context_keys, perturbation_key, control, model_cfg, tokenizer) -> None:
        self.genes, self.vocab, self.context_keys = genes, vocab, context_keys
        self.perturbation_key, self.control = perturbation_key, control
        self.model_config, self.tokenizer = model_cfg, tokenizer

    def _cond_sizes(self) -> list[int]:
        """Vocabulary size of each condition token: the obs keys, then the cell states, then the library-size bins."""
        return (self.vocab.sizes() + ([self.states.n_states] if self.states is not None else [])
                + ([self.library.n_bins] if self.library is not None else []))

    def _with_extras(self, cond: np.ndarray, ref: np.ndarray | None, start_counts, seed: int):
        """Append the cell-state and library-size columns (the same ids to ``ref``).

        States: drawn per condition for plain generation; null when guided (``ref`` given),
        counterfactual (``start_counts`` given) or for a combination never seen in training.
        Library bins: the start cells' own bins, else drawn per condition (and state).
        """
        def append(ids):
            return (np.concatenate([cond, ids[:, None]], axis=1),
                    None if ref is None else np.concatenate([ref, ids[:, None]], axis=1))

        if self.states is not None:
            plain = ref is None and start_counts is None
            cond, ref = append(self.states.draw(cond, np.random.default_rng([seed, 13])) if plain
                               else np.zeros(len(cond), dtype=np.int64))
        if self.library is not None:
            cond, ref = append(self.library.ids(start_counts) if start_counts is not None
                               else self.library.draw(cond, np.random.default_rng([seed, 7])))
        return cond, ref

    @staticmethod
    def _frequencies(cond: np.ndarray) -> list[list[int]]:
        combos, inverse = unique_rows(cond)
        counts = np.bincount(inverse, minlength=len(combos))
        return [list(map(int, c)) + [int(n)] for c, n in zip(combos, counts)]

    # ------------------------------------------------------------ properties
    @property
    def condition_keys(self) -> list[str]:
        return list(self.vocab.keys)

    @property
    def categories(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.vocab.labels.items()}

    # ----------------------------------------------------------------- train
    def train(self, config: TrainConfig | None = None, *, max_steps: int | None = None, device: str = "auto",
              out_dir: str | Path | None = None, resume: bool = False, progress: bool = False) -> dict[str, Any]:
        """Train (or continue training) the denoiser on the cells given at construction.

        A second call without ``config`` continues the same run (same optimiser state,
        schedule, data stream and history) up to ``max_steps``, as ``resume`` does from a
        checkpoint; with ``config`` it starts a new run (fresh optimiser, schedule and
        history) from the current weights.

        Parameters
        ----------
        config
            Training settings; default: the preset's (with its default length), or on a later
            call the current run's.
        max_steps
            Overrides ``config.max_steps``.
        device
            ``"auto"``, ``"cpu"`` or ``"cuda"``.
        out_dir
            Run directory: checkpoints (every ``checkpoint_every`` steps and at the end).
        resume
            Continue the run saved in ``out_dir`` (same data, configs from its manifest).
        progress
            Show a progress bar.

        Returns
        -------
        dict
            The training history (steps, seconds, losses).
        """
        if not hasattr(self, "_x"):
            raise LingshuError("this model was loaded without training data; build LingshuModel(adata, ...) to train")
        cfg = dataclasses.replace(config or self.train_config)
        state, denoiser = None, self.denoiser
        if self._trainer is not None and not resume:
            if config is None:  # continue this run in memory, as --resume does from a checkpoint
                state = (self._trainer.state_tensors(), self._trainer.history.to_dict())
                denoiser = self._trainer.model
            else:  # a new run from the current (EMA) weights
                denoiser = copy.deepcopy(self.denoiser).requires_grad_(True)
        if resume:
            if out_dir is None or not ckpt.is_run_dir(out_dir):
                raise LingshuError(f"--resume: no checkpoint in {str(out_dir)!r} to resume from")
            manifest = ckpt.read_manifest(out_dir)
            self._check_compatible(manifest)
            cfg = from_dict(TrainConfig, manifest["train_config"])
            if "trainer_state.safetensors" not in manifest.get("files", {}):
                raise LingshuError(f"{out_dir} holds no trainer state to resume from")
            state = (ckpt.read_tensors(out_dir, ckpt.TRAINER_STATE), manifest.get("training", {}))
            denoiser = self.denoiser
        if max_steps is not None:
            cfg.max_steps = int(max_steps)
        if device != "auto" or cfg.device == "auto":
            cfg.device = device
        cfg = TrainConfig(**dataclasses.asdict(cfg))  # re-validate
        dev = resolve_device(cfg.device)
        train_idx, val_idx = split_indices(len(self._cond), cfg.val_fraction, cfg.seed, block=self._block)
        stream = BatchStream(self._x, self._cond, train_idx, cfg.batch_size, self.tokenizer, cfg.seed,
                             block=self._block, buffer=self._buffer, library=self.library, states=self.states)
        val = (BatchStream(self._x, self._cond, val_idx, cfg.batch_size, self.tokenizer, cfg.seed, library=self.library,
                           states=self.states)
               if len(val_idx) else None)
        self.train_config = cfg
        on_ckpt = (lambda tr: self._write(out_dir, tr)) if out_dir is not None else None
        trainer = Trainer(denoiser, stream, cfg, dev, val_stream=val, on_checkpoint=on_ckpt, progress=progress)
        if state is not None:
            trainer.load_state(*state)
            log.info("resuming %s at step %d of %d", out_dir, trainer.history.step, cfg.max_steps)
        log.info("training %s: %d cells x %d genes, %d condition keys, %.2fM parameters, %d steps on %s",
                 self.preset, len(train_idx), len(self.genes), len(self.vocab.keys),
                 sum(p.numel() for p in self.denoiser.parameters()) / 1e6, cfg.max_steps, dev)
        hist = trainer.fit()
        self._trainer = trainer
        self.denoiser = trainer.ema
        self.history = hist.to_dict()
        return self.history

    def _check_compatible(self, manifest: Mapping[str, Any]) -> None:
        if manifest["genes"] != self.genes:
            raise LingshuError("--resume: the data's genes differ from the checkpoint's; resume with the same input file")
        if manifest["conditions"]["labels"] != self.vocab.labels or manifest["conditions"]["keys"] != self.vocab.keys:
            raise LingshuError("--resume: the condition keys or labels differ from the checkpoint's")
        self.model_config = _model_config(manifest)
        self.tokenizer = CountTokenizer.from_state(manifest["tokenizer"])
        self.library, self.states = _library(manifest["conditions"]), _cell_states(manifest["conditions"])
        self.denoiser = Denoiser(self.model_config, len(self.genes), self._cond_sizes())

    # ----------------------------------------------------------------- sample
    def _context_free(self, *conds: np.ndarray) -> tuple[np.ndarray, ...]:
        """Copies of condition ids with every context key null (composed guidance)."""
        cols = [self.vocab.keys.index(k) for k in self.context_keys]
        out = tuple(c.copy() for c in conds)
        for c in out:
            c[:, cols] = 0
        return out

    def _control_id(self) -> int:
        """The control's condition id under the perturbation key (0 is null)."""
        return self.vocab.labels[self.perturbation_key].index(self.control) + 1

    def _neighbour_pairs(self, cond: np.ndarray, free: tuple[np.ndarray, np.ndarray], k: int,
                         min_similarity: float | None, dev: torch.device) -> tuple[np.ndarray, ...]:
        """Composed guidance over the ``k`` nearest seen contexts (:mod:`lingshu.neighbours`)."""
        ctx_cols = [self.vocab.keys.index(key) for key in self.context_keys]
        pert_col = self.vocab.keys.index(self.perturbation_key)
        control_id = self._control_id()
        values = torch.from_numpy(np.log1p(token_midpoints()))

        def profiles(contexts: np.ndarray) -> np.ndarray:  # each context at the control, everything else null
            rows = np.zeros((len(contexts), cond.shape[1]), dtype=np.int64)
            rows[:, ctx_cols] = contexts
            rows[:, pert_col] = control_id
            return expected_values(self.denoiser, torch.from_numpy(rows), values, device=dev).numpy()

        return neighbour_pairs(cond, ctx_cols=ctx_cols, pert_col=pert_col, control_id=control_id,
                               frequencies=self._freq, profiles=profiles, k=k, fallback=free,
                               min_similarity=min_similarity)

    def _reference(self, cond: np.ndarray, reference: str) -> np.ndarray:
        if reference in ("control", "composed") and self.perturbation_key is not None:
            ref = cond.copy()
            j = self.vocab.keys.index(self.perturbation_key)
            ref[:, j] = self._control_id()
            return ref
        return np.zeros_like(cond)

    def simulate(self, conditions: pd.DataFrame, **kwargs: Any) -> ad.AnnData:
        """One simulated cell per row of ``conditions``.

        Parameters
        ----------
        conditions
            Labels per condition key (a missing column means the null condition).
        steps, guidance_scale, guidance_reference, guidance_gate, order, schedule, seed, batch_size
            See :class:`SampleConfig`.
        prior
            Prior injection: ``{gene: count}`` fixed in every cell and never re-masked.
        start_counts
            Optional ``(n, genes)`` counts to start from (counterfactual mode): a random
            ``mask_fraction`` of each cell's genes is re-generated, the rest kept.
        mask_fraction
            Fraction of genes re-generated when ``start_counts`` is given.

        See Also
        --------
        iter_simulate : the same cells, yielded in chunks (for output larger than memory).
        """
        return self.collect(self.iter_simulate(conditions, **kwargs), conditions)

    def collect(self, chunks: Iterable[ad.AnnData], conditions: pd.DataFrame | None = None) -> ad.AnnData:
        """Assemble the chunks of :meth:`iter_simulate` / :meth:`iter_predict` into one AnnData.

        With no chunks (0 cells), an empty AnnData with the model's genes and the columns of
        ``conditions`` is returned.
        """
        chunks = list(chunks)
        if not chunks:
            obs = (conditions if conditions is not None else pd.DataFrame()).iloc[:0]
            return self._chunk(sp.csr_matrix((0, len(self.genes)), dtype=np.float32), obs, 0, {})
        out = ad.concat(chunks, merge="same")
        out.uns = chunks[0].uns
        return out

    def iter_simulate(self, conditions: pd.DataFrame, *, steps: int = 32, guidance_scale: float = 0.0,
                      guidance_reference: str = "control", guidance_gate: float = 0.0, order: str = "random",
                      schedule: str = "cosine", seed: int = 0, device: str = "auto", batch_size: int = 256,
                      prior: Mapping[str, int] | None = None, start_counts: sp.spmatrix | None = None,
                      mask_fraction: float = 1.0, coupling: str = "independent", neighbours: int = 0,
                      min_similarity: float | None = None, global_weight: float | None = None,
                      progress: bool = False, chunk_cells: int | None = None) -> Iterator[ad.AnnData]:
        """:meth:`simulate` in chunks of ``chunk_cells`` cells (same cells for the same seed and chunk size).

        Memory is ``O(chunk_cells x genes)`` whatever the number of cells (default 1,024
        cells per chunk); write the chunks with :class:`lingshu.h5ad_stream.H5adStreamWriter`.
        ``coupling="quantile"`` (counterfactual mode of a perturbation model; the start cells are
        taken to be control cells of their context): each re-generated gene is carried from its
        observed value's quantile under the control to the same quantile under the target, in one
        pass (:func:`lingshu.sampler.transport_tokens`), instead of drawn afresh in ``steps`` steps.
        ``neighbours=k`` (composed guidance only): the perturbation's effect is averaged over the
        ``k`` contexts seen with it whose control profile is most like the target context's
        (:mod:`lingshu.neighbours`) instead of taken from the context-free pair; ``min_similarity``
        leaves out the ones, other than the nearest, whose control profile correlates with the
        target's below it (the rest fill the ``k`` slots in turn, nearest first); ``global_weight=g``
        mixes the context-free effect in: ``(1 - g)`` times the neighbours' mean effect plus ``g``
        times the context-free one (one more denoiser pair per step).
        """
        if chunk_cells is not None and (not whole_number(chunk_cells) or chunk_cells < 1):
            raise LingshuError(f"chunk_cells must be a whole number >= 1, got {chunk_cells}")
        chunk_cells = int(chunk_cells or _CHUNK_CELLS)
        seed = check_seed(seed)
        if not self.history.get("step"):
            log.warning("this model has not been trained: its cells come from random weights (call train() first)")
        cfg = SampleConfig(steps=steps, schedule=schedule, order=order, guidance_scale=guidance_scale,
                           guidance_reference=guidance_reference, guidance_gate=guidance_gate, batch_size=batch_size,
                           seed=seed)
        if coupling not in COUPLINGS:
            raise LingshuError(f"coupling must be one of {', '.join(COUPLINGS)}, got {coupling!r}")
        quantile = coupling == "quantile"
        if quantile and (start_counts is None or self.perturbation_key is None):
            raise LingshuError("quantile coupling needs start cells and a model trained with a perturbation key")
        conditions = conditions.reset_index(drop=True)
        cond = self.vocab.encode(conditions, allow_missing_keys=True)
        composed = guidance_reference == "composed"
        if composed and self.perturbation_key is None:
            raise LingshuError("composed guidance needs a model trained with a perturbation key")
        if int(neighbours) < 0 or (neighbours and not composed) or (neighbours and not self.context_keys):
            raise LingshuError(f"neighbours must be 0, or >= 1 with composed guidance and a model with context keys; "
                               f"got {neighbours} with guidance reference {guidance_reference!r}")
        if min_similarity is not None and (not neighbours or not -1.0 <= float(min_similarity) <= 1.0):
            raise LingshuError(f"min_similarity must be a correlation in [-1, 1] and needs neighbours >= 1; "
                               f"got {min_similarity} with neighbours {neighbours}")
        min_similarity = None if min_similarity is None else float(min_similarity)
        if global_weight is not None and (not neighbours or not 0.0 <= float(global_weight) <= 1.0):
            raise LingshuError(f"global_weight must be in [0, 1] and needs neighbours >= 1; "
                               f"got {global_weight} with neighbours {neighbours}")
        global_weight = None if global_weight is None else float(global_weight)
        ref = self._reference(cond, guidance_reference) if guidance_scale != 0 or composed else None
        cond, ref = self._with_extras(cond, ref, start_counts, seed)
        source = self._reference(cond, "control") if quantile else None  # the extra columns (null state, the
        # start cells' library bins) are the same for the source
        dev = resolve_device(device)
        self.denoiser.to(dev)
        pooled = self._context_free(cond, ref) if composed else None
        weights = None
        if neighbours:
            free = pooled
            pooled = self._neighbour_pairs(cond, free, int(neighbours), min_similarity, dev)
            if global_weight:  # the context-free pair as one more, weighted pair
                weights = [(1.0 - global_weight) / int(neighbours)] * int(neighbours) + [global_weight]
                pooled = tuple(pooled) + tuple(free)
        fixed = self._prior_tokens(prior)
        rng = np.random.default_rng(seed)
        meta = {"version": _version(), "steps": steps, "guidance_scale": guidance_scale,
                "guidance_reference": guidance_reference, "guidance_gate": guidance_gate, "order": order,
                "schedule": schedule,
                "seed": seed, "mask_fraction": mask_fraction if start_counts is not None else 1.0,
                "coupling": coupling, "neighbours": int(neighbours), "prior_genes": sorted(prior) if prior else []}
        if min_similarity is not None:
            meta["min_similarity"] = min_similarity
        if global_weight is not None:
            meta["global_weight"] = global_weight
        for c, start in enumerate(range(0, len(cond), chunk_cells)):
            sl = slice(start, min(start + chunk_cells, len(cond)))
            init = torch.full((sl.stop - sl.start, len(self.genes)), MASK_ID, dtype=torch.long)
            if start_counts is not None:
                init = self.tokenizer.encode(sp.csr_matrix(start_counts[sl]))
                observed = init.clone() if quantile else None
                init[torch.from_numpy(rng.random(init.shape) < mask_fraction)] = MASK_ID
            for j, tok in fixed.items():
                init[:, j] = tok
            kw = dict(ref=None if ref is None else torch.from_numpy(ref[sl]),
                      pooled=None if pooled is None else tuple(torch.from_numpy(p[sl]) for p in pooled),
                      pooled_weights=weights, device=dev, progress=progress, autocast=dev.type == "cuda")
            cfg_c = dataclasses.replace(cfg, seed=seed + 7919 * c)
            if quantile:  # the source pass sees the cells' own counts, the target pass the prior
                tokens = transport_tokens(self.denoiser, torch.from_numpy(cond[sl]), torch.from_numpy(source[sl]),
                                          init, observed, cfg_c, **kw)
            else:
                tokens = sample_tokens(self.denoiser, torch.from_numpy(cond[sl]), init, cfg_c, **kw)
            x = sp.csr_matrix(self.tokenizer.decode(tokens, rng).astype(np.float32))
            yield self._chunk(x, conditions.iloc[sl], start, meta)

    def _chunk(self, x: sp.csr_matrix, conditions: pd.DataFrame, start: int, meta: dict[str, Any]) -> ad.AnnData:
        obs = conditions.copy()
        for k in self.vocab.keys:
            if k in obs.columns:
                obs[k] = pd.Categorical(obs[k].astype(str), categories=self.vocab.labels[k])
        obs.index = [f"sim_{i}" for i in range(start, start + len(obs))]
        out = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(self.genes, dtype=str)))
        out.uns["lingshu"] = dict(meta)
        return out

    def _prior_tokens(self, prior: Mapping[str, int] | None) -> dict[int, int]:
        if not prior:
            return {}
        pos = {g: i for i, g in enumerate(self.genes)}
        check_labels(list(prior), self.genes, "prior gene")
        for g, c in prior.items():
            if not whole_number(c) or c < 0:
                raise LingshuError(f"prior count of {g!r} must be a whole number >= 0, got {c}")
        return {pos[g]: int(self.tokenizer.encode(np.array([int(c)]))[0]) for g, c in prior.items()}

    def generate(self, n_cells: int, condition: Mapping[str, str] | None = None, **kwargs: Any) -> ad.AnnData:
        """``n_cells`` cells; condition keys not given are drawn from the training label frequencies.

        ``generate(n)`` therefore reproduces the training cell-type proportions, and
        ``generate(n, {"cell_type": "B"})`` gives B cells. Keyword arguments go to :meth:`simulate`.
        """
        return self.simulate(self.generation_table(n_cells, condition, seed=kwargs.get("seed", 0)), **kwargs)

    def generation_table(self, n_cells: int, condition: Mapping[str, str] | None = None, *,
                         seed: int = 0) -> pd.DataFrame:
        """The condition labels :meth:`generate` simulates (pass to :meth:`iter_simulate` to stream)."""
        if not whole_number(n_cells) or n_cells < 0:
            raise LingshuError(f"the number of cells must be a whole number >= 0, got {n_cells}")
        n_cells, seed = int(n_cells), check_seed(seed)
        condition = dict(condition or {})
        for k, v in condition.items():
            if k not in self.vocab.keys:
                raise LingshuError(f"condition key {k!r} is not one of the model's: {', '.join(self.vocab.keys) or '(none)'}")
            check_labels([v], self.vocab.labels[k], k)
        keys = self.vocab.keys
        freq = np.asarray(self._freq, dtype=np.int64)
        given = {keys.index(k): self.vocab.labels[k].index(str(v)) + 1 for k, v in condition.items()}
        match = np.all([freq[:, j] == i for j, i in given.items()], axis=0) if given else np.ones(len(freq), bool)
        rng = np.random.default_rng(seed + 104729)
        if match.any():
            rows = freq[match]
            ids = rows[rng.choice(len(rows), n_cells, p=rows[:, -1] / rows[:, -1].sum()), :-1]
        else:  # a novel combination: draw the missing keys from their marginals
            ids = freq[rng.choice(len(freq), n_cells, p=freq[:, -1] / freq[:, -1].sum()), :-1]
        for j, i in given.items():
            ids[:, j] = i
        return self.vocab.decode(ids)

    def predict(self, adata: ad.AnnData, perturbations: Sequence[str], **kwargs: Any) -> ad.AnnData:
        """Cells of each input cell's context under each perturbation.

        Parameters
        ----------
        adata
            Source cells; their ``obs`` must hold the model's context keys.
        perturbations
            Labels of ``perturbation_key`` to simulate (one label may be given as a string).
        n_per_cell
            Simulated cells per input cell and perturbation.
        guidance_scale, steps, seed
            Guidance relative to the control (default 2.0) and sampling steps (default 3).
        mask_fraction
            ``None``: sample from the condition tokens alone (published). A value in
            (0, 1]: counterfactual mode, start from each input cell's counts and
            re-generate that fraction of its genes under the perturbation.
        coupling
            Counterfactual mode: ``"independent"`` draws the re-generated genes afresh (default);
            ``"quantile"`` carries each from its observed value's quantile under the control to
            the same quantile under the perturbation, keeping the source cells' co-variation.
        neighbours
            With ``guidance_reference="composed"``: take the perturbation's effect from the ``k``
            seen contexts most like each cell's own (0: the context-free effect; see
            :mod:`lingshu.neighbours`).
        min_similarity
            With ``neighbours``: leave out neighbour contexts, other than the nearest, whose
            control profile correlates with the cell's context's below this (default: none).
        global_weight
            With ``neighbours``: the share ``g`` of the context-free effect (all contexts pooled)
            in the effect used, ``(1 - g)`` times the neighbours' mean plus ``g`` times it
            (default: none, the neighbours alone).
        layer
            Where the input counts are (counterfactual mode).

        Other keyword arguments go to :meth:`iter_simulate`. :meth:`iter_predict` yields the
        same cells in chunks.
        """
        return self.collect(self.iter_predict(adata, perturbations, **kwargs))

    def iter_predict(self, adata: ad.AnnData, perturbations: Sequence[str], *, n_per_cell: int = 1,
                     guidance_scale: float = 2.0, steps: int = 3, seed: int = 0, mask_fraction: float | None = None,
                     layer: str | None = None, **kwargs: Any) -> Iterator[ad.AnnData]:
        """:meth:`predict` in chunks (each with its ``source_cell`` column)."""
        if self.perturbation_key is None:
            raise LingshuError("this model was trained without --perturbation-key; use generate instead")
        if not whole_number(n_per_cell) or n_per_cell < 1:
            raise LingshuError(f"--n-per-cell must be a whole number >= 1, got {n_per_cell}")
        n_per_cell = int(n_per_cell)
        if isinstance(perturbations, str):  # one label, not its characters
            perturbations = [perturbations]
        perturbations = [str(p) for p in perturbations]
        if not perturbations:
            raise LingshuError("give at least one perturbation")
        check_labels(perturbations, self.vocab.labels[self.perturbation_key], "perturbation")
        require_obs_keys(adata, self.context_keys)
        ctx = adata.obs[self.context_keys].astype(str).reset_index(drop=True)
        for k in self.context_keys:
            check_labels(ctx[k], self.vocab.labels[k], k)
        src = np.repeat(np.arange(adata.n_obs), n_per_cell)
        parts = [ctx.iloc[src].assign(**{self.perturbation_key: p}) for p in perturbations]
        table = pd.concat(parts, ignore_index=True)
        start = None
        if mask_fraction is not None:
            if not 0 < mask_fraction <= 1:
                raise LingshuError(f"mask_fraction must be in (0, 1], got {mask_fraction}")
            from .io import align_genes
            counts, _ = align_genes(counts_matrix(adata, layer), list(map(str, adata.var_names)), self.genes)
            start = sp.vstack([counts[src]] * len(perturbations)).tocsr()
        source = np.tile(np.asarray(adata.obs_names)[src], len(perturbations))
        done = 0
        for chunk in self.iter_simulate(table, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                        start_counts=start, mask_fraction=mask_fraction or 1.0, **kwargs):
            chunk.obs["source_cell"] = source[done:done + chunk.n_obs]
            done += chunk.n_obs
            yield chunk

    # ------------------------------------------------------------- save/load
    def _manifest(self, trainer: Trainer | None) -> dict[str, Any]:
        hist = trainer.history.to_dict() if trainer is not None else self.history
        return {
            "lingshu_version": _version(),
            "preset": self.preset,
            "model_config": to_dict(self.model_config),
            "train_config": to_dict(self.train_config),
            "tokenizer": self.tokenizer.state_dict(),
            "genes": self.genes,
            "permutation": self.denoiser.perm.tolist(),
            "conditions": {"keys": self.vocab.keys, "labels": self.vocab.labels, "context_keys": self.context_keys,
                           "perturbation_key": self.perturbation_key, "control": self.control,
                           "frequencies": self._freq,
                           "library_size": None if self.library is None else self.library.state_dict(),
                           "cell_states": None if self.states is None else self.states.state_dict()},
            "training": hist,
        }

    def _write(self, path: str | Path, trainer: Trainer | None) -> None:
        weights = (trainer.ema if trainer is not None else self.denoiser).state_dict()
        ckpt.write_checkpoint(path, self._manifest(trainer), weights,
                              trainer.state_tensors() if trainer is not None else None)

    def save(self, path: str | Path) -> None:
        """Write the model directory (EMA weights, manifest and, after training, the trainer state)."""
        self._write(path, self._trainer)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "LingshuModel":
        """Load a model directory written by :meth:`save` (verified; never unpickles)."""
        m = ckpt.read_manifest(path)
        try:
            c = m["conditions"]
            self = cls.__new__(cls)
            self._setup(list(m["genes"]), Vocabulary(list(c["keys"]), {k: list(v) for k, v in c["labels"].items()}),
                        list(c["context_keys"]), c["perturbation_key"], c["control"],
                        _model_config(m), CountTokenizer.from_state(m["tokenizer"]))
            self.preset, self.train_config = m.get("preset", "custom"), from_dict(TrainConfig, m["train_config"])
            self._freq, self.history, self._trainer = c["frequencies"], m.get("training", {}), None
            self.library, self.states = _library(c), _cell_states(c)
        except (KeyError, TypeError, ValueError) as e:
            raise LingshuError(f"{path}: malformed manifest ({e.__class__.__name__}: {e})") from None
        self.denoiser = Denoiser(self.model_config, len(self.genes), self._cond_sizes())
        weights = ckpt.read_tensors(path)
        if m["permutation"] != weights["perm"].tolist():
            raise LingshuError(f"{path}: gene permutation in the weights differs from the manifest")
        try:
            self.denoiser.load_state_dict(weights)
        except RuntimeError as e:
            raise LingshuError(f"{path}: weights do not match the manifest's model config ({str(e).splitlines()[0]})") from None
        self.denoiser.to(resolve_device(device)).eval()
        return self
