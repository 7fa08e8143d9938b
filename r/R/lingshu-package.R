#' lingshu: simulate perturbed single cells from Seurat
#'
#' The R interface to Lingshu, a masked discrete diffusion model of single-cell UMI counts.
#' [lingshu_train()] fits a model to a Seurat object, [lingshu_simulate()] perturbs cells,
#' [lingshu_generate()] draws new cells, [lingshu_load_model()] / [lingshu_save_model()]
#' share models with Python and the `lingshu` command line.
#'
#' The model runs in Python: the package calls the `lingshu` Python package through
#' reticulate, in the interpreter named by `RETICULATE_PYTHON` or else the `python3` on the
#' `PATH` (see [lingshu_python()], [lingshu_available()]). Counts cross as sparse-matrix
#' components (raw vectors), never as NumPy arrays, so reticulate's NumPy version does not
#' matter.
#'
#' Options:
#' * `lingshu.threads`: if set (e.g. `options(lingshu.threads = 1)`) before the first
#'   lingshu call, the number of CPU threads torch may use.
#' * `lingshu.deepbind` (default `TRUE`, Linux only): import torch with `RTLD_DEEPBIND`, so
#'   that its matrix products use torch's own BLAS instead of the BLAS R has loaded (on
#'   Debian R's reference BLAS makes torch about 20 times slower).
#'
#' Feature names: Seurat does not allow `_` or `|` in feature names and replaces them with
#' `-`. Objects returned here get that rewrite explicitly, keep the original names in the
#' feature metadata column `original_name`, and [lingshu_simulate()] maps rewritten names
#' back to the model's genes.
#'
#' @keywords internal
#' @importClassesFrom Matrix dgCMatrix
"_PACKAGE"
