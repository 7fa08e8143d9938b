test_that("R uses the Python (and the NumPy) where lingshu is installed", {
  skip_if_no_lingshu()
  lingshu:::.bridge()
  want <- Sys.getenv("RETICULATE_PYTHON", unset = "")
  if (!nzchar(want)) want <- unname(Sys.which("python3"))
  real <- lingshu:::.system_python(want, c("-c", shQuote("import sys; print(sys.executable)")), stdout = TRUE)
  expect_equal(normalizePath(reticulate::py_config()$python), normalizePath(real))
  np_here <- reticulate::import("numpy")$`__version__`
  np_there <- lingshu:::.system_python(real, c("-c", shQuote("import numpy; print(numpy.__version__)")), stdout = TRUE)
  expect_equal(np_here, np_there)
})

test_that("counts cross to Python and back unchanged (no NumPy conversion involved)", {
  skip_if_no_lingshu()
  obj <- make_seurat()
  cells <- lingshu:::.cells_of(obj)
  adata <- lingshu:::.to_anndata(cells, c("cell_type", "condition"))
  expect_equal(adata$n_obs, ncol(obj))
  back <- lingshu:::.from_anndata(adata)
  expect_identical(back$counts, counts_of(obj))
  expect_equal(as.character(back$meta$cell_type), as.character(obj$cell_type))
  expect_equal(back$meta$condition, unname(obj$condition))
})

test_that("gene names with '_' get Seurat's '-' deliberately and keep their original names", {
  skip_if_no_lingshu()
  obj <- make_seurat()
  cells <- lingshu:::.cells_of(obj)
  rownames(cells$counts)[1:2] <- c("HLA_A", "KIR2DL1|x")
  adata <- lingshu:::.to_anndata(cells, "cell_type")
  out <- lingshu:::.as_output(lingshu:::.from_anndata(adata))
  expect_s4_class(out, "Seurat")
  expect_equal(rownames(out)[1:3], c("HLA-A", "KIR2DL1-x", "G3"))
  expect_equal(out[["RNA"]][["original_name"]][1:2, 1], c("HLA_A", "KIR2DL1|x"))
  bridge <- lingshu:::.bridge()
  expect_equal(bridge$model_gene_names(list("HLA-A", "G3", "new"), list("G3", "HLA_A")), c("HLA_A", "G3", "new"))
  expect_error(bridge$seurat_feature_names(list("A_B", "A-B")), "would both be named")
})

test_that("a SingleCellExperiment is accepted and can be returned", {
  skip_if_no_lingshu()
  skip_if_not_installed("SingleCellExperiment")
  obj <- make_seurat()
  sce <- SingleCellExperiment::SingleCellExperiment(
    assays = list(counts = counts_of(obj)), colData = S4Vectors::DataFrame(obj[[]]))
  cells <- lingshu:::.cells_of(sce)
  expect_identical(cells$counts, counts_of(obj))
  sim <- lingshu_simulate(sce[, sce$condition == "control"], perturb = "stim", model = fixture_model(),
                          device = "cpu", as = "SingleCellExperiment")
  expect_s4_class(sim, "SingleCellExperiment")
  expect_equal(ncol(sim), 40)
  expect_true(all(sim$condition == "stim"))
})
