"""Presentation: rich tables, plots, the HTML report."""
