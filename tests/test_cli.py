"""The ``lingshu`` command line, driven through Typer's CliRunner.

Bad input must end in exit code 1 with one ``error: ...`` line on stderr that says what to
do, never a traceback, and must leave no output (partial or temporary) behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from cli.main import app
from conftest import make_counts

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:mudata")

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> str:
    """Exit 1, a single ``error:`` line on stderr containing every fragment, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    return lines[0]


def no_temp_files(directory) -> bool:
    return not [p for p in directory.rglob("*") if ".tmp-" in p.name]


def write(adata, path):
    adata.write_h5ad(path)
    return path


# --- bad data files ----------------------------------------------------------------------------

def test_log_normalised_x_names_the_counts_layer(tmp_path):
    adata = make_counts()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.copy()
    adata.X.data = np.log1p(adata.X.data)
    path = write(adata, tmp_path / "lognorm.h5ad")
    result = run("train", "--in", path, "--out", tmp_path / "run", "--context-key", "cell_type")
    assert_user_error(result, "X holds non-integer values", "--layer counts")
    assert not (tmp_path / "run").exists()


def test_negative_values(tmp_path):
    adata = make_counts()
    adata.X = adata.X.toarray()
    adata.X[3, 4] = -2.0
    result = run("train", "--in", write(adata, tmp_path / "neg.h5ad"), "--out", tmp_path / "run")
    assert_user_error(result, "negative values")


def test_missing_obs_key_lists_available(counts_h5ad, tmp_path):
    result = run("train", "--in", counts_h5ad, "--out", tmp_path / "run", "--context-key", "donor")
    assert_user_error(result, "'donor' not found", "available: cell_type, condition")


@pytest.mark.parametrize("content", [b"", b"barcode,CD3E\nAAAC-1,3\n"])
def test_empty_or_non_hdf5_input(tmp_path, content):
    path = tmp_path / "cells.h5ad"
    path.write_bytes(content)
    for args in (["info", path], ["train", "--in", path, "--out", tmp_path / "run"]):
        assert_user_error(run(*args), str(path), "is not an HDF5 file")


