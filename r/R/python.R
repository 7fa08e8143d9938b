# Finding the Python that has the lingshu engine, and calling it with R errors.

.lingshu <- new.env(parent = emptyenv())

#' Which Python interpreter lingshu uses
#'
#' `RETICULATE_PYTHON` if set, otherwise the `python3` on the `PATH`. Wrappers such
#' as pyenv shims are resolved to the real interpreter (its `sys.executable`), so that
#' reticulate loads the same Python, and the same NumPy, that `pip install lingshu` used.
#' Once reticulate has started Python in this R session, that interpreter is reported.
#'
#' @return The path to the interpreter, or `""` when none is found.
#' @examples
#' lingshu_python()
#' @export
lingshu_python <- function() {
  if (reticulate::py_available(initialize = FALSE)) {
    return(reticulate::py_config()$python)
  }
  py <- Sys.getenv("RETICULATE_PYTHON", unset = "")
  if (!nzchar(py)) py <- unname(Sys.which("python3"))
  if (!nzchar(py)) return("")
  real <- tryCatch(
    suppressWarnings(.system_python(py, c("-c", shQuote("import sys; print(sys.executable)")),
                                    stdout = TRUE, stderr = FALSE)),
    error = function(e) character()
  )
  if (length(real) == 1L && nzchar(real) && file.exists(real)) real else py
}

# Run a Python interpreter in a child process. R puts its own library directories (which
# may hold the system's libpython) on LD_LIBRARY_PATH; a Python built with a shared
# libpython (pyenv, conda) would then load the wrong one and miss its site-packages, so the
# interpreter's own lib/ goes first.
.system_python <- function(py, args, ...) {
  old <- Sys.getenv("LD_LIBRARY_PATH", unset = NA)
  on.exit(if (is.na(old)) Sys.unsetenv("LD_LIBRARY_PATH") else Sys.setenv(LD_LIBRARY_PATH = old))
  libdir <- file.path(dirname(dirname(py)), "lib")
  Sys.setenv(LD_LIBRARY_PATH = paste(c(libdir, if (!is.na(old) && nzchar(old)) old), collapse = ":"))
  system2(py, args, ...)
}

#' Is the Python engine available?
#'
#' `lingshu_available()` checks, without raising an error, that a Python interpreter is
#' found and that it can import the `lingshu` package. `lingshu_install_hint()` says how
#' to fix it when it cannot.
#'
#' @return `lingshu_available()`: `TRUE` or `FALSE`. `lingshu_install_hint()`: a message (string).
#' @examples
#' if (!lingshu_available()) message(lingshu_install_hint())
#' @export
lingshu_available <- function() {
  status <- tryCatch({
    .use_python()
    .import_engine()
  }, error = function(e) conditionMessage(e))
  identical(status, "")
}

#' @rdname lingshu_available
#' @export
lingshu_install_hint <- function() {
  py <- lingshu_python()
  why <- if (!is.null(.lingshu$import_error)) paste0(" (", .lingshu$import_error, ")") else ""
  where <- if (nzchar(py)) paste0("the Python at ", py, why) else "no python3 on the PATH"
  paste0(
    "the Python package 'lingshu' is not available (", where, "). Install it into that Python ",
    "with `", if (nzchar(py)) py else "python3", " -m pip install lingshu` (or `pip install -e <repo>`), ",
    "or point R at a Python that has it: Sys.setenv(RETICULATE_PYTHON = '/path/to/python') ",
    "before the first lingshu call (restart R if Python was already started)."
  )
}

.use_python <- function() {
  if (reticulate::py_available(initialize = FALSE)) return(invisible(reticulate::py_config()$python))
  py <- lingshu_python()
  if (!nzchar(py)) stop(lingshu_install_hint(), call. = FALSE)
  # reticulate warns about a pyproject.toml in the working directory (e.g. lingshu's own
  # repository) that it would manage with Poetry; the interpreter is chosen explicitly here.
  withCallingHandlers({
    reticulate::use_python(py, required = TRUE)
    reticulate::py_available(initialize = TRUE)
  }, warning = function(w) if (grepl("Poetry", conditionMessage(w))) invokeRestart("muffleWarning"))
  invisible(py)
}

