"""Verification: grading types, the grader table, the worker pool, pass@k metrics."""
