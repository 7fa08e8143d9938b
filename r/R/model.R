# Train, load, save and describe a Lingshu model (a Python LingshuModel held by R).

.new_model <- function(py) structure(list(py = py), class = "lingshu_model")

.check_model <- function(model) {
  if (!inherits(model, "lingshu_model")) {
    stop("model must come from lingshu_train() or lingshu_load_model(), not ",
         paste(class(model), collapse = "/"), call. = FALSE)
  }
  if (reticulate::py_is_null_xptr(model$py)) {
    stop("this model's Python object is gone (it does not survive saveRDS or a restart); ",
         "save it with lingshu_save_model() and load it with lingshu_load_model()", call. = FALSE)
  }
  model$py
}

#' Train a Lingshu model on a Seurat object
#'
#' Trains the Python engine's `LingshuModel` on the raw UMI counts of `object`
#' (the `counts` slot of the assay; `counts` assay of a SingleCellExperiment),
#' conditioned on metadata columns.
#'
#' @param object A Seurat object or a SingleCellExperiment with raw integer counts.
#' @param context_keys Metadata columns that describe cell identity (cell type, donor, ...).
#' @param perturbation_key Metadata column naming the perturbation, or `NULL`.
#' @param control The label of unperturbed cells in `perturbation_key`.
#' @param preset Model size: `"tiny"`, `"small"`, `"base"` or `"paper"`.
#' @param max_steps Optimizer steps (default: the preset's).
#' @param cell_states Condition on this many k-means states of the training cells (`0`: off;
#'   default: the preset's, off). Restores within-type variation in generated cells.
#' @param assay Seurat assay holding the counts (default: the active assay).
#' @param device `"auto"` (a GPU if there is one), `"cpu"` or `"cuda"`.
#' @param seed Seed of the model and of training: same seed, same model.
#' @param out_dir If given, the model is also saved there (see [lingshu_save_model()]).
#' @return A `lingshu_model`: a handle on the Python model (`model$py`). It does not
#'   survive `saveRDS()`; use [lingshu_save_model()].
#' @seealso [lingshu_simulate()], [lingshu_generate()], [lingshu_load_model()]
#' @examplesIf lingshu_available()
#' set.seed(1)
#' counts <- matrix(rpois(40 * 60, 2), 40, 60,
#'                  dimnames = list(paste0("G", 1:40), paste0("cell", 1:60)))
#' obj <- SeuratObject::CreateSeuratObject(counts = counts)
#' obj$cell_type <- rep(c("A", "B"), 30)
#' obj$condition <- rep(c("control", "stim"), each = 30)
#' m <- lingshu_train(obj, context_keys = "cell_type", perturbation_key = "condition",
#'                    control = "control", max_steps = 10, device = "cpu")
#' m
#' @export
lingshu_train <- function(object, context_keys = character(), perturbation_key = NULL, control = NULL,
                          preset = "tiny", max_steps = NULL, assay = NULL, device = "auto", seed = 0,
                          out_dir = NULL, cell_states = NULL) {
  cells <- .cells_of(object, assay)
  keys <- c(as.character(context_keys), as.character(perturbation_key))
  adata <- .to_anndata(cells, keys, counts = TRUE)
  py <- .py_try(.bridge()$train_from_r(
    adata, context_keys = as.list(as.character(context_keys)), perturbation_key = perturbation_key,
    control = control, preset = preset, max_steps = .py_int(max_steps), device = device,
    seed = .py_int(seed), cell_states = .py_int(cell_states), out_dir = if (is.null(out_dir)) NULL else path.expand(out_dir)
  ))
  .new_model(py)
}

#' Load and save Lingshu models
#'
#' A model directory holds `model.safetensors` and the manifest `lingshu.json`; it is the
#' same format as `lingshu train --out DIR` and `LingshuModel.save()` in Python, so models
#' move freely between R, Python and the command line.
#'
#' @param path The model directory.
#' @param device Where to put the weights: `"cpu"`, `"cuda"` or `"auto"`.
#' @return `lingshu_load_model()`: a `lingshu_model`. `lingshu_save_model()`: `path`, invisibly.
#' @examplesIf lingshu_available()
#' set.seed(1)
#' counts <- matrix(rpois(40 * 60, 2), 40, 60,
#'                  dimnames = list(paste0("G", 1:40), paste0("cell", 1:60)))
#' obj <- SeuratObject::CreateSeuratObject(counts = counts)
#' obj$cell_type <- rep(c("A", "B"), 30)
#' m <- lingshu_train(obj, context_keys = "cell_type", max_steps = 5, device = "cpu")
#' dir <- file.path(tempdir(), "lingshu-model")
#' lingshu_save_model(m, dir)
#' m2 <- lingshu_load_model(dir)
#' @export
lingshu_load_model <- function(path, device = "cpu") {
  .bridge()
  model <- reticulate::import("lingshu")$LingshuModel
  .new_model(.py_try(model$load(path.expand(path), device = device)))
}

#' @rdname lingshu_load_model
#' @param model A `lingshu_model`.
#' @export
lingshu_save_model <- function(model, path) {
  py <- .check_model(model)
  .py_try(py$save(path.expand(path)))
  invisible(path)
}

#' @export
print.lingshu_model <- function(x, ...) {
  if (reticulate::py_is_null_xptr(x$py)) {
    cat("<lingshu_model: Python object gone; reload it with lingshu_load_model()>\n")
    return(invisible(x))
  }
  py <- x$py
  cats <- py$categories
  cat("<lingshu_model> ", length(py$genes), " genes, preset '", py$preset, "'\n", sep = "")
  for (k in names(cats)) {
    labels <- .chr(cats[[k]])
    shown <- if (length(labels) > 6) c(labels[1:6], "...") else labels
    role <- if (identical(k, py$perturbation_key)) "perturbation" else "context"
    cat("  ", role, " '", k, "': ", length(labels), " labels (", paste(shown, collapse = ", "), ")\n", sep = "")
  }
  if (!is.null(py$control)) cat("  control: '", py$control, "'\n", sep = "")
  invisible(x)
}

#' Read a single-cell file into a Seurat object
#'
#' Reads `.h5ad`, 10x Genomics `.h5` or `.h5mu` with the Python engine's reader
#' (`lingshu.io.read_cells`) and returns the counts in `X` with `obs` as metadata.
#'
#' @param path The file.
#' @param as `"Seurat"` or `"SingleCellExperiment"`.
#' @return A Seurat object (or SingleCellExperiment). Gene names with `_` or `|` get
#'   Seurat's `-`; the original names are in the feature metadata column `original_name`.
#' @examplesIf lingshu_available() && file.exists(Sys.getenv("LINGSHU_KANG_H5AD"))
#' pbmc <- lingshu_read_cells(Sys.getenv("LINGSHU_KANG_H5AD"))
#' @export
lingshu_read_cells <- function(path, as = c("Seurat", "SingleCellExperiment")) {
  as <- match.arg(as)
  .bridge()
  adata <- .py_try(.lingshu$io$read_cells(path.expand(path)))
  .as_output(.from_anndata(adata), as)
}
