"""Benchmarks shipped with the package (`dfa-kernels bench`); scripts in benchmarks/ call these."""
