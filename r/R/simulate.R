# Simulate perturbed cells from real ones, or generate cells from labels.

#' Simulate a perturbation of the cells of a Seurat object
#'
#' For every cell of `object` and every label in `perturb`, draws `n_per_cell` cells of the
#' same context (the model's context columns, e.g. cell type) under that perturbation.
#' The R mirror of Python's `LingshuModel.predict()` and of `lingshu simulate --in --perturb`:
#' with the same model, cells, labels and seed it returns the same counts.
#'
#' @param object A Seurat object or SingleCellExperiment whose metadata hold the model's
#'   context columns (usually the control cells).
#' @param perturb Perturbation labels (of the model's `perturbation_key`) to simulate.
#' @param model A `lingshu_model` from [lingshu_train()] or [lingshu_load_model()].
#' @param n_per_cell Simulated cells per input cell and perturbation.
#' @param guidance Classifier-free guidance scale (towards the perturbation, away from control).
#' @param guidance_reference What guidance is relative to: `"control"` (the same context at the
#'   control; published), `"null"`, or `"composed"`: the context's own control plus the
#'   perturbation's effect learned across all contexts, for a context and perturbation never
#'   seen together in training (`guidance = 0` is then the product of the two, not plain
#'   conditional sampling).
#' @param guidance_gate `0` (default; published) guides every gene. A value `tau > 0` guides only
#'   the genes whose predicted mean log1p count under the perturbation differs from the
#'   reference's by more than `tau`, and draws the rest from the plain conditional (not with
#'   `"composed"`).
#' @param neighbours With `guidance_reference = "composed"`: take the perturbation's effect from
#'   the `neighbours` contexts seen with it whose control expression is most like each cell's
#'   own context, instead of from all contexts pooled (`0`, the default).
#' @param min_similarity With `neighbours`: leave out neighbour contexts, other than the nearest,
#'   whose control expression correlates with the cell's own context's below this (a Pearson
#'   correlation); the rest fill the `neighbours` slots in turn, nearest first. `NULL`
#'   (default): the nearest `neighbours` whatever their similarity.
#' @param global_weight With `neighbours`: the share `g` (0 to 1) of the effect learned across all
#'   contexts pooled in the effect used, `(1 - g)` times the neighbours' mean plus `g` times the
#'   pooled one. `NULL` (default): the neighbours alone.
#' @param seed Random seed: same seed, same cells.
#' @param steps Denoising steps.
#' @param mask_fraction `NULL` (default) samples from the labels alone. A number in (0, 1]
#'   starts from each input cell's counts and re-generates that fraction of its genes; the
#'   counts are then sent to Python (gene names are matched to the model's, undoing
#'   Seurat's `_` -> `-` rewrite).
#' @param coupling With `mask_fraction`: `"independent"` (default) draws the re-generated genes
#'   afresh; `"quantile"` carries each from its observed count's quantile under the control to
#'   the same quantile under the perturbation, keeping the input cells' co-variation.
#' @param assay Seurat assay with the counts (only used with `mask_fraction`).
#' @param prior Prior injection: a named vector of whole counts, e.g. `c(STAT1 = 0)` for a
#'   knock-out of STAT1; each named gene is fixed at its count in every simulated cell and
#'   never re-generated. `NULL` (default): none.
#' @param device `"auto"`, `"cpu"` or `"cuda"`.
#' @param as Class of the result: `"Seurat"` (default) or `"SingleCellExperiment"`.
#' @return A Seurat object of the simulated cells: raw integer counts in the `RNA` assay's
#'   `counts`; metadata copied from each cell's source cell (except `orig.ident`, which is
#'   `"lingshu"`, and `nCount_*`/`nFeature_*`, which are recomputed), the perturbation
#'   column set to the simulated label and `source_cell` naming the source cell.
#'   `Misc(result, "lingshu")` records how the cells were made (seed, steps, guidance).
#' @seealso [lingshu_train()], [lingshu_generate()]
#' @examplesIf lingshu_available()
#' set.seed(1)
#' counts <- matrix(rpois(40 * 60, 2), 40, 60,
#'                  dimnames = list(paste0("G", 1:40), paste0("cell", 1:60)))
#' obj <- SeuratObject::CreateSeuratObject(counts = counts)
#' obj$cell_type <- rep(c("A", "B"), 30)
#' obj$condition <- rep(c("control", "stim"), each = 30)
#' m <- lingshu_train(obj, context_keys = "cell_type", perturbation_key = "condition",
#'                    control = "control", max_steps = 10, device = "cpu")
#' ctrl <- subset(obj, subset = condition == "control")
#' sim <- lingshu_simulate(ctrl, perturb = "stim", model = m, device = "cpu")
#' class(sim)
#' table(sim$cell_type, sim$condition)
#' @export
lingshu_simulate <- function(object, perturb, model, n_per_cell = 1, guidance = 2,
                             guidance_reference = c("control", "null", "composed"), guidance_gate = 0,
                             neighbours = 0,
                             min_similarity = NULL, global_weight = NULL, seed = 0,
                             steps = 3, mask_fraction = NULL, coupling = c("independent", "quantile"), assay = NULL,
                             prior = NULL, device = "auto", as = c("Seurat", "SingleCellExperiment")) {
  as <- match.arg(as)
  guidance_reference <- match.arg(guidance_reference)
  coupling <- match.arg(coupling)
  if (coupling != "independent" && is.null(mask_fraction)) {
    stop("coupling = \"", coupling, "\" needs mask_fraction (it carries the input cells' own counts)", call. = FALSE)
  }
  py <- .check_model(model)
  if (is.null(py$perturbation_key)) {
    stop("this model was trained without a perturbation_key, so it cannot perturb cells; ",
         "use lingshu_generate()", call. = FALSE)
  }
  if (missing(perturb) || length(perturb) == 0L) stop("give at least one label in `perturb`", call. = FALSE)
  prior <- .prior_dict(prior)
  cells <- .cells_of(object, assay)
  adata <- .to_anndata(cells, .chr(py$context_keys), counts = !is.null(mask_fraction),
                       model_genes = .chr(py$genes))
  sim <- .py_try(py$predict(
    adata, as.list(as.character(perturb)), n_per_cell = .py_int(n_per_cell), guidance_scale = as.numeric(guidance),
    guidance_reference = guidance_reference, guidance_gate = as.numeric(guidance_gate),
    neighbours = .py_int(neighbours),
    min_similarity = if (is.null(min_similarity)) NULL else as.numeric(min_similarity),
    global_weight = if (is.null(global_weight)) NULL else as.numeric(global_weight), steps = .py_int(steps),
    seed = .py_int(seed),
    mask_fraction = if (is.null(mask_fraction)) NULL else as.numeric(mask_fraction), coupling = coupling,
    prior = prior,
    device = device, progress = FALSE
  ))
  out <- .from_anndata(sim)
  # metadata of the source cells, then the simulated perturbation and the source cell's name
  source <- as.character(out$meta$source_cell)
  meta <- cells$meta[match(source, cells$cells), , drop = FALSE]
  meta <- meta[, !grepl("^(nCount|nFeature)_", names(meta)), drop = FALSE]
  rownames(meta) <- rownames(out$meta)
  key <- py$perturbation_key
  meta[[key]] <- out$meta[[key]]
  meta$source_cell <- source
  out$meta <- meta
  .as_output(out, as)
}

