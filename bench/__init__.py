"""Microbenchmarks for vlmkernels: ``python -m bench`` (``make bench``). See bench/harness.py."""
