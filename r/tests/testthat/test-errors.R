test_that("an unknown perturbation is an R error carrying the Python message", {
  skip_if_no_lingshu()
  err <- expect_error(lingshu_simulate(control_cells(), perturb = "IL6", model = fixture_model()),
                      "perturbation 'IL6' was never seen in training; known: control, stim",
                      class = "lingshu_error", fixed = TRUE)
  expect_null(err$call)
})

test_that("log-normalised data is refused with the engine's explanation", {
  skip_if_no_lingshu()
  obj <- make_seurat()
  counts <- counts_of(obj)
  counts@x <- log1p(counts@x)
  bad <- SeuratObject::CreateSeuratObject(counts = counts, meta.data = obj[[]][, c("cell_type", "condition")])
  expect_error(lingshu_train(bad, context_keys = "cell_type", max_steps = 1, device = "cpu"),
               "non-integer values, not raw counts", class = "lingshu_error")
})

test_that("input problems are caught in R with a clear message", {
  skip_if_no_lingshu()
  obj <- make_seurat()
  expect_error(lingshu_train(obj, context_keys = "celltype", max_steps = 1), "metadata column 'celltype' not found")
  expect_error(lingshu_train(obj@meta.data, context_keys = "cell_type"), "Seurat object or a SingleCellExperiment")
  expect_error(lingshu_train(obj, context_keys = "cell_type", assay = "ADT"), "assay 'ADT' not found")
  expect_error(lingshu_train(obj, context_keys = "cell_type", perturbation_key = "condition", control = "ctrl",
                             max_steps = 1, device = "cpu"),
               "control label in 'condition' 'ctrl' was never seen", class = "lingshu_error")
  expect_error(lingshu_simulate(obj, perturb = "stim", model = list()), "lingshu_train")
  expect_error(lingshu_generate(fixture_model(), 3, condition = "B"), "condition must be named")
  expect_error(lingshu_generate(fixture_model(), 3, condition = c(cell_type = "C"), device = "cpu"),
               "cell_type 'C' was never seen in training", class = "lingshu_error")
  obj$cell_type[1] <- NA
  expect_error(lingshu_train(obj, context_keys = "cell_type"), "1 missing \\(NA\\) values")
})

test_that("fractional counts and steps are refused, not truncated", {
  skip_if_no_lingshu()
  expect_error(lingshu_generate(fixture_model(), 2.5, device = "cpu"), "whole number >= 0, got 2.5",
               class = "lingshu_error", fixed = TRUE)
  expect_error(lingshu_generate(fixture_model(), 3, steps = 1.5, device = "cpu"), "steps must be a whole number",
               class = "lingshu_error")
  expect_error(lingshu_simulate(control_cells(), perturb = "stim", model = fixture_model(), n_per_cell = 1.5,
                                device = "cpu"), "--n-per-cell must be a whole number", class = "lingshu_error")
  big_seed <- lingshu_generate(fixture_model(), 2, seed = 2^40, steps = 2, device = "cpu")
  expect_equal(ncol(big_seed), 2)
})
