"""A corpus of bad and unusual input files, run through the readers and the ``lingshu`` CLI.

Every file is written into ``tmp_path`` by the test that uses it (no data files are
committed). The corpus covers

* damaged or mislabelled files: an ``.h5ad`` cut in half, a truncated 10x ``.h5`` and
  ``.h5mu``, a text file renamed ``.h5ad``, an HDF5 ``.h5`` that is not a 10x matrix, an
  ``.h5ad`` renamed ``.h5``, an ``.h5mu`` without an RNA modality;
* matrix values: text, True/False, non-integer floats, NaN, Inf, negative counts, counts
  beyond 2**31, no ``X`` at all; and the accepted kinds (float, int64, uint16, 10x ``.h5``);
* names: duplicated genes (refused for training), duplicated cells (made unique, so that
  ``source_cell`` of simulated cells points at exactly one input cell), unicode genes and
  cells (round trip through train and simulate);
* shapes and labels: 0 cells, 0 genes, 1 cell x 18,080 genes (trains), obs without columns
  (trains without ``--context-key``; asking for one is a clear error), missing labels.

For every file and every entry point (``read_cells`` + ``counts_matrix`` + ``LingshuModel``,
``lingshu info``, ``lingshu train``, ``lingshu simulate --in``) the outcome is either a
correct result or exit code 1 with one ``error: ...`` line on stderr and no traceback; a
failure leaves no output behind and nothing ever changes the input file (sha256).
``simulate --in`` samples from the input cells' labels alone, so it ignores their count
values: a file whose counts are unusable for training still gives simulated cells.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from cli.main import app
from conftest import make_counts, recorded_logs
from lingshu import LingshuModel
from lingshu.errors import LingshuError
from lingshu.io import read_cells
from lingshu.validation import counts_matrix
from test_io import write_10x_h5

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:mudata")

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
N_CELLS, N_GENES = 24, 60  # genes G0..G59 as in the session model (conftest.model_dir)
UNICODE_GENES = ["Gène-α", "基因1", "ΔNp63", "Ген_Б", "🧬7"]


# --- the corpus --------------------------------------------------------------------------------

def _write_h5ad(adata: ad.AnnData, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notices about duplicated names, dtype conversion
        adata.write_h5ad(path)
    return path


def _with_x(x) -> Callable[[Path], Path]:
    """A file with the corpus cells and labels and ``x(dense counts)`` as X."""
    def build(d: Path) -> Path:
        adata = make_counts(N_CELLS, N_GENES)
        adata.X = x(adata.X.toarray())
        return _write_h5ad(adata, d / "cells.h5ad")
    return build


def _set(value, at=(3, 4)):
    def change(dense: np.ndarray) -> np.ndarray:
        dense = dense.astype(np.float64)
        dense[at] = value
        return dense
    return change


def _edited(edit: Callable[[ad.AnnData], ad.AnnData], name: str = "cells.h5ad") -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        return _write_h5ad(edit(make_counts(N_CELLS, N_GENES)), d / name)
    return build


def _no_x(adata: ad.AnnData) -> ad.AnnData:
    return ad.AnnData(obs=adata.obs, var=adata.var, layers={"counts": adata.X.copy()})


def _renamed(adata, *, obs_names=None, var_names=None):
    if obs_names is not None:
        adata.obs_names = obs_names
    if var_names is not None:
        adata.var_names = var_names
    return adata


def _missing_labels(adata: ad.AnnData) -> ad.AnnData:
    labels = adata.obs["cell_type"].astype(object)
    labels.iloc[[1, 5]] = np.nan
    adata.obs["cell_type"] = labels
    return adata


def _one_wide_cell(d: Path) -> Path:
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(0.3, size=(1, 18_080)).astype(np.float32))
    obs = pd.DataFrame({"cell_type": ["A"], "condition": ["control"]}, index=["only_cell"])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(18_080)])
    return _write_h5ad(ad.AnnData(X=x, obs=obs, var=var), d / "wide.h5ad")


def _truncated(build: Callable[[Path], Path], name: str) -> Callable[[Path], Path]:
    def cut(d: Path) -> Path:
        whole = build(d)
        data = whole.read_bytes()
        whole.unlink()
        path = d / name
        path.write_bytes(data[: len(data) // 2])
        return path
    return cut


def _tenx(d: Path) -> Path:
    adata = make_counts(N_CELLS, N_GENES)
    path = d / "filtered_feature_bc_matrix.h5"
    write_10x_h5(path, adata.X, list(adata.var_names), list(adata.obs_names))
    return path


def _h5mu(d: Path) -> Path:
    from lingshu.io import write_cells

    return write_cells(make_counts(N_CELLS, N_GENES), d / "cells.h5mu")


def _text_as_h5ad(d: Path) -> Path:
    path = d / "cells.h5ad"
    path.write_text("barcode,CD3E,MS4A1\nAAACCTG-1,3,0\nAAACGGG-1,0,5\n")
    return path


def _hdf5_not_10x(d: Path) -> Path:
    path = d / "matrix.h5"
    with h5py.File(path, "w") as f:
        f["expression"] = np.ones((4, 3), dtype=np.float32)
        f.create_group("metadata")["sample"] = np.array([b"s1"])
    return path


def _h5ad_as_h5(d: Path) -> Path:
    return _write_h5ad(make_counts(N_CELLS, N_GENES), d / "cells.h5")


def _h5mu_without_rna(d: Path) -> Path:
    def other(prefix):
        return ad.AnnData(X=np.ones((N_CELLS, 3), dtype=np.float32), obs=pd.DataFrame(index=cells),
                          var=pd.DataFrame(index=[f"{prefix}{i}" for i in range(3)]))

    cells = [f"cell{i}" for i in range(N_CELLS)]
    path = d / "multi.h5mu"
    md.MuData({"prot": other("CD"), "atac": other("chr1:")}).write_h5mu(path)
    return path


@dataclass(frozen=True)
class Case:
    """One input file and what each entry point should make of it.

    ``None`` means success; a string is a fragment of the expected one-line error.
    """

    name: str
    build: Callable[[Path], Path]
    read: str | None = None  # read_cells, lingshu info (and everything else when set)
    counts: str | None = None  # counts_matrix
    train: str | None = "same as counts"  # LingshuModel(...) and lingshu train
    simulate: str | None = None  # lingshu simulate --in (with the session model)
    keys: tuple[str, ...] = ("cell_type",)  # context keys to train with

    @property
    def train_error(self) -> str | None:
        return self.read or (self.counts if self.train == "same as counts" else self.train)

    @property
    def simulate_error(self) -> str | None:
        return self.read or self.simulate

    @property
    def x_holds_counts(self) -> bool:
        """What ``lingshu info`` says about X (0 cells / 0 genes are valid, just empty, counts)."""
        return self.counts is None or self.counts.startswith("the data has 0")


NOT_COUNTS = "not raw counts"
CASES = [
    # accepted matrices
    Case("float32_counts", _with_x(lambda x: sp.csr_matrix(x.astype(np.float32)))),
    Case("int64_dense", _with_x(lambda x: x.astype(np.int64))),
    Case("uint16_sparse", _with_x(lambda x: sp.csr_matrix(x.astype(np.uint16)))),
    Case("10x_h5", _tenx, keys=(), simulate="obs column 'cell_type' not found; available: (none)"),
    Case("h5mu", _h5mu),
    # wrong values or dtypes
    Case("text_matrix", _with_x(lambda x: x.astype(int).astype(str)), counts="X holds text values"),
    Case("bool_matrix", _with_x(lambda x: x > 0), counts="X holds True/False values"),
    Case("float_non_integer", _with_x(lambda x: np.log1p(x)), counts="X holds non-integer values"),
    Case("nan", _with_x(_set(np.nan)), counts="X holds NaN or infinite values"),
    Case("inf", _with_x(_set(np.inf)), counts="X holds NaN or infinite values"),
    Case("negative", _with_x(_set(-3)), counts="X holds negative values"),
    Case("beyond_int32", _with_x(_set(1e20)), counts="X holds values above 2,147,483,647"),
    Case("no_x_counts_in_layer", _edited(_no_x), counts="raw counts appear to be in: --layer counts"),
    # names
    Case("duplicate_genes", _edited(lambda a: _renamed(a, var_names=["G0", "G0"] + list(a.var_names[2:]))),
         train="gene names must be unique; 'G0' occurs more than once"),
    Case("duplicate_cells", _edited(lambda a: _renamed(a, obs_names=["c0", "c0", "c1"] + list(a.obs_names[3:])))),
    Case("unicode_names", _edited(lambda a: _renamed(a, var_names=UNICODE_GENES + list(a.var_names[5:]),
                                                     obs_names=[f"细胞-{i}" for i in range(N_CELLS)]))),
    # shapes and labels
    Case("empty_obs", _edited(lambda a: _renamed(ad.AnnData(X=a.X, var=a.var), obs_names=a.obs_names)), keys=(),
         simulate="obs column 'cell_type' not found; available: (none)"),
    Case("empty_obs_context_key", _edited(lambda a: _renamed(ad.AnnData(X=a.X, var=a.var), obs_names=a.obs_names)),
         train="obs column 'cell_type' not found; available: (none)",
         simulate="obs column 'cell_type' not found; available: (none)"),
    Case("missing_labels", _edited(_missing_labels), train="obs column 'cell_type' has 2 missing labels",
         simulate="cell_type value 'nan' was never seen in training"),
    Case("zero_cells", _edited(lambda a: a[:0].copy()), counts="the data has 0 cells",
         simulate="0 cells"),
    Case("zero_genes", _edited(lambda a: a[:, :0].copy()), counts="the data has 0 genes"),
    Case("one_cell_18080_genes", _one_wide_cell),
    # damaged or mislabelled files
    Case("truncated_h5ad", _truncated(_edited(lambda a: a), "half.h5ad"),
         read="the file is truncated"),
    Case("truncated_10x_h5", _truncated(_tenx, "half.h5"), read="the file is truncated"),
    Case("truncated_h5mu", _truncated(_h5mu, "half.h5mu"), read="the file is truncated"),
    Case("text_renamed_h5ad", _text_as_h5ad, read="is not an HDF5 file"),
    Case("hdf5_not_10x", _hdf5_not_10x, read="is HDF5 but not a 10x Genomics matrix"),
    Case("h5ad_renamed_h5", _h5ad_as_h5, read="it looks like an AnnData file: rename it to .h5ad"),
    Case("h5mu_without_rna", _h5mu_without_rna, read="no modality 'rna'; modalities: prot, atac"),
]

CASE_PARAMS = [pytest.param(c, id=c.name) for c in CASES]


# --- helpers -----------------------------------------------------------------------------------

def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def files(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (by relative path)."""
    if not directory.exists():
        return {}
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def corpus_file(tmp_path):
    """Build a case's file in ``tmp_path/in``; after the test, check that nothing there changed."""
    built: list[tuple[Path, dict[str, str]]] = []

    def build(case: Case) -> Path:
        d = tmp_path / "in"
        d.mkdir()
        path = case.build(d)
        built.append((d, files(d)))
        return path

    yield build
    for d, before in built:
        assert files(d) == before, "the input file (or its folder) was changed"


