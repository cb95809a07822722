"""Evaluation: the resumable generate -> grade runner (runner.py), its options (options.py), which
models to score (model_spec.py), result files (output.py) and summaries (summary.py).

Grading itself lives in rlvrx.verify, datasets in rlvrx.tasks. Import the submodules directly.
"""
