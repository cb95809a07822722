"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.tasks.datasets import (
    BENCHMARKS,
    DATA_DIR_ENV,
    HubSource,
    load_examples,
    load_hub_rows,
    read_records,
    records_to_examples,
    resolve_data_dir,
    select_examples,
)

__all__ = [
    "BENCHMARKS",
    "DATA_DIR_ENV",
    "HubSource",
    "load_examples",
    "load_hub_rows",
    "read_records",
    "records_to_examples",
    "resolve_data_dir",
    "select_examples",
]