def check_outcome(result, error: str | None, outputs: Path) -> None:
    """Success, or exit 1 with exactly one ``error:`` line holding ``error`` and nothing in ``outputs``."""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if error is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and error in lines[0], result.stderr
    assert result.stdout == ""
    assert files(outputs) == {}, "a failed command left output behind"


# --- readers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_PARAMS)
def test_readers(case, corpus_file):
    path = corpus_file(case)
    if case.read:
        with pytest.raises(LingshuError) as err:
            read_cells(path)
        assert case.read in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
        return
    adata = read_cells(path)
    assert adata.obs_names.is_unique
    if case.counts:
        with pytest.raises(LingshuError) as err:
            counts_matrix(adata)
        assert case.counts in str(err.value) and "\n" not in str(err.value)
    else:
        x = counts_matrix(adata)
        assert sp.isspmatrix_csr(x) and x.dtype == np.float32 and x.shape == adata.shape
        raw = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
        np.testing.assert_array_equal(x.toarray(), raw)
    if case.train_error:
        with pytest.raises(LingshuError) as err:
            LingshuModel(adata, context_keys=list(case.keys), preset="tiny")
        assert case.train_error in str(err.value) and "\n" not in str(err.value)
    else:
        model = LingshuModel(adata, context_keys=list(case.keys), preset="tiny")
        assert model.genes == [str(g) for g in adata.var_names]


