"""Benchmarks. Run each from the repository root as a module (``python -m bench.throughput ...``): they
import each other and the test data builders of tests/ (tests/synthetic.py, tests/curation_data.py,
tests/s3proxy.py) as packages, with no edit of ``sys.path``."""
