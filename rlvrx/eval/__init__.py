"""Evaluation: datasets (datasets.py), grading pool (grading.py), pass@k / avg / maj@k (metrics.py).

Kept empty on purpose: grading workers import rlvrx.eval.grading, and that must not pull in anything
heavy. Import the submodules directly.
"""
