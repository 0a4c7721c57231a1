"""Benchmarks of the worker and the training loop; ``python -m bench`` writes docs/benchmarks.md."""
