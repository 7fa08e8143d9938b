library(testthat)
library(lingshu)

test_check("lingshu")
