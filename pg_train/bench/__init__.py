"""Benchmarks: `python -m pg_train.bench.<name>`; each prints ratios measured side by side in one run."""
