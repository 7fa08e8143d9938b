"""The ``lingshu`` command line: train, simulate, info, demo.

Each command parses its flags, checks the user's input early (labels, output paths) and
calls the library. Human output goes to stderr; stdout carries only ``info``'s report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import console, friendly, parse_conditions, parse_prior, resolve_device, setup
from .evaluate import evaluate

app = typer.Typer(
    name="lingshu",
    help="Lingshu: generate and perturb virtual single cells with a masked discrete diffusion model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda if available), cpu or cuda.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed: same seed, same result.")]


def _train_configs(preset_name: str, config_file: Path | None, overrides: dict[str, Any]):
    """Resolve ModelConfig and TrainConfig: preset < [model]/[train] of the TOML file < flags."""
    from lingshu.config import ModelConfig, TrainConfig, from_dict, preset, to_dict
    from lingshu.errors import LingshuError

    base = preset(preset_name)
    model_d, train_d = to_dict(base.model), to_dict(base.train)
    if config_file is not None:
        try:
            doc = tomllib.loads(Path(config_file).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise LingshuError(f"{config_file} is not valid TOML: {exc}") from None
        unknown = sorted(set(doc) - {"model", "train"})
        if unknown:
            raise LingshuError(f"{config_file}: unknown section(s) {', '.join(unknown)}; expected [model] and [train]")
        model_d.update(doc.get("model", {}))
        train_d.update(doc.get("train", {}))
    train_d.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(ModelConfig, model_d), from_dict(TrainConfig, train_d)


@app.command()
@friendly
def train(
    input: Annotated[list[Path], typer.Option(
        "--in", help="Training cells (.h5ad, 10x .h5, .h5mu) with raw counts; repeat for several shards.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory for the model and checkpoints.")],
    context_key: Annotated[list[str] | None, typer.Option(
        "--context-key", metavar="KEY", help="obs column to condition on (repeatable), e.g. cell_type.")] = None,
    perturbation_key: Annotated[str | None, typer.Option(
        "--perturbation-key", help="obs column naming the perturbation, e.g. condition.")] = None,
    control: Annotated[str | None, typer.Option(
        "--control", help="The control label of --perturbation-key.")] = None,
    layer: Annotated[str | None, typer.Option(
        "--layer", help="Layer holding raw counts (default X; 'raw' for .raw).")] = None,
    preset: Annotated[str, typer.Option("--preset", help="Model size: tiny, small, base or paper.")] = "tiny",
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", help="Optimizer steps (default: the preset's).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Cells per batch (default: the preset's).")] = None,
    cell_states: Annotated[int | None, typer.Option(
        "--cell-states", help="Condition on this many k-means states of the training cells (0: off; default: the "
                              "preset's); restores within-type variation in generated cells.")] = None,
    device: Device = "auto",
    seed: Seed = 0,
    config: Annotated[Path | None, typer.Option(
        "--config", help="TOML file with [model] and [train] settings.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    stream: Annotated[bool, typer.Option(
        "--stream", help="Read cells from disk in blocks instead of loading them (automatic for several --in).")] = False,
    shuffle_buffer: Annotated[int, typer.Option(
        "--shuffle-buffer", help="With --stream: blocks of 1,024 cells mixed per shuffle buffer.")] = 16,
    nproc: Annotated[int, typer.Option(
        "--nproc", help="Data-parallel processes on this machine (launches torchrun; one per GPU).")] = 1,
    quiet: Quiet = False,
) -> None:
    """Train a model on count data and save it to --out."""
    from lingshu import LingshuModel, distributed
    from lingshu.errors import LingshuError
    from lingshu.io import read_cells
    from lingshu.validation import require_obs_keys

    if nproc < 1:
        raise LingshuError(f"--nproc must be >= 1, got {nproc}")
    if nproc > 1 and not distributed.launched_by_torchrun():
        _relaunch_with_torchrun(nproc)
    dist, device = distributed.init(resolve_device(device))
    progress = setup(quiet or not dist.is_main)
    context_keys = list(context_key or [])
    if control is not None and perturbation_key is None:
        raise LingshuError("--control needs --perturbation-key (the obs column it is a label of)")
    manifest = out / "lingshu.json"
    if resume and not manifest.exists():
        raise LingshuError(f"--resume: {out} holds no model (no lingshu.json); train without --resume first")
    if not resume and manifest.exists():
        raise LingshuError(f"{out} already holds a model; pass --resume to continue it or choose another --out")
    if out.exists() and not out.is_dir():
        raise LingshuError(f"--out {out} is a file; give a directory")

    if not input:
        raise LingshuError("give the training cells with --in")
    seen: dict[Path, Path] = {}
    for path in input:
        if path.resolve() in seen:
            raise LingshuError(f"--in {path} is given more than once (as {seen[path.resolve()]}); "
                               "its cells would be trained on twice")
        seen[path.resolve()] = path
    stream = stream or len(input) > 1
    model_cfg, train_cfg = _train_configs(
        preset, config, {"max_steps": max_steps, "batch_size": batch_size, "seed": seed, "device": device})
    if cell_states is not None:
        model_cfg = dataclasses.replace(model_cfg, cell_states=cell_states)
    if resume:
        # the run directory holds the keys and configs but no data: rebuild on --in, then continue
        saved = LingshuModel.load(out)
        _check_same_keys(saved, context_keys, perturbation_key, control)
        context_keys, perturbation_key, control = saved.context_keys, saved.perturbation_key, saved.control
        preset, model_cfg, seed = saved.preset, saved.model_config, saved.model_config.gene_seed
    keys = dict(context_keys=context_keys, perturbation_key=perturbation_key, control=control, preset=preset,
                config=model_cfg, layer=layer, seed=seed)
    if stream:
        if shuffle_buffer < 1:
            raise LingshuError(f"--shuffle-buffer must be >= 1, got {shuffle_buffer}")
        model = LingshuModel.from_files(input, buffer=shuffle_buffer, **keys)
        n_cells, n_genes = model._x.shape
    else:
        adata = read_cells(input[0], layer=layer)
        require_obs_keys(adata, context_keys + ([perturbation_key] if perturbation_key else []))
        model = LingshuModel(adata, **keys)
        n_cells, n_genes = adata.n_obs, adata.n_vars
    where = f"{device}" + (f" x {dist.world} processes" if dist.active else "")
    if dist.is_main:
        console.print(f"training on {n_cells:,} cells x {n_genes:,} genes ({preset}, {where})",
                      markup=False, highlight=False)
    history = model.train(train_cfg, max_steps=max_steps, device=device, out_dir=out, resume=resume,
                          progress=progress)  # rank 0 writes the final checkpoint to `out`
    distributed.barrier()
    distributed.shutdown()
    if not dist.is_main:
        return
    loss = history.get("val_loss") or history.get("train_loss") or []
    last = f", last loss {_last(loss):.4f}" if loss else ""
    steps = history.get("step", "?")
    console.print(f"saved model to {out} after {steps} steps ({history.get('seconds', 0.0):.1f} s{last})",
                  markup=False, highlight=False)


def _relaunch_with_torchrun(nproc: int) -> None:
    """Run this same command under ``torch.distributed.run`` with ``nproc`` processes, then exit."""
    import subprocess
    import sys

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cli.main", *argv]
    raise typer.Exit(subprocess.call(cmd))


def _check_same_keys(saved, context_keys: list[str], perturbation_key: str | None, control: str | None) -> None:
    """With --resume, condition flags are optional but must agree with the run's."""
    from lingshu.errors import LingshuError

    given = {"--context-key": (context_keys, saved.context_keys),
             "--perturbation-key": (perturbation_key, saved.perturbation_key), "--control": (control, saved.control)}
    for flag, (mine, theirs) in given.items():
        if mine and mine != theirs:
            raise LingshuError(f"--resume: {flag} {mine} differs from the run's ({theirs}); "
                               "drop the flag or start a new --out")


