# Shared fixtures: a small Seurat object with real structure and one tiny model per session.
# Every test that needs Python calls skip_if_no_lingshu() first, so the suite skips with a
# message (instead of failing) where the Python engine is not installed.

Sys.setenv(OMP_NUM_THREADS = "1", MKL_NUM_THREADS = "1")
options(lingshu.threads = 1)  # tiny models: one torch thread is fastest on a shared CPU

skip_if_no_lingshu <- function() {
  if (!lingshu_available()) skip(paste("Python engine not available:", lingshu_install_hint()))
}

# Poisson counts of two cell types x control/stim: type B raises genes 1-10 four-fold, stim
# raises genes 11-20 five-fold. Gene names are Seurat-safe; 'donor' is an extra column that
# must be carried over to simulated cells.
make_seurat <- function(n_cells = 80, n_genes = 40, seed = 1) {
  set.seed(seed)
  cell_type <- rep(c("A", "B"), length.out = n_cells)
  condition <- rep(c("control", "stim"), each = n_cells / 2)
  mean <- matrix(rgamma(n_genes, 2, 1), n_genes, n_cells)
  mean[1:10, cell_type == "B"] <- mean[1:10, cell_type == "B"] * 4
  mean[11:20, condition == "stim"] <- mean[11:20, condition == "stim"] * 5
  counts <- matrix(rpois(length(mean), mean), n_genes, n_cells,
                   dimnames = list(paste0("G", seq_len(n_genes)), paste0("cell", seq_len(n_cells))))
  obj <- SeuratObject::CreateSeuratObject(counts = methods::as(counts, "CsparseMatrix"))
  obj$cell_type <- factor(cell_type)
  obj$condition <- condition
  obj$donor <- rep(c("d1", "d2", "d3", "d4"), length.out = n_cells)
  obj
}

.fixtures <- new.env()

# A tiny model trained once (30 steps) and saved, shared by the test files.
fixture_model <- function() {
  if (is.null(.fixtures$model)) {
    dir <- file.path(tempdir(), "lingshu-test-model")
    unlink(dir, recursive = TRUE)
    .fixtures$model <- lingshu_train(make_seurat(), context_keys = "cell_type", perturbation_key = "condition",
                                     control = "control", max_steps = 30, device = "cpu", seed = 0,
                                     out_dir = dir)
    .fixtures$dir <- dir
  }
  .fixtures$model
}

fixture_model_dir <- function() {
  fixture_model()
  .fixtures$dir
}

control_cells <- function() {
  obj <- make_seurat()
  obj[, obj$condition == "control"]
}

counts_of <- function(obj) SeuratObject::GetAssayData(obj, slot = "counts")
