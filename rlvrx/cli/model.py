"""`rlvrx model tiny`."""

from __future__ import annotations

from pathlib import Path

import typer

from rlvrx.cli.common import console

app = typer.Typer(no_args_is_help=True)


@app.command()
def tiny(
    out: Path = typer.Argument(..., help="Output directory (a normal HF checkpoint dir)."),
    layers: int = typer.Option(2, help="Transformer layers."),
    hidden: int = typer.Option(64, help="Hidden size."),
    heads: int = typer.Option(4, help="Attention heads."),
    kv_heads: int = typer.Option(2, help="Key/value heads (grouped-query attention)."),
    intermediate: int = typer.Option(256, help="MLP intermediate size."),
    max_position: int = typer.Option(128, help="Context length."),
    tie_embeddings: bool = typer.Option(True, help="Tie input embeddings and LM head."),
    seed: int = typer.Option(0, help="Seed of the random init."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists (only after the new one is complete)."),
) -> None:
    """Build a tiny Qwen2-style causal LM (random init) with a character tokenizer. Nothing is downloaded."""
    from rlvrx.errors import UsageError
    from rlvrx.tiny import save_tiny_model

    try:
        save_tiny_model(
            out,
            overwrite=overwrite,
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            intermediate=intermediate,
            max_position=max_position,
            tie_embeddings=tie_embeddings,
            seed=seed,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    console.print(f"[green]wrote[/] {out}", highlight=False)