def _last(values: list) -> float:
    v = values[-1]
    return float(v[-1] if isinstance(v, (list, tuple)) else v)


@app.command()
@friendly
def simulate(
    model_dir: Annotated[Path, typer.Option("--model", help="Model directory written by lingshu train.")],
    out: Annotated[Path, typer.Option("--out", help="Output file: .h5ad, .h5mu or .rds.")],
    input: Annotated[Path | None, typer.Option("--in", help="Cells to perturb (.h5ad, 10x .h5, .h5mu).")] = None,
    perturb: Annotated[list[str] | None, typer.Option(
        "--perturb", metavar="LABEL", help="Perturbation to apply to every --in cell (repeatable).")] = None,
    n_per_cell: Annotated[int, typer.Option(
        "--n-per-cell", help="Simulated cells per input cell and perturbation.")] = 1,
    n_cells: Annotated[int | None, typer.Option(
        "--n-cells", help="Generate this many cells from scratch (no --in).")] = None,
    condition: Annotated[list[str] | None, typer.Option(
        "--condition", metavar="KEY=VALUE",
        help="KEY=VALUE fixed for generated cells (repeatable); other keys follow training frequencies.")] = None,
    guidance: Annotated[float | None, typer.Option(
        "--guidance", help="Classifier-free guidance scale (default 2.0 with --in, 0 otherwise).")] = None,
    guidance_reference: Annotated[str, typer.Option(
        "--guidance-reference",
        help="What guidance is relative to: control (same context at the control; published), null, or "
             "composed (this context's control plus the perturbation's effect learned across all contexts: for "
             "context x perturbation pairs never seen in training).")] = "control",
    guidance_gate: Annotated[float, typer.Option(
        "--guidance-gate", metavar="TAU",
        help="Guide only the genes whose predicted mean log1p count under the perturbation differs from the "
             "reference's by more than TAU; draw the rest from the plain conditional (0, the default: every gene, "
             "as published). Not with composed.")] = 0.0,
    neighbours: Annotated[int, typer.Option(
        "--neighbours", metavar="K",
        help="With --guidance-reference composed: take the perturbation's effect from the K contexts seen with it "
             "whose control expression is most like each cell's own context, instead of from all contexts pooled "
             "(0, the default).")] = 0,
    min_similarity: Annotated[float | None, typer.Option(
        "--min-similarity", metavar="R",
        help="With --neighbours: leave out neighbour contexts, other than the nearest, whose control expression "
             "correlates with the cell's own context's below R (Pearson, -1..1); the rest fill the K slots in "
             "turn, nearest first.")] = None,
    global_weight: Annotated[float | None, typer.Option(
        "--global-weight", metavar="G",
        help="With --neighbours: mix the effect learned across all contexts pooled into the neighbours' mean "
             "effect, (1 - G) x neighbours + G x pooled (0..1).")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Denoising steps (default 3 with --in, 32 otherwise).")] = None,
    prior: Annotated[list[str] | None, typer.Option(
        "--prior", metavar="GENE=COUNT",
        help="Prior injection: GENE fixed at COUNT in every simulated cell and never re-generated (repeatable), "
             "e.g. the target of a knock-out at 0.")] = None,
    mask_fraction: Annotated[float | None, typer.Option(
        "--mask-fraction",
        help="With --in: start from each input cell's counts and re-generate this fraction of its genes under "
             "the perturbation (a per-cell counterfactual); default: from the condition labels alone.")] = None,
    coupling: Annotated[str, typer.Option(
        "--coupling",
        help="With --mask-fraction: independent (re-generated genes drawn afresh) or quantile (each carried from "
             "its observed value's quantile under the control to the same quantile under the perturbation, "
             "keeping the input cells' co-variation).")] = "independent",
    seed: Seed = 0,
    device: Device = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    quiet: Quiet = False,
) -> None:
    """Perturb real cells (--in + --perturb) or generate new ones (--n-cells)."""
    from lingshu import LingshuModel
    from lingshu.config import GUIDANCE_REFERENCES
    from lingshu.errors import LingshuError
    from lingshu.io import check_output_path, read_cells
    from lingshu.sampler import COUPLINGS
    from lingshu.validation import check_labels

    progress = setup(quiet)
    perturbations = list(perturb or [])
    conditions = parse_conditions(condition)
    fixed = parse_prior(prior)
    if input is not None and n_cells is not None:
        raise LingshuError("give either --in (cells to perturb) or --n-cells (generate), not both")
    if input is None and n_cells is None:
        raise LingshuError("nothing to do: give --in cells.h5ad --perturb X to perturb cells, "
                           "or --n-cells N to generate cells")
    if input is not None and not perturbations:
        raise LingshuError("--in needs at least one --perturb")
    if input is None and perturbations:
        raise LingshuError("--perturb needs --in (the cells to perturb); to generate perturbed cells "
                           "from scratch use --condition KEY=VALUE")
    if input is not None and conditions:
        raise LingshuError("--condition applies to --n-cells; with --in the context comes from the cells")
    if mask_fraction is not None and input is None:
        raise LingshuError("--mask-fraction needs --in (the cells whose counts the simulation starts from)")
    if coupling not in COUPLINGS:
        raise LingshuError(f"--coupling must be {' or '.join(COUPLINGS)}, got {coupling!r}")
    if coupling != "independent" and mask_fraction is None:
        raise LingshuError(f"--coupling {coupling} needs --mask-fraction (it carries the --in cells' own counts)")
    if mask_fraction is not None and not 0 < mask_fraction <= 1:
        raise LingshuError(f"--mask-fraction must be in (0, 1], got {mask_fraction}")
    if n_cells is not None and n_cells < 1:
        raise LingshuError(f"--n-cells must be >= 1, got {n_cells}")
    if n_per_cell < 1:
        raise LingshuError(f"--n-per-cell must be >= 1, got {n_per_cell}")
    if guidance_reference not in GUIDANCE_REFERENCES:
        raise LingshuError(f"--guidance-reference must be control, null or composed, got {guidance_reference!r}")
    if guidance is not None and not math.isfinite(guidance):
        raise LingshuError(f"--guidance {guidance}: give a finite number")
    gate_ok = math.isfinite(guidance_gate) and guidance_gate >= 0
    if not gate_ok or (guidance_gate and guidance_reference == "composed"):
        raise LingshuError(f"--guidance-gate {guidance_gate}: give TAU >= 0, with guidance relative to the control "
                           "or null (not composed)")
    if neighbours < 0 or (neighbours and guidance_reference != "composed"):
        raise LingshuError(f"--neighbours {neighbours}: give K >= 1 together with --guidance-reference composed")
    if min_similarity is not None and (not neighbours or not -1 <= min_similarity <= 1):
        raise LingshuError(f"--min-similarity {min_similarity}: give a correlation in [-1, 1] together with "
                           "--neighbours K")
    if global_weight is not None and (not neighbours or not 0 <= global_weight <= 1):
        raise LingshuError(f"--global-weight {global_weight}: give a weight in [0, 1] together with --neighbours K")
    check_output_path(out, overwrite=overwrite)
    device = resolve_device(device)
    model = LingshuModel.load(model_dir)
    if fixed:  # before reading a possibly large file (the model checks again when it samples)
        check_labels(list(fixed), model.genes, "--prior gene")

    if input is not None:
        _check_perturbations(model, perturbations)  # before reading a possibly large file
        adata = read_cells(input)
        if adata.n_obs == 0:
            raise LingshuError(f"{input} has 0 cells; nothing to simulate")
        _check_context(model, adata)
        console.print(f"simulating {len(perturbations)} perturbation(s) x {adata.n_obs:,} cells "
                      f"x {n_per_cell}", markup=False, highlight=False)
        chunks = model.iter_predict(adata, perturbations, n_per_cell=n_per_cell,
                                    guidance_scale=2.0 if guidance is None else guidance,
                                    guidance_reference=guidance_reference, guidance_gate=guidance_gate,
                                    neighbours=neighbours, min_similarity=min_similarity, global_weight=global_weight,
                                    steps=3 if steps is None else steps, seed=seed,
                                    device=device, progress=progress,
                                    prior=fixed or None, mask_fraction=mask_fraction, coupling=coupling)
    else:
        _check_conditions(model, conditions)
        console.print(f"generating {n_cells:,} cells", markup=False, highlight=False)
        table = model.generation_table(n_cells, conditions or None, seed=seed)
        chunks = model.iter_simulate(table, steps=32 if steps is None else steps,
                                     guidance_scale=0.0 if guidance is None else guidance,
                                     guidance_reference=guidance_reference, guidance_gate=guidance_gate,
                                     neighbours=neighbours, min_similarity=min_similarity,
                                     global_weight=global_weight, seed=seed,
                                     device=device, progress=progress, prior=fixed or None)
    n = _write_chunks(model, chunks, out, overwrite=overwrite)
    console.print(f"wrote {n:,} cells to {out}", markup=False, highlight=False)


def _write_chunks(model, chunks, out: Path, *, overwrite: bool) -> int:
    """Stream chunks into an .h5ad (memory O(chunk)); other formats are assembled, then written."""
    from lingshu.h5ad_stream import H5adStreamWriter
    from lingshu.io import write_cells

    if out.suffix.lower() == ".h5ad":
        with H5adStreamWriter(out, model.genes, overwrite=overwrite) as writer:
            for chunk in chunks:
                writer.append(chunk)
                writer.uns = dict(chunk.uns)
        return writer.n_obs
    sim = model.collect(chunks)
    write_cells(sim, out, overwrite=overwrite)
    return sim.n_obs


def _check_perturbations(model, perturbations: list[str]) -> None:
    from lingshu.errors import LingshuError
    from lingshu.validation import check_labels

    if model.perturbation_key is None:
        raise LingshuError("this model was trained without --perturbation-key, so it cannot perturb cells; "
                           "use --n-cells to generate")
    check_labels(perturbations, model.categories[model.perturbation_key], "perturbation")


def _check_context(model, adata) -> None:
    """The input cells must carry every context key with labels the model knows."""
    from lingshu.validation import check_labels, require_obs_keys

    require_obs_keys(adata, model.context_keys)
    for key in model.context_keys:
        check_labels(adata.obs[key].astype(str).unique(), model.categories[key], f"{key} value")


def _check_conditions(model, conditions: dict[str, str]) -> None:
    from lingshu.errors import LingshuError
    from lingshu.validation import check_labels

    for key, value in conditions.items():
        if key not in model.condition_keys:
            known = ", ".join(model.condition_keys) or "(none: the model is unconditional)"
            raise LingshuError(f"--condition key {key!r} is not a condition of this model; known: {known}")
        check_labels([value], model.categories[key], f"{key} value")


@app.command()
@friendly
def info(
    path: Annotated[Path, typer.Argument(help="A data file (.h5ad, .h5, .h5mu) or a model directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Describe a data file or a model directory (report on stdout)."""
    from lingshu.errors import LingshuError

    from .info import data_report, format_report, model_report

    setup(quiet=True)
    if path.is_dir():
        if not (path / "lingshu.json").exists():
            raise LingshuError(f"{path} is a directory without lingshu.json, not a Lingshu model")
        report = model_report(path)
    else:
        report = data_report(path)
    typer.echo(json.dumps(report, indent=2, default=str) if as_json else format_report(report))


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option(
        "--out", help="Directory for the model, generated cells and metrics.")] = Path("lingshu-demo"),
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", help="Training steps (default: the tiny preset's).")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A short run (100 steps, 4 sampling steps) to check the install.")] = False,
    device: Device = "auto",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the outputs of an earlier demo in --out.")] = False,
    quiet: Quiet = False,
) -> None:
    """Train a tiny model on 700 PBMCs (ships with scanpy), generate cells, score them."""
    from .demo import run_demo

    progress = setup(quiet)
    run_demo(out, max_steps=max_steps, quick=quick, device=resolve_device(device), overwrite=overwrite,
             progress=progress)


app.command()(evaluate)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # outside a command (e.g. during imports)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
