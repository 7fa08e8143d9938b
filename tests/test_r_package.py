"""The R package in r/: R CMD INSTALL, its testthat suite and the Seurat vignette, run for real.

Skipped (with the reason) when R with Seurat, reticulate and testthat is not installed;
`.ci/run` installs them, so CI always runs this.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _r_ready() -> str | None:
    if shutil.which("Rscript") is None:
        return "Rscript not found (apt-get install r-base-core r-cran-seurat r-cran-reticulate r-cran-testthat)"
    probe = subprocess.run(["Rscript", "-e", "library(Seurat); library(reticulate); library(testthat)"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else "R lacks Seurat/reticulate/testthat: " + probe.stderr.strip()[-200:]


@pytest.mark.r
def test_r_package_installs_and_its_tests_and_vignette_pass():
    why = _r_ready()
    if why:
        pytest.skip(why)
    proc = subprocess.run(["bash", str(REPO / "r" / "run-tests.sh")], capture_output=True, text=True, cwd=REPO)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "FAIL 0" in proc.stdout or "[ FAIL 0" in proc.stdout, tail