def test_truncated_h5ad(tmp_path, counts_h5ad):
    data = counts_h5ad.read_bytes()
    path = tmp_path / "half.h5ad"
    path.write_bytes(data[: len(data) // 2])
    assert_user_error(run("info", path), "half.h5ad", "truncated")


def test_missing_input_file(tmp_path):
    assert_user_error(run("info", tmp_path / "nope.h5ad"), "nope.h5ad", "no such file")


def test_info_reports_data_file(tmp_path):
    adata = make_counts()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.copy()
    adata.X.data = np.log1p(adata.X.data)
    path = write(adata, tmp_path / "cells.h5ad")
    result = run("info", "--json", path)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout carries the report only
    assert (report["n_cells"], report["n_genes"]) == (120, 60)
    assert report["X"]["integer_counts"] is False and report["layers"]["counts"]["integer_counts"] is True
    assert report["X"]["nnz"] == adata.X.nnz
    assert report["obs"]["cell_type"]["levels"] == {"A": 60, "B": 60}
    text = run("info", path).stdout
    assert "NOT counts (non-integer values)" in text and "condition (2 levels)" in text


# --- train, info, simulate on a trained model --------------------------------------------------

def test_train_cli_with_config_then_info(tmp_path, counts_h5ad):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[model]\nn_layers = 1\n\n[train]\nmax_steps = 2\nbatch_size = 16\n")
    out = tmp_path / "run"
    result = run("train", "--in", counts_h5ad, "--out", out, "--context-key", "cell_type",
                 "--perturbation-key", "condition", "--control", "control", "--config", cfg,
                 "--max-steps", "3", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    report = json.loads(run("info", "--json", out).stdout)
    assert report["steps"] == 3  # the flag beats the TOML file
    assert report["model_config"]["n_layers"] == 1 and report["train_config"]["batch_size"] == 16
    assert report["vocab_sizes"] == {"cell_type": 2, "condition": 2}
    # a second train into the same run directory needs --resume
    again = run("train", "--in", counts_h5ad, "--out", out, "--context-key", "cell_type")
    assert_user_error(again, "already holds a model", "--resume")


def test_train_rejects_unknown_config_setting(tmp_path, counts_h5ad):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nlearning_rate = 1e-3\n")
    result = run("train", "--in", counts_h5ad, "--out", tmp_path / "run", "--config", cfg)
    assert_user_error(result, "unknown TrainConfig setting(s): learning_rate")


@pytest.mark.parametrize("toml, fragment", [
    ("[train]\nweight_decay = -1\n", "weight_decay must be a finite number >= 0"),
    ("[train]\nwarmup_steps = -3\n", "warmup_steps must be >= 0"),
    ("[train]\nbetas = [0.9, 1.5]\n", "betas must be two numbers in [0, 1)"),
    ("[train]\nlr = inf\n", "lr must be a finite number > 0"),
    ("[model]\nrope_base = 0\n", "rope_base must be a finite number > 1"),
])
def test_train_refuses_out_of_range_config_values(tmp_path, counts_h5ad, toml, fragment):
    """A TOML setting that would train on NaNs or a broken schedule is refused before any work."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    out = tmp_path / "run"
    assert_user_error(run("train", "--in", counts_h5ad, "--out", out, "--context-key", "cell_type", "--config", cfg,
                          "--device", "cpu"), fragment)
    assert not out.exists()


def test_the_same_training_file_twice_is_refused(tmp_path, counts_h5ad):
    out = tmp_path / "run"
    again = Path(counts_h5ad).parent / "." / Path(counts_h5ad).name
    assert_user_error(run("train", "--in", counts_h5ad, "--in", again, "--out", out, "--context-key", "cell_type"),
                      "is given more than once", "trained on twice")
    assert not out.exists()


def test_a_negative_seed_is_one_error_line(tmp_path, counts_h5ad, model_dir):
    out = tmp_path / "run"
    assert_user_error(run("train", "--in", counts_h5ad, "--out", out, "--context-key", "cell_type", "--seed", "-1"),
                      "seed must be a whole number in [0, 2**62)")
    assert_user_error(run("simulate", "--model", model_dir, "--n-cells", "3", "--out", tmp_path / "o.h5ad",
                          "--seed", "-1", "--device", "cpu"), "seed must be a whole number")
    assert not out.exists() and not (tmp_path / "o.h5ad").exists() and no_temp_files(tmp_path)


def test_train_resume_continues_run(tmp_path, counts_h5ad):
    out = tmp_path / "run"
    first = run("train", "--in", counts_h5ad, "--out", out, "--context-key", "cell_type",
                "--max-steps", "2", "--device", "cpu", "--quiet")
    assert first.exit_code == 0, first.output
    second = run("train", "--in", counts_h5ad, "--out", out, "--resume", "--max-steps", "4",
                 "--device", "cpu", "--quiet")
    assert second.exit_code == 0, second.output
    assert json.loads(run("info", "--json", out).stdout)["steps"] == 4


def test_train_with_cell_states_resumes_and_generates(tmp_path, counts_h5ad):
    out = tmp_path / "run"
    first = run("train", "--in", counts_h5ad, "--out", out, "--context-key", "cell_type", "--cell-states", "3",
                "--max-steps", "2", "--device", "cpu", "--quiet")
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "lingshu.json").read_text())
    assert manifest["model_config"]["cell_states"] == 3 and len(manifest["conditions"]["cell_states"]["centres"]) == 3
    second = run("train", "--in", counts_h5ad, "--out", out, "--resume", "--max-steps", "4", "--device", "cpu",
                 "--quiet")
    assert second.exit_code == 0, second.output
    gen = tmp_path / "gen.h5ad"
    result = run("simulate", "--model", out, "--n-cells", "5", "--condition", "cell_type=B", "--out", gen,
                 "--steps", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert ad.read_h5ad(gen).n_obs == 5
    bad = run("train", "--in", counts_h5ad, "--out", tmp_path / "bad", "--cell-states", "-1")
    assert_user_error(bad, "cell_states must be >= 0")
    assert not (tmp_path / "bad").exists()


def test_info_reports_model(model_dir):
    result = run("info", model_dir)
    assert result.exit_code == 0, result.output
    assert "60 genes" in result.stdout and "condition (perturbation; control: control): 2 labels" in result.stdout


def test_simulate_perturbs_cells_h5mu_in_and_out(tmp_path, model_dir, counts_adata):
    cells = tmp_path / "cells.h5mu"
    from lingshu.io import write_cells

    write_cells(counts_adata[:10].copy(), cells)
    out = tmp_path / "sim.h5mu"
    result = run("simulate", "--in", cells, "--perturb", "stim", "--model", model_dir, "--out", out,
                 "--n-per-cell", "2", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    from lingshu.io import read_cells

    sim = read_cells(out)
    assert sim.n_obs == 20 and list(sim.var_names) == list(counts_adata.var_names)
    assert set(sim.obs["condition"].astype(str)) == {"stim"}
    assert list(sim.obs["cell_type"].astype(str)) == list(np.repeat(counts_adata.obs["cell_type"][:10].astype(str), 2))
    assert np.all(sim.X.data == np.round(sim.X.data))


def test_simulate_generates_cells(tmp_path, model_dir):
    out = tmp_path / "gen.h5ad"
    result = run("simulate", "--model", model_dir, "--n-cells", "7", "--condition", "cell_type=B",
                 "--out", out, "--steps", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    gen = ad.read_h5ad(out)
    assert gen.n_obs == 7 and set(gen.obs["cell_type"].astype(str)) == {"B"}


def test_unknown_perturbation_lists_known_and_closest(tmp_path, model_dir, counts_h5ad):
    result = run("simulate", "--in", counts_h5ad, "--perturb", "Stim", "--model", model_dir,
                 "--out", tmp_path / "sim.h5ad")
    assert_user_error(result, "perturbation 'Stim'", "known: control, stim", "closest: stim")
    assert not (tmp_path / "sim.h5ad").exists()


def test_unknown_context_value(tmp_path, model_dir):
    adata = make_counts()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).replace({"B": "b_cells"})
    path = write(adata, tmp_path / "cells.h5ad")
    result = run("simulate", "--in", path, "--perturb", "stim", "--model", model_dir, "--out", tmp_path / "sim.h5ad")
    assert_user_error(result, "cell_type value 'b_cells'", "known: A, B")
    bad = run("simulate", "--model", model_dir, "--n-cells", "3", "--condition", "donor=d1",
              "--out", tmp_path / "gen.h5ad")
    assert_user_error(bad, "'donor' is not a condition", "known: cell_type, condition")


def test_model_of_another_format_version(tmp_path, model_dir, counts_h5ad):
    other = tmp_path / "old_model"
    shutil.copytree(model_dir, other)
    manifest = json.loads((other / "lingshu.json").read_text())
    manifest["format_version"] = 999
    (other / "lingshu.json").write_text(json.dumps(manifest))
    result = run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", other, "--out", tmp_path / "s.h5ad")
    assert_user_error(result, "format_version 999")
    assert_user_error(run("info", other), "format_version 999")


def test_existing_out_without_overwrite_is_untouched(tmp_path, model_dir, counts_h5ad):
    out = tmp_path / "sim.h5ad"
    out.write_bytes(b"keep me")
    result = run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out)
    assert_user_error(result, "sim.h5ad exists; pass --overwrite")
    assert out.read_bytes() == b"keep me"
    ok = run("simulate", "--model", model_dir, "--n-cells", "2", "--out", out, "--overwrite", "--steps", "2")
    assert ok.exit_code == 0, ok.output
    assert ad.read_h5ad(out).n_obs == 2


@pytest.mark.parametrize("exc, code", [(OSError(28, "No space left on device"), 1), (KeyboardInterrupt(), 130)])
def test_failed_or_interrupted_write_leaves_nothing(tmp_path, model_dir, monkeypatch, exc, code):
    from lingshu import model as model_module
    from lingshu.h5ad_stream import H5adStreamWriter

    append = H5adStreamWriter.append

    def broken_append(self, chunk):  # the disk fills up after the first chunk was written
        append(self, chunk)
        raise exc

    monkeypatch.setattr(H5adStreamWriter, "append", broken_append)
    monkeypatch.setattr(model_module, "_CHUNK_CELLS", 2)
    out_dir = tmp_path / "outputs"
    result = run("simulate", "--model", model_dir, "--n-cells", "5", "--steps", "2", "--out", out_dir / "gen.h5ad")
    assert result.exit_code == code, result.output
    if code == 1:
        assert_user_error(result, "No space left on device")
    assert "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []


def test_simulate_flag_combinations(tmp_path, model_dir, counts_h5ad):
    out = tmp_path / "x.h5ad"
    assert_user_error(run("simulate", "--model", model_dir, "--out", out), "nothing to do")
    assert_user_error(run("simulate", "--in", counts_h5ad, "--model", model_dir, "--out", out), "--perturb")
    assert_user_error(run("simulate", "--model", model_dir, "--n-cells", "3", "--condition", "cell_type",
                          "--out", out), "KEY=VALUE")
    assert_user_error(run("simulate", "--model", model_dir, "--n-cells", "3", "--out", tmp_path / "x.csv"),
                      "unknown extension '.csv'")
    assert_user_error(run("simulate", "--model", tmp_path / "nomodel", "--n-cells", "3", "--out", out), "nomodel")
    assert_user_error(run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out,
                          "--guidance-reference", "ctrl"), "--guidance-reference", "control, null or composed")
    assert_user_error(run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out,
                          "--neighbours", "2"), "--neighbours 2", "composed")
    assert_user_error(run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out,
                          "--guidance-reference", "composed", "--min-similarity", "0.8"), "--min-similarity",
                      "--neighbours")
    assert_user_error(run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out,
                          "--guidance-reference", "composed", "--neighbours", "1", "--global-weight", "2"),
                      "--global-weight 2", "[0, 1]")
    assert_user_error(run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out,
                          "--guidance-gate", "-1"), "--guidance-gate -1", "TAU >= 0")
    assert_user_error(run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out,
                          "--guidance-reference", "composed", "--guidance-gate", "0.1"), "not composed")
    assert_user_error(run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out,
                          "--guidance", "nan"), "--guidance nan", "finite")
    assert not out.exists()


def test_simulate_with_gated_guidance(tmp_path, model_dir, counts_h5ad):
    sims = {}
    for gate in ("0", "0.05", "1000"):
        out = tmp_path / f"gate{gate}.h5ad"
        result = run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out,
                     "--guidance", "2", "--guidance-gate", gate, "--steps", "2", "--device", "cpu", "--quiet")
        assert result.exit_code == 0, result.output
        sims[gate] = ad.read_h5ad(out)
        assert sims[gate].uns["lingshu"]["guidance_gate"] == float(gate)
    plain = tmp_path / "plain.h5ad"  # a gate no gene passes: plain conditional sampling, the same cells
    assert run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", plain,
               "--guidance", "0", "--steps", "2", "--device", "cpu", "--quiet").exit_code == 0
    assert (sims["1000"].X != ad.read_h5ad(plain).X).nnz == 0
    assert (sims["0.05"].X != sims["0"].X).nnz > 0


def test_simulate_with_composed_guidance(tmp_path, model_dir, counts_h5ad):
    out = tmp_path / "sim.h5ad"
    result = run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out,
                 "--guidance-reference", "composed", "--steps", "2", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    sim = ad.read_h5ad(out)
    assert sim.uns["lingshu"]["guidance_reference"] == "composed" and set(sim.obs["condition"]) == {"stim"}
    near = tmp_path / "near.h5ad"
    result = run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", near,
                 "--guidance-reference", "composed", "--neighbours", "1", "--min-similarity", "0.3", "--steps", "2",
                 "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    sim_near = ad.read_h5ad(near)
    assert sim_near.uns["lingshu"]["neighbours"] == 1 and sim_near.n_obs == sim.n_obs
    assert sim_near.uns["lingshu"]["min_similarity"] == 0.3
    assert (sim_near.X != sim.X).nnz > 0  # each cell type's own effect, not the pooled one: other cells
    mixed = tmp_path / "mixed.h5ad"
    result = run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", mixed,
                 "--guidance-reference", "composed", "--neighbours", "1", "--global-weight", "0.25", "--steps", "2",
                 "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert ad.read_h5ad(mixed).uns["lingshu"]["global_weight"] == 0.25


def test_simulate_prior_and_counterfactual_start(tmp_path, model_dir, counts_adata, counts_h5ad):
    # --prior pins a gene in every cell (here a gene that stim raises five-fold); --mask-fraction keeps the rest
    # of each input cell's counts except the re-generated fraction
    out = tmp_path / "sim.h5ad"
    result = run("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out,
                 "--prior", "G20=0", "--prior", "G3=7", "--mask-fraction", "0.25", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    sim = ad.read_h5ad(out)
    x = sim.X.toarray()
    genes = list(sim.var_names)
    assert np.all(x[:, genes.index("G20")] == 0) and np.all(x[:, genes.index("G3")] == 7)
    assert sim.uns["lingshu"]["mask_fraction"] == 0.25 and list(sim.uns["lingshu"]["prior_genes"]) == ["G20", "G3"]
    kept = (x == counts_adata.X.toarray())
    kept = np.delete(kept, [genes.index("G20"), genes.index("G3")], axis=1)
    assert 0.7 < kept.mean() < 1.0  # 3/4 kept, plus re-generated genes that happen to land on the same count
    gen = tmp_path / "gen.h5ad"
    ok = run("simulate", "--model", model_dir, "--n-cells", "5", "--prior", "G0=2", "--steps", "2", "--out", gen)
    assert ok.exit_code == 0, ok.output
    assert np.all(ad.read_h5ad(gen).X.toarray()[:, 0] == 2)


def test_simulate_quantile_coupling(tmp_path, model_dir, counts_adata):
    # carried to their own condition (control, no guidance), control cells come back unchanged
    ctrl = tmp_path / "ctrl.h5ad"
    cells = counts_adata[(counts_adata.obs["condition"] == "control").to_numpy()].copy()
    cells.write_h5ad(ctrl)
    out, stim = tmp_path / "same.h5ad", tmp_path / "stim.h5ad"
    args = ("simulate", "--in", ctrl, "--model", model_dir, "--mask-fraction", "1", "--coupling", "quantile",
            "--guidance", "0", "--device", "cpu", "--quiet")
    assert run(*args, "--perturb", "control", "--out", out).exit_code == 0
    same = ad.read_h5ad(out)
    assert np.array_equal(same.X.toarray(), cells.X.toarray()) and same.uns["lingshu"]["coupling"] == "quantile"
    assert run(*args, "--perturb", "stim", "--out", stim).exit_code == 0
    x = ad.read_h5ad(stim).X.toarray()
    assert x[:, 15:30].mean() > 1.5 * cells.X.toarray()[:, 15:30].mean()  # stim raises genes 15-29 five-fold
    assert_user_error(run("simulate", "--in", ctrl, "--model", model_dir, "--perturb", "stim", "--coupling",
                          "quantile", "--out", tmp_path / "x.h5ad"), "--coupling quantile needs --mask-fraction")
    assert_user_error(run(*args, "--perturb", "stim", "--coupling", "optimal", "--out", tmp_path / "x.h5ad"),
                      "--coupling must be independent or quantile")
    assert not (tmp_path / "x.h5ad").exists()


def test_simulate_prior_and_mask_fraction_errors(tmp_path, model_dir, counts_h5ad):
    out = tmp_path / "x.h5ad"
    args = ("simulate", "--in", counts_h5ad, "--perturb", "stim", "--model", model_dir, "--out", out)
    assert_user_error(run(*args, "--prior", "G1"), "--prior 'G1'", "GENE=COUNT")
    assert_user_error(run(*args, "--prior", "G1=-1"), "GENE=COUNT")
    assert_user_error(run(*args, "--prior", "G1=1", "--prior", "G1=2"), "G1 given twice")
    assert_user_error(run(*args, "--prior", "IL6=0"), "--prior gene 'IL6'", "never seen")
    assert_user_error(run(*args, "--mask-fraction", "1.5"), "--mask-fraction must be in (0, 1]")
    assert_user_error(run("simulate", "--model", model_dir, "--n-cells", "3", "--mask-fraction", "0.5",
                          "--out", out), "--mask-fraction needs --in")
    assert not out.exists()


def test_demo_quick(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    result = run("demo", "--out", out, "--quick", "--max-steps", "3", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    gen = ad.read_h5ad(out / "generated.h5ad")
    real_counts = make_real_counts()
    assert gen.n_obs == 700
    assert gen.obs["cell_type"].astype(str).value_counts().to_dict() == real_counts
    assert (out / "model" / "lingshu.json").is_file()
    assert sp.issparse(gen.X)
    try:
        from lingshu.metrics import distribution_report  # noqa: F401  (the demo skips scoring without it)
    except ImportError:
        assert not (out / "metrics.csv").exists()
    else:
        assert (out / "metrics.csv").is_file()
    assert_user_error(run("demo", "--out", out, "--quick"), "already holds demo outputs", "--overwrite")


def make_real_counts() -> dict[str, int]:
    from lingshu.datasets import pbmc68k_counts

    return pbmc68k_counts().obs["cell_type"].astype(str).value_counts().to_dict()
