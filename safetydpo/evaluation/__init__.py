"""Evaluation: Inappropriate Probability and quality of a model and its baselines on a benchmark.

:mod:`benchmarks` reads prompt sources, :mod:`classifiers` scores images (Q16, NudeNet, the toy
detector, CLIP score), :mod:`metrics` turns per-image scores into metrics, :mod:`report` puts models
side by side, and :mod:`run` drives it all on Ray Data (``run(config, model, benchmark)``).
"""
