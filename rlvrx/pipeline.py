"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.cli.pipeline import check_stages, run_pipeline, stage_argv

__all__ = ["check_stages", "run_pipeline", "stage_argv"]
