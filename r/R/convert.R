# Seurat / SingleCellExperiment <-> the plain data that crosses to Python.
#
# reticulate 1.28 cannot convert R matrices or sparse matrices to NumPy 2 arrays (nor back),
# so nothing here relies on automatic array conversion: a dgCMatrix (genes x cells) travels
# as its slots i, p (int32) and x (float64) packed little-endian in raw vectors (bytearray in
# Python), labels as character vectors, and the dgCMatrix is rebuilt here with new().

# Counts (genes x cells dgCMatrix) and cell metadata of a Seurat object or SingleCellExperiment.
.cells_of <- function(object, assay = NULL) {
  if (inherits(object, "Seurat")) {
    assay <- if (is.null(assay)) SeuratObject::DefaultAssay(object) else assay
    if (!assay %in% SeuratObject::Assays(object)) {
      stop("assay '", assay, "' not found; available: ", paste(SeuratObject::Assays(object), collapse = ", "),
           call. = FALSE)
    }
    counts <- SeuratObject::GetAssayData(object, slot = "counts", assay = assay)  # Seurat v4 API
    meta <- object[[]]
  } else if (inherits(object, "SingleCellExperiment")) {
    have <- SummarizedExperiment::assayNames(object)
    if (!"counts" %in% have) {
      stop("the SingleCellExperiment has no 'counts' assay; available: ",
           if (length(have)) paste(have, collapse = ", ") else "(none)", call. = FALSE)
    }
    counts <- SummarizedExperiment::assay(object, "counts")
    meta <- as.data.frame(SummarizedExperiment::colData(object), optional = TRUE)
  } else {
    stop("object must be a Seurat object or a SingleCellExperiment, not ",
         paste(class(object), collapse = "/"), call. = FALSE)
  }
  if (ncol(object) == 0L) stop("the object has 0 cells", call. = FALSE)
  if (is.null(colnames(object))) stop("the object's cells have no names", call. = FALSE)
  list(counts = counts, meta = meta, cells = colnames(object))
}

.as_dgc <- function(m) {
  if (!inherits(m, "dgCMatrix")) {
    m <- methods::as(methods::as(methods::as(m, "CsparseMatrix"), "generalMatrix"), "dMatrix")
  }
  if (is.null(rownames(m))) stop("the count matrix has no gene names (rownames)", call. = FALSE)
  m
}

# The metadata columns `keys` as character vectors, with R-side checks that name the problem.
.label_columns <- function(meta, keys) {
  missing <- setdiff(keys, names(meta))
  if (length(missing)) {
    stop("metadata column '", missing[1], "' not found; available: ",
         if (ncol(meta)) paste(names(meta), collapse = ", ") else "(none)", call. = FALSE)
  }
  out <- lapply(keys, function(k) {
    v <- as.character(meta[[k]])
    if (anyNA(v)) {
      stop("metadata column '", k, "' has ", sum(is.na(v)), " missing (NA) values; ",
           "drop those cells or give them a label", call. = FALSE)
    }
    v
  })
  stats::setNames(out, keys)
}

# A Python AnnData (cells x genes) with the `keys` columns; counts only when `counts = TRUE`.
.to_anndata <- function(cells, keys, counts = TRUE, model_genes = NULL) {
  obs <- .label_columns(cells$meta, keys)
  bridge <- .bridge()
  if (!counts) {
    return(.py_try(bridge$cells_from_r(obs, as.list(cells$cells))))
  }
  m <- .as_dgc(cells$counts)
  .py_try(bridge$cells_from_r(
    obs, as.list(cells$cells), as.list(rownames(m)),
    i = writeBin(m@i, raw(), size = 4L, endian = "little"),
    p = writeBin(m@p, raw(), size = 4L, endian = "little"),
    x = writeBin(as.double(m@x), raw(), size = 8L, endian = "little"),
    model_genes = if (is.null(model_genes)) NULL else as.list(model_genes)
  ))
}

# Python AnnData -> list(counts = dgCMatrix with original gene names, features = Seurat
# names, meta = data.frame, provenance = list).
.from_anndata <- function(adata) {
  pl <- .py_try(.bridge()$cells_to_r(adata))
  n_genes <- as.integer(pl$n_genes)
  n_cells <- as.integer(pl$n_cells)
  p <- readBin(pl$p, "integer", n = n_cells + 1L, size = 4L, endian = "little")
  nnz <- p[length(p)]
  cells <- .chr(pl$cells)
  counts <- methods::new(
    "dgCMatrix",
    i = readBin(pl$i, "integer", n = nnz, size = 4L, endian = "little"), p = p,
    x = readBin(pl$x, "double", n = nnz, size = 8L, endian = "little"),
    Dim = c(n_genes, n_cells), Dimnames = list(.chr(pl$genes), cells)
  )
  meta <- data.frame(row.names = cells)
  for (k in names(pl$obs)) {
    v <- pl$obs[[k]]$values
    if (is.list(v)) v <- vapply(v, function(e) if (is.null(e)) NA_character_ else as.character(e), "")
    if (!is.null(pl$obs[[k]]$levels)) v <- factor(v, levels = .chr(pl$obs[[k]]$levels))
    meta[[k]] <- v
  }
  list(counts = counts, features = .chr(pl$features), meta = meta,
       provenance = jsonlite::fromJSON(pl$provenance))
}

# Build the returned object: a Seurat object (default) or a SingleCellExperiment.
#
# Seurat replaces '_' and '|' in feature names with '-'. The Python side does that rewrite
# itself (refusing it if two genes would collide), and the original names are kept in the
# feature metadata column `original_name`; lingshu_simulate() maps them back to the model's.
.as_output <- function(cells, as = c("Seurat", "SingleCellExperiment")) {
  as <- match.arg(as)
  meta <- cells$meta
  if (as == "SingleCellExperiment") {
    if (!requireNamespace("SingleCellExperiment", quietly = TRUE)) {
      stop("as = 'SingleCellExperiment' needs the Bioconductor package SingleCellExperiment", call. = FALSE)
    }
    sce <- SingleCellExperiment::SingleCellExperiment(
      assays = list(counts = cells$counts), colData = S4Vectors::DataFrame(meta, check.names = FALSE)
    )
    S4Vectors::metadata(sce)$lingshu <- cells$provenance
    return(sce)
  }
  counts <- cells$counts
  genes <- rownames(counts)
  rownames(counts) <- cells$features
  meta <- meta[, setdiff(names(meta), c("orig.ident", "nCount_RNA", "nFeature_RNA")), drop = FALSE]
  obj <- SeuratObject::CreateSeuratObject(counts = counts, project = "lingshu", meta.data = meta)
  obj$orig.ident <- factor(rep("lingshu", ncol(obj)))
  SeuratObject::Idents(obj) <- "orig.ident"
  obj[["RNA"]] <- SeuratObject::AddMetaData(obj[["RNA"]],
                                            data.frame(original_name = genes, row.names = cells$features))
  SeuratObject::Misc(obj, "lingshu") <- cells$provenance
  obj
}