# --- the command line --------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_PARAMS)
def test_info(case, corpus_file):
    path = corpus_file(case)
    result = run("info", "--json", path)
    check_outcome(result, case.read, path.parent.parent / "out")
    if case.read is None:
        report = json.loads(result.stdout)
        adata = read_cells(path)
        assert (report["n_cells"], report["n_genes"]) == adata.shape
        if report["X"] is not None:
            assert report["X"]["integer_counts"] is case.x_holds_counts, report["X"]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_train(case, corpus_file, tmp_path):
    path = corpus_file(case)
    out = tmp_path / "out" / "run"
    keys = [a for k in case.keys for a in ("--context-key", k)]
    result = run("train", "--in", path, "--out", out, *keys, "--preset", "tiny", "--max-steps", "2",
                 "--batch-size", "8", "--device", "cpu", "--quiet")
    check_outcome(result, case.train_error, tmp_path / "out")
    if case.train_error is None:
        model = LingshuModel.load(out)
        assert model.genes == [str(g) for g in read_cells(path).var_names]
        assert model.context_keys == list(case.keys)
        assert model.history["step"] == 2


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_simulate_in(case, corpus_file, tmp_path, model_dir):
    path = corpus_file(case)
    out = tmp_path / "out" / "sim.h5ad"
    result = run("simulate", "--in", path, "--perturb", "stim", "--model", model_dir, "--out", out,
                 "--steps", "2", "--device", "cpu", "--quiet")
    check_outcome(result, case.simulate_error, tmp_path / "out")
    if case.simulate_error is None:
        assert list(files(tmp_path / "out")) == ["sim.h5ad"]  # no temporary file beside it
        source = read_cells(path)
        sim = ad.read_h5ad(out)
        assert sim.n_obs == source.n_obs and list(sim.var_names) == LingshuModel.load(model_dir).genes
        # every simulated cell points at exactly one input cell, in input order
        assert list(sim.obs["source_cell"]) == list(source.obs_names) and source.obs_names.is_unique
        assert set(sim.obs["condition"].astype(str)) == {"stim"}
        assert sim.X.min() >= 0 and np.all(sim.X.data == np.round(sim.X.data))


