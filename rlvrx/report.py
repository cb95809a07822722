"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.render.plots import save_heatmap_png, save_histogram_png, save_lines_png
from rlvrx.render.tables import fmt, pct, progress_bar, table, text_histogram, write_csv

__all__ = ["fmt", "pct", "progress_bar", "save_heatmap_png", "save_histogram_png", "save_lines_png", "table", "text_histogram", "write_csv"]
