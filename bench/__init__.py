"""Benchmarks (scripts: ``python bench/NAME.py``) and the reproduction (a package: ``python -m bench.reproduction``)."""
