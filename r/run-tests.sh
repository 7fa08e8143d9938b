#!/usr/bin/env bash
# Install the R package in r/, run its testthat tests, then the Seurat vignette.
# Exits non-zero when the install, a test or the vignette fails.
#
# Environment:
#   RETICULATE_PYTHON    Python with the lingshu package (default: python3 on the PATH)
#   LINGSHU_KANG_H5AD    kang2018_ifnb_pbmc_scgen_valid.h5ad for the vignette (default: the
#                        copy in ../shared/data beside the checkout, if present; without it the vignette is skipped)
#   LINGSHU_ALLOW_SKIP=1 let the tests skip when the Python engine is missing (default: fail)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
default_kang="$repo/../shared/data/kang2018_ifnb_pbmc_scgen_valid.h5ad"
if [[ -z "${LINGSHU_KANG_H5AD:-}" && -f "$default_kang" ]]; then export LINGSHU_KANG_H5AD="$default_kang"; fi

echo "== R CMD INSTALL $here"
R CMD INSTALL --no-multiarch "$here"

echo "== Python engine"
Rscript -e 'library(lingshu); cat("python:", lingshu_python(), "\n");
  if (!lingshu_available()) {
    msg <- lingshu_install_hint()
    if (Sys.getenv("LINGSHU_ALLOW_SKIP") == "1") message("tests will skip: ", msg) else stop(msg, call. = FALSE)
  }'

echo "== testthat"
start=$(date +%s)
(cd "$here/tests" && Rscript -e 'testthat::test_dir("testthat", package = "lingshu", load_package = "installed",
                                   reporter = testthat::ProgressReporter$new(show_praise = FALSE),
                                   stop_on_failure = TRUE, stop_on_warning = FALSE)')
echo "== testthat took $(( $(date +%s) - start )) s"

echo "== vignette"
vignette="$repo/vignettes/lingshu-seurat.Rmd"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$(date +%s)
if Rscript -e 'quit(status = !(requireNamespace("rmarkdown", quietly = TRUE) && requireNamespace("knitr", quietly = TRUE) && rmarkdown::pandoc_available("1.14")))'; then
  cp "$vignette" "$out/"
  Rscript -e "rmarkdown::render('$out/lingshu-seurat.Rmd', output_dir = '$out', quiet = TRUE, envir = new.env())"
  echo "rendered $(ls "$out"/*.html)"
else
  echo "rmarkdown/knitr/pandoc not available: running the vignette's R chunks without rendering"
  (cd "$out" && Rscript "$here/tools/run-chunks.R" "$vignette")
fi
echo "== vignette took $(( $(date +%s) - start )) s"