#' Generate cells from labels
#'
#' Draws `n_cells` new cells. Labels fixed in `condition` are used for every cell; the
#' model's other condition columns are drawn with the frequencies of their label
#' combinations in the training data, so `lingshu_generate(m, 1000)` reproduces the
#' training cell-type proportions. The R mirror of Python's `LingshuModel.generate()`.
#'
#' @param model A `lingshu_model`.
#' @param n_cells Number of cells.
#' @param condition Named list or character vector, e.g. `c(cell_type = "B")`; `NULL` for none.
#' @param steps Denoising steps.
#' @param guidance Classifier-free guidance scale.
#' @param seed Random seed.
#' @param prior Prior injection, e.g. `c(CD3E = 0)`: genes fixed at these counts in every cell.
#' @param device `"auto"`, `"cpu"` or `"cuda"`.
#' @param as `"Seurat"` (default) or `"SingleCellExperiment"`.
#' @return A Seurat object with raw integer counts and one metadata column per condition key.
#' @examplesIf lingshu_available()
#' set.seed(1)
#' counts <- matrix(rpois(40 * 60, 2), 40, 60,
#'                  dimnames = list(paste0("G", 1:40), paste0("cell", 1:60)))
#' obj <- SeuratObject::CreateSeuratObject(counts = counts)
#' obj$cell_type <- rep(c("A", "B"), 30)
#' m <- lingshu_train(obj, context_keys = "cell_type", max_steps = 10, device = "cpu")
#' b_cells <- lingshu_generate(m, 20, condition = c(cell_type = "B"), steps = 4, device = "cpu")
#' @export
lingshu_generate <- function(model, n_cells, condition = NULL, steps = 32, guidance = 0, seed = 0,
                             prior = NULL, device = "auto", as = c("Seurat", "SingleCellExperiment")) {
  as <- match.arg(as)
  py <- .check_model(model)
  prior <- .prior_dict(prior)
  if (length(n_cells) != 1L || is.na(n_cells) || n_cells < 1) stop("n_cells must be a number >= 1", call. = FALSE)
  if (!is.null(condition) && (is.null(names(condition)) || any(!nzchar(names(condition))))) {
    stop("condition must be named, e.g. c(cell_type = \"B\")", call. = FALSE)
  }
  cond <- if (is.null(condition)) NULL else lapply(as.list(condition), as.character)
  sim <- .py_try(py$generate(
    .py_int(n_cells), cond, steps = .py_int(steps), guidance_scale = as.numeric(guidance),
    seed = .py_int(seed), prior = prior, device = device, progress = FALSE
  ))
  .as_output(.from_anndata(sim), as)
}

# c(STAT1 = 0) -> a Python dict {"STAT1": 0}; NULL stays NULL.
.prior_dict <- function(prior) {
  if (is.null(prior)) return(NULL)
  v <- unlist(prior)
  if (length(v) == 0L || is.null(names(v)) || any(!nzchar(names(v))) || anyDuplicated(names(v))) {
    stop("prior must be a vector of counts named by gene, each gene once, e.g. c(STAT1 = 0)", call. = FALSE)
  }
  if (!is.numeric(v) || anyNA(v) || any(v < 0) || any(v != round(v))) {
    stop("prior counts must be whole numbers >= 0, e.g. c(STAT1 = 0)", call. = FALSE)
  }
  reticulate::dict(stats::setNames(as.list(as.integer(v)), names(v)))
}
