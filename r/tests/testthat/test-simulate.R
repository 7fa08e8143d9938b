test_that("a Seurat object in gives a Seurat object of integer counts out, metadata carried over", {
  skip_if_no_lingshu()
  ctrl <- control_cells()
  sim <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), device = "cpu")
  expect_s4_class(sim, "Seurat")
  expect_equal(class(sim)[1], "Seurat")
  expect_equal(ncol(sim), ncol(ctrl))
  expect_equal(rownames(sim), rownames(ctrl))
  x <- counts_of(sim)
  expect_s4_class(x, "dgCMatrix")
  expect_true(all(x@x == round(x@x)) && all(x@x > 0))
  expect_gt(sum(x), 0)
  # each simulated cell carries its source cell's metadata, with the new perturbation
  src <- match(sim$source_cell, colnames(ctrl))
  expect_false(anyNA(src))
  expect_equal(as.character(sim$cell_type), as.character(ctrl$cell_type[src]))
  expect_equal(unname(sim$donor), unname(ctrl$donor[src]))
  expect_true(all(sim$condition == "stim"))
  expect_equal(unname(sim$nCount_RNA), unname(Matrix::colSums(x)))
  expect_equal(SeuratObject::Misc(sim, "lingshu")$seed, 0)
})

test_that("n_per_cell and several perturbations multiply the cells", {
  skip_if_no_lingshu()
  ctrl <- control_cells()[, 1:10]
  sim <- lingshu_simulate(ctrl, perturb = c("stim", "control"), model = fixture_model(), n_per_cell = 2,
                          steps = 2, device = "cpu")
  expect_equal(ncol(sim), 40)
  expect_equal(as.vector(table(sim$condition)[c("control", "stim")]), c(20, 20))
  expect_equal(as.vector(table(sim$source_cell)), rep(4, 10))
})

test_that("composed guidance reaches Python and is recorded; a misspelt reference is refused", {
  skip_if_no_lingshu()
  ctrl <- control_cells()[, 1:10]
  sim <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), guidance = 0,
                          guidance_reference = "composed", steps = 2, device = "cpu")
  expect_equal(ncol(sim), 10)
  expect_equal(SeuratObject::Misc(sim, "lingshu")$guidance_reference, "composed")
  near <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), guidance = 0,
                           guidance_reference = "composed", neighbours = 1, min_similarity = 0.3, steps = 2,
                           device = "cpu")
  expect_equal(SeuratObject::Misc(near, "lingshu")$neighbours, 1L)
  expect_equal(SeuratObject::Misc(near, "lingshu")$min_similarity, 0.3)
  mixed <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), guidance = 0,
                            guidance_reference = "composed", neighbours = 1, global_weight = 0.25, steps = 2,
                            device = "cpu")
  expect_equal(SeuratObject::Misc(mixed, "lingshu")$global_weight, 0.25)
  expect_error(lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), guidance_reference = "composed",
                                neighbours = 1, global_weight = 2), "global_weight")
  expect_error(lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), neighbours = 1),
               "neighbours")
  expect_error(lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), guidance_reference = "ctrl"),
               "should be one of")
})

test_that("gated guidance reaches Python and is recorded; a negative gate is refused", {
  skip_if_no_lingshu()
  ctrl <- control_cells()[, 1:10]
  sim <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), guidance_gate = 0.05, steps = 2,
                          device = "cpu")
  expect_equal(SeuratObject::Misc(sim, "lingshu")$guidance_gate, 0.05)
  expect_error(lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), guidance_gate = -1, steps = 2,
                                device = "cpu"), "guidance_gate must be a finite number >= 0")
})

test_that("the same seed gives the same cells; another seed other cells", {
  skip_if_no_lingshu()
  ctrl <- control_cells()
  a <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), seed = 3, device = "cpu")
  b <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), seed = 3, device = "cpu")
  c <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), seed = 4, device = "cpu")
  expect_identical(counts_of(a), counts_of(b))
  expect_false(identical(counts_of(a), counts_of(c)))
})

