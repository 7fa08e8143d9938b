# Run the R code chunks of an R Markdown file without knitr (for machines without
# rmarkdown/pandoc): ```{r ...} blocks are evaluated in order in one environment; chunks
# with eval = FALSE are skipped. If a chunk leaves `have_data` FALSE (the vignette's
# "no data or no engine" switch) the remaining chunks are skipped and the run succeeds.
#
# Usage: Rscript run-chunks.R vignette.Rmd
args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 1L) stop("usage: Rscript run-chunks.R file.Rmd")
lines <- readLines(args[1], warn = FALSE)
starts <- grep("^```\\{r[ ,}]", lines)
env <- new.env(parent = globalenv())
graphics_file <- tempfile(fileext = ".pdf")
grDevices::pdf(graphics_file)
for (s in starts) {
  header <- lines[s]
  ends <- which(grepl("^```\\s*$", lines) & seq_along(lines) > s)
  if (!length(ends)) stop("chunk at line ", s, " is not closed")
  code <- lines[seq_len(ends[1] - s - 1L) + s]
  if (grepl("eval\\s*=\\s*(FALSE|F)\\b", header)) next
  cat(sprintf("## chunk at line %d: %s\n", s, header))
  exprs <- parse(text = code, keep.source = FALSE)
  for (e in exprs) {
    value <- withVisible(eval(e, envir = env))
    if (value$visible && !is.null(value$value)) print(value$value)
  }
  if (exists("have_data", envir = env, inherits = FALSE) && !isTRUE(get("have_data", envir = env))) {
    cat("## have_data is FALSE: skipping the remaining chunks\n")
    break
  }
}
invisible(grDevices::dev.off())
cat("## done\n")