# --- decisions, in detail ----------------------------------------------------------------------

def test_duplicate_cell_names_are_made_unique_with_a_warning(tmp_path, model_dir):
    adata = make_counts(N_CELLS, N_GENES)
    adata.obs_names = ["AAAC-1"] * 3 + list(adata.obs_names[3:])
    path = _write_h5ad(adata, tmp_path / "dups.h5ad")
    out = tmp_path / "sim.h5ad"
    result = run("simulate", "--in", path, "--perturb", "stim", "--model", model_dir, "--out", out,
                 "--n-per-cell", "2", "--steps", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "duplicated cell name" in result.stderr and "AAAC-1" in result.stderr
    sim = ad.read_h5ad(out)
    assert list(sim.obs["source_cell"][:6]) == ["AAAC-1", "AAAC-1", "AAAC-1-1", "AAAC-1-1", "AAAC-1-2", "AAAC-1-2"]
    # the source cell's label survives: cell i of the input is simulated as cells 2i, 2i+1
    np.testing.assert_array_equal(sim.obs["cell_type"].astype(str), np.repeat(adata.obs["cell_type"].astype(str), 2))


@pytest.mark.parametrize("suffix", [".h5ad", ".h5mu"])
def test_unicode_gene_names_round_trip_through_train_and_simulate(tmp_path, suffix):
    adata = make_counts(N_CELLS, N_GENES)
    genes = UNICODE_GENES + [f"基因{j}" for j in range(5, N_GENES)]
    adata.var_names = genes
    adata.obs_names = [f"细胞-{i}" for i in range(N_CELLS)]
    path = _write_h5ad(adata, tmp_path / "unicode.h5ad")
    run_dir = tmp_path / "run"
    trained = run("train", "--in", path, "--out", run_dir, "--context-key", "cell_type", "--perturbation-key",
                  "condition", "--control", "control", "--max-steps", "2", "--batch-size", "8",
                  "--device", "cpu", "--quiet")
    assert trained.exit_code == 0, trained.output
    out = tmp_path / f"sim{suffix}"
    result = run("simulate", "--in", path, "--perturb", "stim", "--model", run_dir, "--out", out,
                 "--steps", "2", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    sim = read_cells(out)
    assert list(sim.var_names) == genes
    assert list(sim.obs["source_cell"]) == list(adata.obs_names)


def test_one_cell_with_18080_genes_trains_and_generates(tmp_path):
    """A single cell is a legitimate (if useless) training set: it trains and generates full-width cells."""
    (tmp_path / "in").mkdir()
    path = _one_wide_cell(tmp_path / "in")
    run_dir = tmp_path / "run"
    trained = run("train", "--in", path, "--out", run_dir, "--context-key", "cell_type", "--max-steps", "2",
                  "--device", "cpu", "--quiet")
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "gen.h5ad"
    result = run("simulate", "--model", run_dir, "--n-cells", "2", "--condition", "cell_type=A",
                 "--out", out, "--steps", "2", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    gen = ad.read_h5ad(out)
    assert gen.shape == (2, 18_080) and list(gen.var_names) == [f"gene{j}" for j in range(18_080)]
    assert list(gen.obs["cell_type"].astype(str)) == ["A", "A"]


def test_model_without_context_keys_generates_the_cells_asked_for(tmp_path):
    adata = make_counts(N_CELLS, N_GENES)
    path = _write_h5ad(ad.AnnData(X=adata.X, var=adata.var), tmp_path / "no_obs.h5ad")
    run_dir = tmp_path / "run"
    trained = run("train", "--in", path, "--out", run_dir, "--max-steps", "2", "--device", "cpu", "--quiet")
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "gen.h5ad"
    result = run("simulate", "--model", run_dir, "--n-cells", "3", "--out", out, "--steps", "2",
                 "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert ad.read_h5ad(out).shape == (3, N_GENES)


def test_real_process_prints_one_error_line(corpus_file, tmp_path):
    """``python -m cli.main`` as a user runs it: exit 1, one error line, no traceback."""
    case = next(c for c in CASES if c.name == "text_matrix")  # a traceback before the fix
    path = corpus_file(case)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "train", "--in", str(path), "--out",
                           str(tmp_path / "out"), "--max-steps", "2", "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and "Warning:" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {case.train_error}"), proc.stderr
    assert "not raw counts" in lines[0] and "--layer" in lines[0]
    assert not (tmp_path / "out").exists()


def test_duplicated_names_give_one_warning_line_not_anndatas(tmp_path):
    adata = make_counts(N_CELLS, N_GENES)
    adata.var_names = ["G0", "G0"] + list(adata.var_names[2:])
    path = _write_h5ad(adata, tmp_path / "dups.h5ad")
    with recorded_logs("lingshu.io", logging.WARNING) as records, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_cells(path)
    assert not [w for w in caught if "not unique" in str(w.message)]  # anndata's multi-line notice
    assert [r.getMessage() for r in records] == [
        f"{path} has 1 duplicated gene name(s) (e.g. G0); training needs unique names (adata.var_names_make_unique())"]