test_that("R gives exactly the counts of the Python API for the same model, cells and seed", {
  skip_if_no_lingshu()
  ctrl <- control_cells()
  sim <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), seed = 7, guidance = 1.5,
                          device = "cpu")
  # hand the same cells to a separate Python process as files, not through the bridge
  dir <- tempfile("lingshu-py-")
  dir.create(dir)
  Matrix::writeMM(counts_of(ctrl), file.path(dir, "counts.mtx"))
  utils::write.csv(data.frame(cell = colnames(ctrl), cell_type = as.character(ctrl$cell_type)),
                   file.path(dir, "obs.csv"), row.names = FALSE)
  writeLines(rownames(ctrl), file.path(dir, "genes.txt"))
  script <- file.path(dir, "predict.py")
  writeLines(c(
    "import sys, anndata as ad, pandas as pd, scipy.io, scipy.sparse as sp, torch",
    "torch.set_num_threads(1)",
    "from lingshu import LingshuModel",
    "model_dir, d = sys.argv[1], sys.argv[2]",
    "obs = pd.read_csv(f'{d}/obs.csv', index_col='cell')",
    "genes = open(f'{d}/genes.txt').read().split()",
    "x = sp.csr_matrix(scipy.io.mmread(f'{d}/counts.mtx').T)",
    "cells = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))",
    "sim = LingshuModel.load(model_dir).predict(cells, ['stim'], guidance_scale=1.5, seed=7, device='cpu')",
    "scipy.io.mmwrite(f'{d}/sim.mtx', sp.csr_matrix(sim.X.T))",
    "sim.obs[['source_cell']].to_csv(f'{d}/sim_obs.csv')"
  ), script)
  status <- lingshu:::.system_python(lingshu_python(), c(script, fixture_model_dir(), dir))
  expect_equal(status, 0)
  py_counts <- methods::as(Matrix::readMM(file.path(dir, "sim.mtx")), "CsparseMatrix")
  py_obs <- utils::read.csv(file.path(dir, "sim_obs.csv"))
  expect_equal(unname(sim$source_cell), py_obs$source_cell)
  expect_equal(unname(as.matrix(counts_of(sim))), as.matrix(py_counts))
})

test_that("generate draws cells of the requested label", {
  skip_if_no_lingshu()
  g <- lingshu_generate(fixture_model(), 12, condition = c(cell_type = "B"), steps = 4, seed = 1,
                        device = "cpu")
  expect_s4_class(g, "Seurat")
  expect_equal(ncol(g), 12)
  expect_true(all(g$cell_type == "B"))
  expect_true(all(g$condition %in% c("control", "stim")))
  x <- counts_of(g)
  expect_true(all(x@x == round(x@x)))
})

test_that("a saved and loaded model simulates the same cells", {
  skip_if_no_lingshu()
  m2 <- lingshu_load_model(fixture_model_dir())
  expect_s3_class(m2, "lingshu_model")
  expect_output(print(m2), "perturbation 'condition'")
  ctrl <- control_cells()[, 1:8]
  a <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), seed = 2, device = "cpu")
  b <- lingshu_simulate(ctrl, perturb = "stim", model = m2, seed = 2, device = "cpu")
  expect_identical(counts_of(a), counts_of(b))
})

test_that("prior injection fixes the named genes in every simulated or generated cell", {
  skip_if_no_lingshu()
  ctrl <- control_cells()[, 1:10]
  sim <- lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), prior = c(G12 = 0, G3 = 5),
                          steps = 2, device = "cpu")
  x <- counts_of(sim)
  expect_true(all(x["G12", ] == 0) && all(x["G3", ] == 5))
  expect_equal(sort(unlist(SeuratObject::Misc(sim, "lingshu")$prior_genes)), c("G12", "G3"))
  gen <- lingshu_generate(fixture_model(), 6, prior = list(G1 = 2), steps = 2, device = "cpu")
  expect_true(all(counts_of(gen)["G1", ] == 2))
  expect_error(lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), prior = c(0)), "named by gene")
  expect_error(lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), prior = c(G1 = 1.5)),
               "whole numbers")
  expect_error(lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), prior = c(IL6 = 0), device = "cpu"),
               "prior gene 'IL6' was never seen", class = "lingshu_error")
})

test_that("quantile coupling carries control cells to their own condition unchanged", {
  skip_if_no_lingshu()
  ctrl <- control_cells()[, 1:10]
  same <- lingshu_simulate(ctrl, perturb = "control", model = fixture_model(), guidance = 0, mask_fraction = 1,
                           coupling = "quantile", device = "cpu")
  expect_equal(as.matrix(counts_of(same)), as.matrix(counts_of(ctrl)), ignore_attr = TRUE)
  expect_equal(SeuratObject::Misc(same, "lingshu")$coupling, "quantile")
  expect_error(lingshu_simulate(ctrl, perturb = "stim", model = fixture_model(), coupling = "quantile"),
               "needs mask_fraction")
})

test_that("cell_states reaches the engine and a state-conditioned model generates Seurat cells", {
  skip_if_no_lingshu()
  m <- lingshu_train(make_seurat(), context_keys = "cell_type", cell_states = 3, max_steps = 3,
                     device = "cpu", seed = 0)
  expect_equal(m$py$model_config$cell_states, 3L)
  g <- lingshu_generate(m, 6, condition = c(cell_type = "A"), steps = 2, seed = 0, device = "cpu")
  expect_s4_class(g, "Seurat")
  expect_equal(ncol(g), 6)
  expect_true(all(g$cell_type == "A"))
})