# The Python module lingshu.r, imported once; options(lingshu.threads = n) sets torch's threads.
.bridge <- function() {
  if (!is.null(.lingshu$bridge)) return(.lingshu$bridge)
  .use_python()
  if (nzchar(.import_engine())) stop(lingshu_install_hint(), call. = FALSE)
  .lingshu$bridge <- .py_try(reticulate::import("lingshu.r"))
  .lingshu$io <- reticulate::import("lingshu.io")
  threads <- getOption("lingshu.threads")
  if (!is.null(threads)) reticulate::import("torch")$set_num_threads(as.integer(threads))
  .lingshu$bridge
}

# Import the engine; returns "" or why it failed (also kept for lingshu_install_hint()).
#
# * The working directory is left off sys.path for the import: a folder named 'lingshu' there
#   (R CMD check's lingshu.Rcheck/lingshu, an R project called lingshu) would otherwise be
#   imported as an empty namespace package instead of the installed engine.
# * torch is imported with RTLD_DEEPBIND (Linux) so that its own BLAS serves its matrix
#   products. R has already loaded the system BLAS (libblas.so.3); torch's libtorch_cpu
#   exports the same Fortran symbols (sgemm_, ...) and, loaded normally, binds to R's copy --
#   on Debian the reference BLAS, about 20 times slower than torch's MKL.
#   options(lingshu.deepbind = FALSE) turns this off.
.import_engine <- function() {
  deepbind <- isTRUE(getOption("lingshu.deepbind", TRUE)) && Sys.info()[["sysname"]] == "Linux"
  code <- paste(
    "def _import_engine(deepbind):",
    "    import os, sys",
    "    saved, flags = list(sys.path), sys.getdlopenflags()",
    "    sys.path[:] = [p for p in sys.path if p not in ('', '.', os.getcwd())]",
    "    mod = sys.modules.get('lingshu')",
    "    if mod is not None and getattr(mod, '__file__', None) is None:",
    "        for k in [k for k in sys.modules if k == 'lingshu' or k.startswith('lingshu.')]:",
    "            del sys.modules[k]",
    "    try:",
    "        if deepbind and 'torch' not in sys.modules and hasattr(os, 'RTLD_DEEPBIND'):",
    "            sys.setdlopenflags(flags | os.RTLD_DEEPBIND)",
    "            try:",
    "                import torch",
    "            except ImportError:",
    "                pass",
    "            sys.setdlopenflags(flags)",
    "        import lingshu.r, lingshu.io",
    "        return ''",
    "    except Exception as e:",
    "        return f'{type(e).__name__}: {e}'",
    "    finally:",
    "        sys.setdlopenflags(flags)",
    "        sys.path[:] = saved",
    sprintf("status = _import_engine(%s)", if (deepbind) "True" else "False"),
    sep = "\n")
  status <- reticulate::py_run_string(code, local = TRUE)$status
  .lingshu$import_error <- if (nzchar(status)) status else NULL
  status
}

# Evaluate `expr` (Python calls); a Python exception becomes an R error of class
# "lingshu_error" whose message is the Python message (prefixed with the exception type
# unless it is Lingshu's own LingshuError).
.py_try <- function(expr) {
  reticulate::py_clear_last_error()
  tryCatch(expr, error = function(e) {
    err <- reticulate::py_last_error()
    if (is.null(err)) stop(e)
    msg <- if (identical(err$type, "LingshuError")) err$value else paste0(err$type, ": ", err$value)
    stop(structure(class = c("lingshu_error", "error", "condition"),
                   list(message = msg, call = NULL, python_traceback = err$traceback)))
  })
}

# R values -> Python arguments: integers stay integers, length-1 vectors lists where needed.
# A whole number as a Python int; anything else (2.5, NA, a number past R's integer range) goes as
# it is, so the engine refuses it with its own message or takes a large seed whole, instead of
# as.integer() truncating 2.5 to 2 or turning 2^40 into NA.
.py_int <- function(x) {
  if (is.null(x)) return(NULL)
  whole <- is.numeric(x) && length(x) == 1L && !is.na(x) && is.finite(x) && x == round(x) &&
    abs(x) <= .Machine$integer.max
  if (whole) as.integer(x) else x
}
.chr <- function(x) as.character(unlist(x))
